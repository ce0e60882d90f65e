"""coop-prompts (coop/prompt_study.py): every cell equals a zero-shot run with that template."""

from __future__ import annotations

import json
import os

import pytest
from helpers_train import read_results, zeroshot_argv

from coop import prompt_study
from coop.train import main as train_main
from coop.trainers import templates as tmpl
from coop.trainers import zsclip

OPTS = ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]


def _zeroshot(root, out, ckpt, trainer="ZeroshotCLIP"):
    argv = zeroshot_argv(root, out, ckpt)
    argv[argv.index("--trainer") + 1] = trainer
    assert train_main(argv) == 0
    return read_results(out)["metrics"]["accuracy"]


def test_the_table_equals_zero_shot_runs_with_each_template(
    data_root, learnable_clip, tmp_path, monkeypatch, capsys
):
    out = str(tmp_path / "study")
    calls = []
    real = zsclip.ZeroshotCLIP.image_features
    monkeypatch.setattr(
        zsclip.ZeroshotCLIP, "image_features", lambda s, x: calls.append(len(x)) or real(s, x)
    )
    argv = ["--root", data_root, "--dataset", "caltech101", "--backbone", learnable_clip]
    argv += ["--template", "a [CLASS].", "--template", "dataset", "--template", "ensemble"]
    assert prompt_study.main([*argv, "--output-dir", out, *OPTS]) == 0
    assert sum(calls) == 60  # the 60 test images, encoded once for all three templates

    with open(os.path.join(out, "prompt_study.json"), encoding="utf-8") as f:
        table = json.load(f)
    (row,) = table["rows"]
    acc = row["accuracy"]
    assert row["dataset"] == "Caltech101" and table["backbone"] == learnable_clip
    assert row["templates"]["ensemble"] == [*tmpl.IMAGENET_TEMPLATES_SELECT, "a photo of a {}."]

    # the dataset's own template and the ensemble: ZeroshotCLIP and ZeroshotCLIP2 runs
    assert acc["dataset"] == _zeroshot(data_root, str(tmp_path / "zs"), learnable_clip)
    zs2 = _zeroshot(data_root, str(tmp_path / "zs2"), learnable_clip, "ZeroshotCLIP2")
    assert acc["ensemble"] == zs2
    # any other template: a ZeroshotCLIP run whose dataset template is that one
    monkeypatch.setitem(tmpl.CUSTOM_TEMPLATES, "Caltech101", "a {}.")
    assert acc["a [CLASS]."] == _zeroshot(data_root, str(tmp_path / "zs3"), learnable_clip)
    assert len({acc["dataset"], acc["a [CLASS]."], acc["ensemble"]}) > 1  # templates matter

    printed = capsys.readouterr().out
    assert "a [CLASS].  dataset's own  ImageNet ensemble" in printed
    assert f"Caltech101  {acc['a [CLASS].']:>10.2f}" in printed
    with open(os.path.join(out, "prompt_study.md"), encoding="utf-8") as f:
        md = f.read()
    assert md.splitlines()[0] == "| dataset | a [CLASS]. | dataset's own | ImageNet ensemble |"
    assert md.splitlines()[2].startswith(f"| Caltech101 | {acc['a [CLASS].']:.2f} |")


def test_default_templates_and_two_datasets(data_root, tiny_vit, tmp_path):
    out = str(tmp_path / "study")
    argv = ["--root", data_root, "--backbone", tiny_vit, "--output-dir", out]
    argv += ["--dataset", "Caltech101", "--dataset-config-file", "configs/datasets/caltech101.yaml"]
    assert prompt_study.main([*argv, *OPTS]) == 0
    with open(os.path.join(out, "prompt_study.json"), encoding="utf-8") as f:
        table = json.load(f)
    assert [c["spec"] for c in table["columns"]] == prompt_study.DEFAULT_TEMPLATES
    assert len(table["rows"]) == 2 and table["rows"][0]["accuracy"] == table["rows"][1]["accuracy"]
    # Caltech101's own template is "a photo of a {}.": the same column twice
    acc = table["rows"][0]["accuracy"]
    assert acc["dataset"] == acc["a photo of a [CLASS]."]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dataset", "caltech"], "Unknown dataset 'caltech'; choose from caltech101"),
        (["--dataset", "dtd", "--template", "a photo"], "must contain [CLASS]"),
        ([], "No dataset given"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, extra, message):
    argv = ["--root", str(tmp_path), "--output-dir", str(tmp_path / "o"), *extra]
    assert prompt_study.main(argv) == 2
    assert message in capsys.readouterr().err
