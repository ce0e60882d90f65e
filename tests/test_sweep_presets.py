"""Every preset's dry run lists the runs the original scripts start: the same output folders,
arguments, load epochs and order. The expected folders and command lines are written out
from the scripts (main.sh, eval.sh, zeroshot.sh, CoCoOp's base2new_*/xd_* and KgCoOp's
base2new_train.sh), not computed by the code under test."""

from __future__ import annotations

import os
import shlex

import pytest

from coop.clip_trainer import CLIPTrainer
from coop.config import CN
from coop.registry import TRAINER_REGISTRY
from coop.sweep import main

XD_TARGETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
              "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # fmt: skip
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def _dry(capsys, *argv):
    """(the commands, the comment lines) of a dry run."""
    at = 0 if argv[0].startswith("-") else 1  # after the preset name, before the opts
    assert main([*argv[:at], "--dry-run", *argv[at:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(ln) for ln in lines if not ln.startswith("#")], [
        ln for ln in lines if ln.startswith("#")
    ]


def _common(root, seed, trainer, dataset, cfg_path, out):
    head = ["coop-train", "--root", root]
    if seed is not None:
        head += ["--seed", str(seed)]
    return head + ["--trainer", trainer, "--dataset-config-file",
                   f"configs/datasets/{dataset}.yaml", "--config-file", cfg_path,
                   "--output-dir", out]  # fmt: skip


def _register(monkeypatch, cls):
    monkeypatch.setitem(TRAINER_REGISTRY._obj_map, cls.__name__, cls)


def test_fewshot_follows_the_paper_schedule_over_the_grid(tmp_path, capsys):
    root, out = str(tmp_path), "out"
    cmds, notes = _dry(capsys, "fewshot", "--root", root, "--datasets", "dtd,imagenet",
                       "--output", out)  # fmt: skip
    assert (
        len(cmds) == 2 * 5 * 3 and notes[-1] == "# 30 runs: 0 done, 0 running, 0 failed, 30 missing"
    )
    schedule = {1: "rn50_ep50", 2: "rn50_ep100", 4: "rn50_ep100", 8: "rn50", 16: "rn50"}
    expected = []
    for dataset in ("dtd", "imagenet"):
        for k in (1, 2, 4, 8, 16):
            cfg = "rn50_ep50" if dataset == "imagenet" else schedule[k]
            for seed in (1, 2, 3):
                d = f"out/{dataset}/CoOp/{cfg}_{k}shots/nctx16_cscFalse_ctpend/seed{seed}"
                expected.append(
                    _common(root, seed, "CoOp", dataset, f"configs/trainers/CoOp/{cfg}.yaml", d)
                    + ["TRAINER.COOP.N_CTX", "16", "TRAINER.COOP.CSC", "False",
                       "TRAINER.COOP.CLASS_TOKEN_POSITION", "end", "DATASET.NUM_SHOTS", str(k)]
                )  # fmt: skip
    assert cmds == expected


def test_fewshot_with_main_sh_arguments_and_a_backbone(tmp_path, capsys):
    root = str(tmp_path)
    cmds, _ = _dry(capsys, "--root", root, "--datasets", "eurosat", "--shots", "16", "--seeds",
                   "2", "--backbone", "vit_b16", "--nctx", "8", "--csc", "True", "--ctp",
                   "middle", "--output", "o")  # fmt: skip
    # main.sh eurosat vit_b16 middle 8 16 True, seed 2
    assert cmds == [
        _common(root, 2, "CoOp", "eurosat", "configs/trainers/CoOp/vit_b16.yaml",
                "o/eurosat/CoOp/vit_b16_16shots/nctx8_cscTrue_ctpmiddle/seed2")
        + ["TRAINER.COOP.N_CTX", "8", "TRAINER.COOP.CSC", "True",
           "TRAINER.COOP.CLASS_TOKEN_POSITION", "middle", "DATASET.NUM_SHOTS", "16"]
    ]  # fmt: skip


def _folders(cmds):
    return [c[c.index("--output-dir") + 1] for c in cmds]


def test_ablation_studies(tmp_path, capsys):
    root = str(tmp_path)
    base = ["ablation", "--root", root, "--datasets", "dtd", "--seeds", "1", "--output", "o"]
    # unified vs class-specific x end vs middle: the four CoOp curves, over the five shots
    cmds, _ = _dry(capsys, *base, "--studies", "csc,ctp")
    assert len(cmds) == 4 * 5
    at16 = [c for c in cmds if "16" == c[c.index("DATASET.NUM_SHOTS") + 1]]
    assert _folders(at16) == [
        f"o/dtd/CoOp/rn50_16shots/nctx16_csc{csc}_ctp{ctp}/seed1"
        for ctp in ("end", "middle") for csc in ("False", "True")
    ]  # fmt: skip
    pairs = dict(zip(at16[3][-8::2], at16[3][-7::2]))
    assert pairs == {"TRAINER.COOP.N_CTX": "16", "TRAINER.COOP.CSC": "True",
                     "TRAINER.COOP.CLASS_TOKEN_POSITION": "middle", "DATASET.NUM_SHOTS": "16"}  # fmt: skip
    # context length 4, 8, 16
    cmds, _ = _dry(capsys, *base, "--studies", "nctx", "--shots", "1")
    assert _folders(cmds) == [f"o/dtd/CoOp/rn50_ep50_1shots/nctx{n}_cscFalse_ctpend/seed1"
                              for n in (4, 8, 16)]  # fmt: skip
    # random init vs "a photo of a" (the ctxv1 YAML), 16 shots
    cmds, _ = _dry(capsys, *base, "--studies", "init")
    assert _folders(cmds) == ["o/dtd/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1",
                              "o/dtd/CoOp/rn50_ctxv1_16shots/nctx16_cscFalse_ctpend/seed1"]  # fmt: skip
    assert cmds[1][cmds[1].index("--config-file") + 1] == "configs/trainers/CoOp/rn50_ctxv1.yaml"
    # backbones, 16 shots
    cmds, _ = _dry(capsys, *base, "--studies", "backbone")
    assert _folders(cmds) == [f"o/dtd/CoOp/{b}_16shots/nctx16_cscFalse_ctpend/seed1"
                              for b in ("rn50", "rn101", "vit_b32", "vit_b16")]  # fmt: skip
    # all studies at once: the default setting is listed once
    cmds, _ = _dry(capsys, *base, "--shots", "16")
    folders = _folders(cmds)
    assert len(folders) == len(set(folders)) == 4 + 2 + 1 + 3
    assert main([*base, "--studies", "prompts"]) == 2
    assert "unknown study 'prompts'" in capsys.readouterr().err


def test_zeroshot_is_zeroshot_sh(tmp_path, capsys):
    root = str(tmp_path)
    cmds, _ = _dry(capsys, "zeroshot", "--root", root, "--datasets", "dtd,eurosat",
                   "--backbones", "rn50,vit_b16", "--output", "o")  # fmt: skip
    expected = []
    for dataset in ("dtd", "eurosat"):
        for b in ("rn50", "vit_b16"):
            expected.append(
                _common(root, None, "ZeroshotCLIP", dataset, f"configs/trainers/CoOp/{b}.yaml",
                        f"o/ZeroshotCLIP/{b}/{dataset}") + ["--eval-only"]
            )  # fmt: skip
    assert cmds == expected
    cmds, _ = _dry(capsys, "zeroshot", "--root", root, "--datasets", "dtd", "--trainer",
                   "ZeroshotCLIP2", "--output", "o")  # fmt: skip
    assert _folders(cmds) == ["o/ZeroshotCLIP2/rn50/dtd"]


def test_base2new_trains_on_base_and_evaluates_the_last_epoch_on_new(tmp_path, capsys):
    root = str(tmp_path)
    cmds, notes = _dry(capsys, "base2new", "--root", root, "--datasets", "dtd,imagenet",
                       "--seeds", "1,2", "--output", "o")  # fmt: skip
    expected = []
    for dataset, cfg, epoch in (
        ("dtd", "vit_b16_ctxv1", 200),
        ("imagenet", "vit_b16_ep50_ctxv1", 50),
    ):
        for seed in (1, 2):
            train = f"o/base2new/train_base/{dataset}/shots_16/CoOp/{cfg}/seed{seed}"
            test = f"o/base2new/test_new/{dataset}/shots_16/CoOp/{cfg}/seed{seed}"
            cfg_path = f"configs/trainers/CoOp/{cfg}.yaml"
            expected.append(
                _common(root, seed, "CoOp", dataset, cfg_path, train)
                + ["DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base"]
            )
            expected.append(_common(root, seed, "CoOp", dataset, cfg_path, test)
                            + ["--model-dir", train, "--load-epoch", str(epoch), "--eval-only",
                               "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "new"])  # fmt: skip
    assert cmds == expected
    assert notes[1].startswith("# [2/8] to run after [1/8]: ")
    # the load epoch is the training config's MAX_EPOCH, opts included
    cmds, _ = _dry(capsys, "base2new", "--root", root, "--datasets", "dtd", "--seeds", "1",
                   "OPTIM.MAX_EPOCH", "7")  # fmt: skip
    assert cmds[1][cmds[1].index("--load-epoch") + 1] == "7"


def _cocoop_class(monkeypatch):
    """The registered CoCoOp where it exists, else a stand-in declaring what the spec says
    CoCoOp's scripts run (its shipped YAML folder, no folder patterns of its own)."""
    if "CoCoOp" in TRAINER_REGISTRY._obj_map:
        return "CoCoOp"

    class CoCoOp(CLIPTrainer):
        protocol_configs = {"base2new": "vit_b16_c4_ep10_batch1_ctxv1",
                            "xd": "vit_b16_c4_ep10_batch1_ctxv1"}  # fmt: skip

    _register(monkeypatch, CoCoOp)
    return "CoCoOp"


def test_cocoop_scripts_folders_are_the_default(tmp_path, capsys, monkeypatch):
    root = str(tmp_path)
    trainer = _cocoop_class(monkeypatch)
    cfg = "vit_b16_c4_ep10_batch1_ctxv1"
    cfg_path = f"configs/trainers/CoCoOp/{cfg}.yaml"
    cmds, _ = _dry(capsys, "base2new", "--root", root, "--trainer", trainer, "--datasets",
                   "ucf101", "--seeds", "3", "--output", "output")  # fmt: skip
    train = f"output/base2new/train_base/ucf101/shots_16/CoCoOp/{cfg}/seed3"
    test = f"output/base2new/test_new/ucf101/shots_16/CoCoOp/{cfg}/seed3"
    assert cmds == [
        _common(root, 3, "CoCoOp", "ucf101", cfg_path, train)
        + ["DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base"],
        _common(root, 3, "CoCoOp", "ucf101", cfg_path, test)
        + ["--model-dir", train, "--load-epoch", "10", "--eval-only",
           "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "new"],
    ]  # fmt: skip
    # xd_train.sh 1 then xd_test.sh on the ten others; DG uses the same model and folders
    for preset, targets in (("xd", XD_TARGETS), ("dg", DG_TARGETS)):
        cmds, _ = _dry(capsys, preset, "--root", root, "--trainer", trainer, "--seeds", "1",
                       "--output", "output")  # fmt: skip
        model = f"output/imagenet/CoCoOp/{cfg}_16shots/seed1"
        assert cmds[0] == _common(root, 1, "CoCoOp", "imagenet", cfg_path, model) + [
            "DATASET.NUM_SHOTS", "16"]  # fmt: skip
        assert cmds[1:] == [
            _common(root, 1, "CoCoOp", t, cfg_path,
                    f"output/evaluation/CoCoOp/{cfg}_16shots/{t}/seed1")
            + ["--model-dir", model, "--load-epoch", "10", "--eval-only"]
            for t in targets
        ]  # fmt: skip


def test_coop_cross_dataset_and_domain_generalisation(tmp_path, capsys):
    root = str(tmp_path)
    # CoOp in CoCoOp's xd scripts: vit_b16_ep50_ctxv1 on ImageNet
    cmds, _ = _dry(capsys, "xd", "--root", root, "--seeds", "2", "--output", "output")
    model = "output/imagenet/CoOp/vit_b16_ep50_ctxv1_16shots/seed2"
    assert _folders(cmds) == [model] + [
        f"output/evaluation/CoOp/vit_b16_ep50_ctxv1_16shots/{t}/seed2" for t in XD_TARGETS
    ]
    assert cmds[1][-5:] == ["--model-dir", model, "--load-epoch", "50", "--eval-only"]
    # eval.sh imagenetv2 rn50_ep50 (the model of main.sh imagenet rn50_ep50 end 4 16 False)
    cmds, _ = _dry(capsys, "dg", "--root", root, "--seeds", "1", "--nctx", "4", "--output",
                   "output")  # fmt: skip
    model = "output/imagenet/CoOp/rn50_ep50_16shots/nctx4_cscFalse_ctpend/seed1"
    ctx = ["TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CSC", "False",
           "TRAINER.COOP.CLASS_TOKEN_POSITION", "end"]  # fmt: skip
    cfg_path = "configs/trainers/CoOp/rn50_ep50.yaml"
    assert cmds[0] == _common(root, 1, "CoOp", "imagenet", cfg_path, model) + ctx + [
        "DATASET.NUM_SHOTS", "16"]  # fmt: skip
    assert cmds[1:] == [
        _common(root, 1, "CoOp", t, cfg_path,
                f"output/evaluation/CoOp/rn50_ep50_16shots/nctx4_cscFalse_ctpend/{t}/seed1")
        + ["--model-dir", model, "--load-epoch", "50", "--eval-only", *ctx]
        for t in DG_TARGETS
    ]  # fmt: skip
    cmds, _ = _dry(capsys, "dg", "--root", root, "--seeds", "1", "--backbone", "vit_b32",
                   "--targets", "imagenet_r")  # fmt: skip
    assert _folders(cmds)[1] == (
        "output/evaluation/CoOp/vit_b32_ep50_16shots/nctx16_cscFalse_ctpend/imagenet_r/seed1"
    )


def test_a_method_declares_its_folder_pattern_with_its_config_keys(tmp_path, capsys, monkeypatch):
    """KgCoOp's base2new_train.sh DATASET WEIGHT: shots_16_${WEIGHT} in the folder and
    TRAINER.COOP.W WEIGHT in the opts (here a stand-in method with a W key)."""

    class KgStandin(CLIPTrainer):
        config_dir = "CoOp"
        protocol_configs = {"base2new": "vit_b16_ep100_ctxv1"}
        protocol_dirs = {
            "base2new_train": "base2new/train_base/{dataset}/shots_{shots}_{W}/{trainer}/{cfg}/seed{seed}",
            "base2new_test": "base2new/test_new/{dataset}/shots_{shots}_{W}/{trainer}/{cfg}/seed{seed}",
        }  # fmt: skip

        @classmethod
        def add_config(cls, cfg):
            cfg.TRAINER.KGSTANDIN = CN()
            cfg.TRAINER.KGSTANDIN.W = 1.0

    _register(monkeypatch, KgStandin)
    cmds, _ = _dry(capsys, "base2new", "--root", str(tmp_path), "--trainer", "KgStandin",
                   "--datasets", "dtd", "--seeds", "1", "TRAINER.KGSTANDIN.W", "8.0")  # fmt: skip
    train = "output/base2new/train_base/dtd/shots_16_8.0/KgStandin/vit_b16_ep100_ctxv1/seed1"
    assert _folders(cmds) == [train, train.replace("train_base", "test_new")]
    assert cmds[0][-6:] == ["DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base",
                            "TRAINER.KGSTANDIN.W", "8.0"]  # fmt: skip
    assert cmds[1][cmds[1].index("--load-epoch") + 1] == "100"


def test_linear_probe_runs_the_grid_with_its_trainer(tmp_path, capsys, monkeypatch):
    root = str(tmp_path)
    if "LinearProbeCLIP" not in TRAINER_REGISTRY._obj_map:
        assert main(["linear-probe", "--root", root, "--dry-run"]) == 2
        assert '"LinearProbeCLIP" is not a registered trainer' in capsys.readouterr().err

        class LinearProbeCLIP(CLIPTrainer):  # no context keys: few_shot.sh's folders
            config_dir = "CoOp"
            protocol_configs = {"fewshot": "rn50"}

        _register(monkeypatch, LinearProbeCLIP)
    cmds, _ = _dry(capsys, "linear-probe", "--root", root, "--datasets", "dtd", "--output", "o")
    assert len(cmds) == 15
    assert all(c[c.index("--trainer") + 1] == "LinearProbeCLIP" for c in cmds)
    assert [c[c.index("DATASET.NUM_SHOTS") + 1] for c in cmds[::3]] == ["1", "2", "4", "8", "16"]
    assert {c[c.index("--seed") + 1] for c in cmds} == {"1", "2", "3"}


def test_prompts_runs_coop_prompts_per_dataset_with_the_backbone_config(tmp_path, capsys):
    root = str(tmp_path)
    cmds, notes = _dry(capsys, "prompts", "--root", root, "--datasets", "caltech101,dtd",
                       "--backbone", "vit_b16", "--template", "a [CLASS].", "--output", "o",
                       "INPUT.SIZE", "(32, 32)")  # fmt: skip
    assert cmds == [
        ["coop-prompts", "--root", root, "--dataset-config-file",
         f"configs/datasets/{d}.yaml", "--config-file", "configs/trainers/CoOp/vit_b16.yaml",
         "--output-dir", f"o/prompt_study/vit_b16/{d}", "--template", "a [CLASS].",
         "INPUT.SIZE", "(32, 32)"]
        for d in ("caltech101", "dtd")
    ]  # fmt: skip
    assert notes == [
        "# [1/2] to run: caltech101 ZeroshotCLIP vit_b16 prompt study -> "
        "o/prompt_study/vit_b16/caltech101",
        "# [2/2] to run: dtd ZeroshotCLIP vit_b16 prompt study -> o/prompt_study/vit_b16/dtd",
        "# 2 runs: 0 done, 0 running, 0 failed, 2 missing",
    ]
    # defaults: RN50's YAML, the eleven datasets, coop-prompts' own templates
    cmds, _ = _dry(capsys, "prompts", "--root", root)
    assert len(cmds) == 11 and all("--template" not in c for c in cmds)
    assert {c[c.index("--config-file") + 1] for c in cmds} == {"configs/trainers/CoOp/rn50.yaml"}
    assert cmds[0][cmds[0].index("--output-dir") + 1] == "output/prompt_study/rn50/imagenet"
    # it trains nothing: no trainer, seeds, shots or context flags
    with pytest.raises(SystemExit):
        main(["prompts", "--root", root, "--seeds", "1", "--dry-run"])
    assert "unrecognized arguments: --seeds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["base2new", "--trainer", "ZeroshotCLIP"],
            "trainer ZeroshotCLIP declares no config for the base2new protocol",
        ),
        (["fewshot", "--trainer", "CoOP"], "did you mean 'CoOp'"),
        (["xd", "--targets", "caltech102"], "unknown dataset 'caltech102'"),
        (["base2new", "--shots", "4,16"], "base-to-new takes one shot count"),
        (["xd", "--backbone", "rn101"], "no trainer config 'rn101_ep50_ctxv1'"),
        (["status"], "status takes a preset first"),
        (
            ["fewshot", "--executor", "local", "--max-parallel", "0"],
            "--max-parallel must be positive",
        ),
        (["fewshot", "--executor", "slurm", "--time", "2h"], "not a Slurm time"),
        (["fewshot", "--executor", "slurm", "--slurm-extra", "qos"], "KEY=VALUE"),
        (["prompts", "--template", "a photo"], "--template 'a photo' must contain [CLASS]"),
        (["prompts", "--backbone", "rn51"], "no trainer config 'rn51' for the prompt study"),
        (["prompts", "--datasets", "caltech"], "unknown dataset 'caltech'"),
        (["prompts", "OPTIM.MAX_EPOCHS", "3"], "OPTIM.MAX_EPOCHS"),
    ],  # fmt: skip
)
def test_bad_preset_arguments_stop_before_any_run(tmp_path, capsys, argv, message):
    out = str(tmp_path / "out")
    full = [*argv[:1], "--root", str(tmp_path), "--output", out, *argv[1:]]
    if argv == ["status"]:
        full = ["status"]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("coop-sweep: error: ") and message in err, err
    assert not os.path.exists(out)
