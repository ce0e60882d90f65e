"""The sibling methods' presets run what their original scripts run. The expected folders,
command lines and load epochs are written out from the scripts as the spec records them
(KgCoOp's base2new_train.sh / base2new_test.sh / xd_train.sh, ProGrad's prograd.sh,
base2new_*_prograd.sh and eval.sh, MaPLe's and PromptSRC's base2new / xd / few_shot
scripts, CoCoOp's scripts), not computed by the code under test. Last, one real base-to-new
sweep on the tiny fixtures and coop-report over it."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex

import pytest

from coop.clip_trainer import CLIPTrainer
from coop.registry import TRAINER_REGISTRY
from coop.sweep import main

XD_TARGETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
              "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # fmt: skip
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
ROOT = "DATA"  # replaced by the test's folder


def _dry(capsys, root, *argv):
    """The command lines of a dry run (``coop-train`` and its arguments)."""
    assert main([argv[0], "--dry-run", "--root", root, *argv[1:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(ln) for ln in lines if not ln.startswith("#")]


def _script(text: str, root: str):
    """One command line of a script, as written in the test (``python train.py`` ->
    ``coop-train``, DATA -> the test's folder)."""
    words = shlex.split(text)
    return ["coop-train"] + [root if w == ROOT else w for w in words]


def _error(capsys, root, *argv) -> str:
    assert main([argv[0], "--dry-run", "--root", root, *argv[1:]]) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------- KgCoOp
def test_kgcoop_base2new_is_its_base2new_train_and_test_scripts(tmp_path, capsys):
    root = str(tmp_path)
    cmds = _dry(capsys, root, "base2new", "--trainer", "KgCoOp", "--datasets", "stanford_cars")
    cfg = "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml"
    expected = []
    for seed in (1, 2, 3):  # base2new_train.sh stanford_cars 8.0, then base2new_test.sh
        common = f"stanford_cars/shots_16_8.0/KgCoOp/vit_b16_ep100_ctxv1/seed{seed}"
        expected.append(_script(
            f"--root DATA --seed {seed} --trainer KgCoOp "
            f"--dataset-config-file configs/datasets/stanford_cars.yaml --config-file {cfg} "
            f"--output-dir output/base2new/train_base/{common} "
            "TRAINER.COOP.N_CTX 4 TRAINER.COOP.CSC False TRAINER.COOP.W 8.0 "
            "TRAINER.COOP.CLASS_TOKEN_POSITION end DATASET.NUM_SHOTS 16 "
            "DATASET.SUBSAMPLE_CLASSES base", root))  # fmt: skip
        expected.append(_script(
            f"--root DATA --seed {seed} --trainer KgCoOp "
            f"--dataset-config-file configs/datasets/stanford_cars.yaml --config-file {cfg} "
            f"--output-dir output/base2new/test_new/{common} "
            f"--model-dir output/base2new/train_base/{common} --load-epoch 100 --eval-only "
            "TRAINER.COOP.N_CTX 4 TRAINER.COOP.CSC False "
            "TRAINER.COOP.CLASS_TOKEN_POSITION end DATASET.NUM_SHOTS 16 "
            "DATASET.SUBSAMPLE_CLASSES new", root))  # fmt: skip
    assert cmds == expected


def test_kgcoop_weight_from_the_command_line_names_both_folders(tmp_path, capsys):
    """base2new_train.sh DATASET 4.0: the weight in the folder of training and evaluation;
    the trailing opt replaces the script's W 8.0 (passed once, last)."""
    cmds = _dry(capsys, str(tmp_path), "base2new", "--trainer", "KgCoOp", "--datasets", "dtd",
                "--seeds", "1", "TRAINER.COOP.W", "4.0")  # fmt: skip
    train, test = (c[c.index("--output-dir") + 1] for c in cmds)
    assert train == "output/base2new/train_base/dtd/shots_16_4.0/KgCoOp/vit_b16_ep100_ctxv1/seed1"
    assert test == train.replace("train_base", "test_new")
    assert cmds[0].count("TRAINER.COOP.W") == 1 and cmds[0][-2:] == ["TRAINER.COOP.W", "4.0"]


def test_kgcoop_fewshot_is_its_xd_train_script(tmp_path, capsys):
    """xd_train.sh trains 4-shot models on all classes into output_1120_xd/."""
    root = str(tmp_path)
    cmds = _dry(capsys, root, "fewshot", "--trainer", "KgCoOp", "--datasets", "dtd,imagenet")
    cfg = "configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml"
    assert cmds == [
        _script(
            f"--root DATA --seed {seed} --trainer KgCoOp "
            f"--dataset-config-file configs/datasets/{d}.yaml --config-file {cfg} "
            f"--output-dir output_1120_xd/base2new/train_base/{d}/shots_4_8.0/KgCoOp/"
            f"vit_b16_ep100_ctxv1/seed{seed} TRAINER.COOP.N_CTX 4 TRAINER.COOP.CSC False "
            "TRAINER.COOP.W 8.0 TRAINER.COOP.CLASS_TOKEN_POSITION end DATASET.NUM_SHOTS 4",
            root,
        )
        for d in ("dtd", "imagenet")
        for seed in (1, 2, 3)
    ]
    # the tree sits beside --output, as output_1120_xd beside output
    cmds = _dry(capsys, root, "fewshot", "--trainer", "KgCoOp", "--datasets", "dtd", "--seeds",
                "1", "--output", "/runs/out")  # fmt: skip
    assert cmds[0][cmds[0].index("--output-dir") + 1] == (
        "/runs/out_1120_xd/base2new/train_base/dtd/shots_4_8.0/KgCoOp/vit_b16_ep100_ctxv1/seed1"
    )


@pytest.mark.parametrize("preset", ["xd", "dg"])
def test_kgcoop_ships_no_transfer_scripts(tmp_path, capsys, preset):
    err = _error(capsys, str(tmp_path), preset, "--trainer", "KgCoOp")
    assert f"trainer KgCoOp declares no config for the {preset} protocol" in err
    assert "its original ships no script for it; protocols declared: base2new, fewshot" in err
    assert err.count("\n") == 1  # one line


# ---------------------------------------------------------------------------------- ProGrad
def _prograd_fewshot(root, dataset, cfg, shots, seed, lam):
    """prograd.sh DATASET CFG end 16 SHOTS False (LAMBDA as set in the script)."""
    return _script(
        f"--root DATA --seed {seed} --trainer ProGrad "
        f"--dataset-config-file configs/datasets/{dataset}.yaml "
        f"--config-file configs/trainers/ProGrad/{cfg}.yaml "
        f"--output-dir output/{dataset}/ProGrad/{cfg}_{shots}shots/nctx16_cscFalse_ctpend/"
        f"seed{seed} LOSS.LAMBDA {lam} TRAINER.COOP.N_CTX 16 TRAINER.COOP.CSC False "
        f"TRAINER.COOP.CLASS_TOKEN_POSITION end DATASET.NUM_SHOTS {shots}",
        root,
    )


def test_prograd_fewshot_follows_its_readme_schedule(tmp_path, capsys):
    root = str(tmp_path)
    cmds = _dry(capsys, root, "fewshot", "--trainer", "ProGrad", "--datasets",
                "stanford_cars,dtd", "--seeds", "1")  # fmt: skip
    # README: 1 shot rn50_ep50, 2 and 4 shots rn50_ep100, 8 and 16 shots rn50; LAMBDA 0.8
    # for Flowers102, DTD and EuroSAT at 8 and 16 shots
    schedule = {1: "rn50_ep50", 2: "rn50_ep100", 4: "rn50_ep100", 8: "rn50", 16: "rn50"}
    expected = [_prograd_fewshot(root, "stanford_cars", schedule[k], k, 1, "1.0")
                for k in (1, 2, 4, 8, 16)]  # fmt: skip
    expected += [_prograd_fewshot(root, "dtd", schedule[k], k, 1, "0.8" if k >= 8 else "1.0")
                 for k in (1, 2, 4, 8, 16)]  # fmt: skip
    assert cmds == expected
    cmds = _dry(capsys, root, "fewshot", "--trainer", "ProGrad", "--datasets",
                "oxford_flowers,eurosat,imagenet", "--shots", "16", "--seeds", "2")  # fmt: skip
    assert cmds == [
        _prograd_fewshot(root, "oxford_flowers", "rn50", 16, 2, "0.8"),
        _prograd_fewshot(root, "eurosat", "rn50", 16, 2, "0.8"),
        _prograd_fewshot(root, "imagenet", "rn50_ep50", 16, 2, "1.0"),
    ]


def test_prograd_flags_replace_the_scripts_values_in_place(tmp_path, capsys):
    """prograd.sh dtd rn50 middle 4 16 True with LAMBDA 0.5 (a trailing opt)."""
    root = str(tmp_path)
    cmds = _dry(capsys, root, "fewshot", "--trainer", "ProGrad", "--datasets", "dtd", "--shots",
                "16", "--seeds", "1", "--nctx", "4", "--csc", "True", "--ctp", "middle",
                "LOSS.LAMBDA", "0.5")  # fmt: skip
    assert cmds == [_script(
        "--root DATA --seed 1 --trainer ProGrad --dataset-config-file configs/datasets/dtd.yaml "
        "--config-file configs/trainers/ProGrad/rn50.yaml "
        "--output-dir output/dtd/ProGrad/rn50_16shots/nctx4_cscTrue_ctpmiddle/seed1 "
        "TRAINER.COOP.N_CTX 4 TRAINER.COOP.CSC True TRAINER.COOP.CLASS_TOKEN_POSITION middle "
        "DATASET.NUM_SHOTS 16 LOSS.LAMBDA 0.5", root)]  # fmt: skip


def test_prograd_base2new_trains_4_shots(tmp_path, capsys):
    root = str(tmp_path)
    cmds = _dry(capsys, root, "base2new", "--trainer", "ProGrad", "--datasets",
                "stanford_cars,imagenet", "--seeds", "1")  # fmt: skip
    ctx = ("LOSS.LAMBDA 1.0 TRAINER.COOP.N_CTX 16 TRAINER.COOP.CSC False "
           "TRAINER.COOP.CLASS_TOKEN_POSITION end DATASET.NUM_SHOTS 4")  # fmt: skip
    expected = []
    # base2new_train_prograd.sh / base2new_test_prograd.sh; README: ImageNet with
    # rn50_ep50 and LOADEP 50
    for d, cfg, epoch in (("stanford_cars", "rn50_ep100", 100), ("imagenet", "rn50_ep50", 50)):
        common = f"{d}/shots_4/ProGrad/{cfg}/seed1"
        head = (f"--root DATA --seed 1 --trainer ProGrad "
                f"--dataset-config-file configs/datasets/{d}.yaml "
                f"--config-file configs/trainers/ProGrad/{cfg}.yaml")  # fmt: skip
        expected.append(_script(
            f"{head} --output-dir output/base2new/train_base/{common} {ctx} "
            "DATASET.SUBSAMPLE_CLASSES base", root))  # fmt: skip
        expected.append(_script(
            f"{head} --output-dir output/base2new/test_new/{common} "
            f"--model-dir output/base2new/train_base/{common} --load-epoch {epoch} --eval-only "
            f"{ctx} DATASET.SUBSAMPLE_CLASSES new", root))  # fmt: skip
    assert cmds == expected


def test_prograd_dg_is_eval_sh_on_the_4_shot_imagenet_model(tmp_path, capsys):
    root = str(tmp_path)
    cmds = _dry(capsys, root, "dg", "--trainer", "ProGrad", "--seeds", "3")
    # the model: prograd.sh imagenet rn50_ep50 end 16 4 False; eval.sh with TRAINER=ProGrad
    model = "output/imagenet/ProGrad/rn50_ep50_4shots/nctx16_cscFalse_ctpend/seed3"
    assert cmds[0] == _prograd_fewshot(root, "imagenet", "rn50_ep50", 4, 3, "1.0")
    assert cmds[1:] == [
        _script(
            f"--root DATA --seed 3 --trainer ProGrad --dataset-config-file "
            f"configs/datasets/{d}.yaml --config-file configs/trainers/ProGrad/rn50_ep50.yaml "
            f"--output-dir output/evaluation/ProGrad/rn50_ep50_4shots/nctx16_cscFalse_ctpend/"
            f"{d}/seed3 --model-dir {model} --load-epoch 50 --eval-only "
            "TRAINER.COOP.N_CTX 16 TRAINER.COOP.CSC False TRAINER.COOP.CLASS_TOKEN_POSITION end",
            root,
        )
        for d in DG_TARGETS
    ]


def test_prograd_ships_no_cross_dataset_script(tmp_path, capsys):
    err = _error(capsys, str(tmp_path), "xd", "--trainer", "ProGrad")
    assert "trainer ProGrad declares no config for the xd protocol" in err
    assert "protocols declared: base2new, dg, fewshot" in err
    # --cfg runs it anyway, with CoCoOp's folders and arguments
    cmds = _dry(capsys, str(tmp_path), "xd", "--trainer", "ProGrad", "--cfg", "rn50_ep50",
                "--seeds", "1", "--targets", "dtd")  # fmt: skip
    assert [c[c.index("--output-dir") + 1] for c in cmds] == [
        "output/imagenet/ProGrad/rn50_ep50_16shots/seed1",
        "output/evaluation/ProGrad/rn50_ep50_16shots/dtd/seed1",
    ]


# ------------------------------------------------------------------------ MaPLe, PromptSRC
def _cocoop_style(root, trainer, b2n_cfg, b2n_epoch, xd_cfg, xd_epoch, dataset, seed):
    """base2new_train/test and xd_train/test as MaPLe's and PromptSRC's scripts (CoCoOp's
    folders and arguments)."""
    common = f"{dataset}/shots_16/{trainer}/{b2n_cfg}/seed{seed}"
    head = (f"--root DATA --seed {seed} --trainer {trainer} "
            f"--dataset-config-file configs/datasets/{dataset}.yaml "
            f"--config-file configs/trainers/{trainer}/{b2n_cfg}.yaml")  # fmt: skip
    b2n = [
        _script(f"{head} --output-dir output/base2new/train_base/{common} "
                "DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES base", root),
        _script(f"{head} --output-dir output/base2new/test_new/{common} "
                f"--model-dir output/base2new/train_base/{common} --load-epoch {b2n_epoch} "
                "--eval-only DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES new", root),
    ]  # fmt: skip
    model = f"output/imagenet/{trainer}/{xd_cfg}_16shots/seed{seed}"
    cfg_path = f"configs/trainers/{trainer}/{xd_cfg}.yaml"
    train = _script(
        f"--root DATA --seed {seed} --trainer {trainer} --dataset-config-file "
        f"configs/datasets/imagenet.yaml --config-file {cfg_path} --output-dir {model} "
        "DATASET.NUM_SHOTS 16", root)  # fmt: skip

    def tests(targets):
        return [
            _script(
                f"--root DATA --seed {seed} --trainer {trainer} --dataset-config-file "
                f"configs/datasets/{t}.yaml --config-file {cfg_path} --output-dir "
                f"output/evaluation/{trainer}/{xd_cfg}_16shots/{t}/seed{seed} "
                f"--model-dir {model} --load-epoch {xd_epoch} --eval-only", root)
            for t in targets
        ]  # fmt: skip

    return b2n, [train, *tests(XD_TARGETS)], [train, *tests(DG_TARGETS)]


@pytest.mark.parametrize(
    "trainer, b2n_cfg, b2n_epoch, xd_cfg, xd_epoch",
    [
        # scripts/maple/: LOADEP 5; xd_test_maple.sh --load-epoch 2
        ("MaPLe", "vit_b16_c2_ep5_batch4_2ctx", 5,
         "vit_b16_c2_ep5_batch4_2ctx_cross_datasets", 2),
        # scripts/promptsrc/: LOADEP 20; xd_test.sh --load-epoch 20 (the shipped ep20 file;
        # the script's ep5 name is a file the original does not ship)
        ("PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", 20,
         "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets", 20),
    ],
)  # fmt: skip
def test_deep_prompt_methods_run_their_base2new_and_xd_scripts(
    tmp_path, capsys, trainer, b2n_cfg, b2n_epoch, xd_cfg, xd_epoch
):
    root = str(tmp_path)
    b2n, xd, dg = _cocoop_style(root, trainer, b2n_cfg, b2n_epoch, xd_cfg, xd_epoch, "eurosat", 2)
    common = ["--trainer", trainer, "--seeds", "2"]
    assert _dry(capsys, root, "base2new", *common, "--datasets", "eurosat") == b2n
    assert _dry(capsys, root, "xd", *common) == xd
    assert _dry(capsys, root, "dg", *common) == dg


def test_maple_ships_no_few_shot_script(tmp_path, capsys):
    err = _error(capsys, str(tmp_path), "fewshot", "--trainer", "MaPLe")
    assert "trainer MaPLe declares no config for the fewshot protocol" in err
    assert "protocols declared: base2new, dg, xd" in err


def test_promptsrc_fewshot_is_few_shot_sh_with_the_yamls_gpa_per_dataset(tmp_path, capsys):
    root = str(tmp_path)
    cmds = _dry(capsys, root, "fewshot", "--trainer", "PromptSRC", "--datasets",
                "caltech101,fgvc_aircraft", "--shots", "1,16", "--seeds", "1,3")  # fmt: skip
    cfg = "vit_b16_c2_ep50_batch4_4+4ctx_few_shot"
    gpa_45_5 = "TRAINER.PROMPTSRC.GPA_MEAN 45 TRAINER.PROMPTSRC.GPA_STD 5 "
    expected = []
    for d in ("caltech101", "fgvc_aircraft"):
        # the YAML's comment: GPA mean 45, std 5 for StanfordCars, Flowers102, FGVCAircraft,
        # DTD and EuroSAT; the file's 30/30 for the others
        gpa = "" if d == "caltech101" else gpa_45_5
        for k in (1, 16):
            for seed in (1, 3):
                expected.append(_script(
                    f"--root DATA --seed {seed} --trainer PromptSRC "
                    f"--dataset-config-file configs/datasets/{d}.yaml "
                    f"--config-file configs/trainers/PromptSRC/{cfg}.yaml "
                    f"--output-dir output/{d}/PromptSRC/{cfg}_{k}shots/seed{seed} "
                    f"{gpa}DATASET.NUM_SHOTS {k}", root))  # fmt: skip
    assert cmds == expected


def test_cocoop_ships_no_few_shot_script(tmp_path, capsys):
    err = _error(capsys, str(tmp_path), "fewshot", "--trainer", "CoCoOp")
    assert "trainer CoCoOp declares no config for the fewshot protocol" in err
    assert "pass --cfg NAME" in err


def test_a_bad_opts_declaration_is_one_clear_error(tmp_path, capsys, monkeypatch):
    class OddOpts(CLIPTrainer):
        config_dir = "CoOp"
        protocol_configs = {"base2new": "vit_b16_ctxv1"}
        protocol_opts = {"base2new_train.dtd": ("OPTIM.LR",)}

    monkeypatch.setitem(TRAINER_REGISTRY._obj_map, "OddOpts", OddOpts)
    err = _error(capsys, str(tmp_path), "base2new", "--trainer", "OddOpts", "--datasets", "dtd")
    assert "protocol_opts['base2new_train.dtd'] must alternate KEY and VALUE" in err
    assert err.startswith("coop-sweep: error: trainer OddOpts:")


# ------------------------------------------------------------------- a real sweep + report
def _read(out):
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def test_a_real_base2new_sweep_and_its_report(data_root, tiny_vit, tmp_path, capsys):
    """KgCoOp's base-to-new on the tiny fixtures (2 seeds, 1 epoch, in this process): base
    on the training runs' own test, new on their evaluations; the sweep's summary and
    coop-report give the runs' base, new and H."""
    from coop.report import main as report

    out = str(tmp_path / "output")
    opts = ["MODEL.BACKBONE.NAME", tiny_vit, "INPUT.SIZE", "(32, 32)", "TRAINER.COOP.PREC",
            "fp32", "DATALOADER.NUM_WORKERS", "0", "OPTIM.MAX_EPOCH", "1"]  # fmt: skip
    argv = ["base2new", "--root", data_root, "--trainer", "KgCoOp", "--datasets", "caltech101",
            "--seeds", "1,2", "--shots", "2", "--output", out, *opts]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    bases, news = [], []
    for seed in (1, 2):
        common = f"caltech101/shots_2_8.0/KgCoOp/vit_b16_ep100_ctxv1/seed{seed}"
        train = _read(os.path.join(out, "base2new", "train_base", common))
        test = _read(os.path.join(out, "base2new", "test_new", common))
        assert (train["subsample_classes"], test["subsample_classes"]) == ("base", "new")
        assert train["config"]["TRAINER"]["COOP"]["W"] == 8.0
        assert test["epoch"] == 1  # the last epoch's checkpoint was loaded
        bases.append(train["metrics"]["accuracy"])
        news.append(test["metrics"]["accuracy"])
    b, n = sum(bases) / 2, sum(news) / 2
    h = 2 * b * n / (b + n)
    assert (
        f"base-to-new caltech101 (KgCoOp, vit_b16_ep100_ctxv1, 2 shots): base {b:.2f}%, "
        f"new {n:.2f}%, H {h:.2f}% (2/2 seeds)"
    ) in printed.splitlines()

    assert report([out, "--format", "csv"]) == 0
    text = capsys.readouterr().out
    body = text.split("# base2new\n", 1)[1].split("\n\n", 1)[0]
    (row,) = list(csv.DictReader(io.StringIO(body)))
    assert (row["Dataset"], row["Method"], row["Shots"], row["Seeds (base/new)"]) == (
        "Caltech101", "KgCoOp", "2", "2/2"
    )  # fmt: skip
    assert float(row["Base (mean +- std)"]) == pytest.approx(b, abs=1e-4)
    assert float(row["New (mean +- std)"]) == pytest.approx(n, abs=1e-4)
    assert float(row["H"]) == pytest.approx(h, abs=1e-4)
