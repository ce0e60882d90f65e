"""Packaging: wheel contents, console scripts, cheap imports, registries (DESIGN "Layout")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from coop.registry import DATASET_REGISTRY, TRAINER_REGISTRY, RegistryError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_TRAINERS = ["CoOp", "ZeroshotCLIP", "ZeroshotCLIP2"]
EXPECTED_DATASETS = [
    "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
    "SUN397", "DescribableTextures", "EuroSAT", "UCF101", "ImageNet", "ImageNetV2",
    "ImageNetSketch", "ImageNetA", "ImageNetR",
]  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build a wheel from a copy of the source tree (so no build/ or egg-info lands in the
    working tree), without dependencies or network."""
    src = tmp_path_factory.mktemp("src") / "coop-dassl"
    shutil.copytree(
        REPO_ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
            "output",
            "demo_output",
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    assert wheels[0].startswith("coop_dassl-")
    with zipfile.ZipFile(out / wheels[0]) as zf:
        names = zf.namelist()
        dist_info = {n.split("/", 1)[0] for n in names if ".dist-info/" in n}
        assert len(dist_info) == 1
        (di,) = dist_info
        entry_points = zf.read(f"{di}/entry_points.txt").decode()
        top_level = (
            zf.read(f"{di}/top_level.txt").decode() if f"{di}/top_level.txt" in names else None
        )
    return {"names": names, "dist_info": di, "entry_points": entry_points, "top_level": top_level}


def test_wheel_holds_only_coop_and_its_dist_info(wheel):
    di = wheel["dist_info"]
    assert di.startswith("coop_dassl-") and di.endswith(".dist-info")
    stray = [n for n in wheel["names"] if not (n.startswith("coop/") or n.startswith(di + "/"))]
    assert stray == []
    if wheel["top_level"] is not None:
        assert wheel["top_level"].split() == ["coop"]


@pytest.mark.parametrize(
    "path",
    [
        "coop/__init__.py",
        "coop/config.py",
        "coop/fast/__init__.py",
        "coop/fast/feature_cache.py",
        "coop/trainers/__init__.py",
        "coop/trainers/coop.py",
        "coop/trainers/zsclip.py",
        "coop/trainers/templates.py",
        "coop/datasets/__init__.py",
        "coop/datasets/caltech101.py",
        "coop/configs/__init__.py",
        "coop/configs/trainers/CoOp/rn50.yaml",
        "coop/configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
        "coop/configs/datasets/caltech101.yaml",
        "coop/testing/tiny_clip.py",
    ],
)
def test_wheel_contains(wheel, path):
    assert path in wheel["names"]


def test_wheel_ships_every_config_yaml(wheel):
    from coop.config import iter_yaml_files

    shipped = {
        "coop/configs/" + p.replace(os.sep, "/").split("/configs/", 1)[1] for p in iter_yaml_files()
    }
    in_wheel = {n for n in wheel["names"] if n.endswith(".yaml")}
    assert shipped == in_wheel


def test_wheel_has_no_top_level_datasets_trainers_or_clip(wheel):
    tops = {n.split("/", 1)[0] for n in wheel["names"]}
    for bad in ("datasets", "trainers", "clip", "configs", "tests", "scripts"):
        assert bad not in tops
        assert f"{bad}.py" not in tops


def test_console_scripts(wheel):
    text = wheel["entry_points"]
    assert "[console_scripts]" in text
    lines = {ln.replace(" ", "") for ln in text.splitlines()}
    assert "coop-train=coop.train:main" in lines
    assert "coop-demo=coop.demo:main" in lines
    assert "coop-data=coop.data_tool:main" in lines
    assert "coop-sweep=coop.sweep:main" in lines
    assert "coop-parse=coop.parse_results:main" in lines
    assert "coop-report=coop.report:main" in lines
    assert "coop-prompts=coop.prompt_study:main" in lines
    assert "coop-interpret=coop.interpret:main" in lines


def test_import_coop_does_no_heavy_work(tmp_path):
    code = (
        "import coop, coop.config, coop.registry, sys; "
        "print('clip' in sys.modules, 'coop.trainers' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# Registries


def test_registry_lookup_suggests_right_case():
    with pytest.raises(RegistryError) as ei:
        TRAINER_REGISTRY.get("coop")
    assert "did you mean 'CoOp'" in str(ei.value)


def test_registry_error_lists_every_registered_name():
    with pytest.raises(RegistryError) as ei:
        TRAINER_REGISTRY.get("NoSuchTrainer")
    for name in TRAINER_REGISTRY.registered_names():
        assert name in str(ei.value)
    with pytest.raises(RegistryError) as ei:
        DATASET_REGISTRY.get("NoSuchDataset")
    for name in DATASET_REGISTRY.registered_names():
        assert name in str(ei.value)


def test_registry_is_a_key_error():
    # Dassl's registry raises KeyError: callers catching it keep working
    with pytest.raises(KeyError):
        TRAINER_REGISTRY.get("nope")


def test_builtin_names_registered():
    assert set(EXPECTED_TRAINERS) <= set(TRAINER_REGISTRY.registered_names())
    assert set(EXPECTED_DATASETS) <= set(DATASET_REGISTRY.registered_names())


@pytest.mark.parametrize("name", EXPECTED_TRAINERS)
def test_trainer_class_name_is_registry_key(name):
    cls = TRAINER_REGISTRY.get(name)
    assert cls.__name__ == name
    assert name in TRAINER_REGISTRY
    assert cls.__module__.startswith("coop.trainers.")


@pytest.mark.parametrize("name", EXPECTED_DATASETS)
def test_dataset_class_name_is_registry_key(name):
    cls = DATASET_REGISTRY.get(name)
    assert cls.__name__ == name
    assert cls.__module__.startswith("coop.datasets.")


def test_every_registered_name_resolves_to_itself():
    for reg in (TRAINER_REGISTRY, DATASET_REGISTRY):
        for name in reg.registered_names():
            assert reg.get(name).__name__ == name


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    """The README's set-up block holds exactly two commands; .ci/run runs the test one."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "make test" in ci.splitlines()[-1]
