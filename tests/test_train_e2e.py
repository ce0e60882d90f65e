"""End-to-end coop-train runs on the Caltech101 miniature with tiny CLIP checkpoints."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from helpers_train import coop_argv, loss_lines, read_results, zeroshot_argv

from coop.train import main


def test_console_script_trains_and_beats_zeroshot(data_root, learnable_clip, tmp_path):
    """The original command line (rn50.yaml: 200 epochs) through the installed console script."""
    out = str(tmp_path / "coop")
    exe = os.path.join(os.path.dirname(sys.executable), "coop-train")
    proc = subprocess.run(
        [exe, *coop_argv(data_root, out, learnable_clip)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    assert "Finish training" in log and "Deploy the last-epoch model" in log
    assert "* accuracy:" in log and "* macro_f1:" in log and "* error:" in log
    assert "epoch [200/200] batch [3/3]" in log  # 100 images / bs 32 -> 3 steps, drop_last
    # the seed line goes to the console only, as in the original
    assert "Setting fixed seed: 1" in proc.stdout and "Setting fixed seed" not in log

    ckpt_dir = os.path.join(out, "prompt_learner")
    assert sorted(os.listdir(ckpt_dir)) == ["checkpoint", "model.pth.tar-200"]
    assert open(os.path.join(ckpt_dir, "checkpoint")).read() == "model.pth.tar-200\n"
    ckpt = torch.load(os.path.join(ckpt_dir, "model.pth.tar-200"), weights_only=True)
    assert list(ckpt["state_dict"]) == ["ctx"]  # class-name token buffers are not stored
    assert ckpt["state_dict"]["ctx"].shape == (16, 64)
    assert ckpt["epoch"] == 200
    assert os.path.isdir(os.path.join(out, "tensorboard"))
    assert os.path.exists(os.path.join(out, "finished"))

    res = read_results(out)
    assert res["trainer"] == "CoOp" and res["num_shots"] == 16 and res["split"] == "test"
    assert res["config"]["OPTIM"]["MAX_EPOCH"] == 200
    assert res["total"] == 60
    assert f"* accuracy: {res['metrics']['accuracy']:.1f}%" in log

    zs_out = str(tmp_path / "zs")
    assert main(zeroshot_argv(data_root, zs_out, learnable_clip)) == 0
    zs = read_results(zs_out)
    assert zs["trainer"] == "ZeroshotCLIP"
    assert res["metrics"]["accuracy"] >= zs["metrics"]["accuracy"] + 20.0, (res, zs)


def _short(data_root, out, ckpt, seed=1, *extra):
    return coop_argv(
        data_root,
        out,
        ckpt,
        seed,
        4,
        "OPTIM.MAX_EPOCH",
        "4",
        "DATALOADER.TRAIN_X.BATCH_SIZE",
        "8",
        "TRAIN.PRINT_FREQ",
        "1",
        *extra,
    )


def test_same_seed_same_run_and_eval_only_reproduces(data_root, learnable_clip, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(_short(data_root, a, learnable_clip)) == 0
    assert main(_short(data_root, b, learnable_clip)) == 0
    la = loss_lines(os.path.join(a, "log.txt"))
    assert len(la) == 4 * 5  # 40 images / bs 8
    assert la == loss_lines(os.path.join(b, "log.txt"))
    ra, rb = read_results(a), read_results(b)
    assert ra["metrics"] == rb["metrics"]
    ca = torch.load(os.path.join(a, "prompt_learner", "model.pth.tar-4"), weights_only=True)
    cb = torch.load(os.path.join(b, "prompt_learner", "model.pth.tar-4"), weights_only=True)
    assert torch.equal(ca["state_dict"]["ctx"], cb["state_dict"]["ctx"])

    # a different seed picks other shots and another trajectory
    c = str(tmp_path / "c")
    assert main(_short(data_root, c, learnable_clip, 2)) == 0
    assert loss_lines(os.path.join(c, "log.txt")) != la

    # --eval-only with --model-dir/--load-epoch reproduces the in-training test exactly
    e = str(tmp_path / "e")
    argv = _short(data_root, e, learnable_clip)
    assert main(["--model-dir", a, "--load-epoch", "4", "--eval-only", *argv]) == 0
    assert read_results(e)["metrics"] == ra["metrics"]
    assert sorted(os.listdir(e)) == ["log.txt", "results.json"]  # no checkpoint, no tensorboard
    log = open(os.path.join(e, "log.txt"), encoding="utf-8").read()
    assert f'Loading weights to prompt_learner from "{a}/prompt_learner/model.pth.tar-4"' in log
    assert "Finish training" not in log


def test_seed_zero_is_honoured(data_root, learnable_clip, tmp_path):
    outs = []
    for name in ("z1", "z2"):
        out = str(tmp_path / name)
        assert main(_short(data_root, out, learnable_clip, 0)) == 0
        outs.append(out)
        assert read_results(out)["seed"] == 0
    assert loss_lines(os.path.join(outs[0], "log.txt")) == loss_lines(
        os.path.join(outs[1], "log.txt")
    )
    assert os.path.exists(
        os.path.join(data_root, "caltech-101", "split_fewshot", "shot_4-seed_0.json")
    )


def test_resume_after_interruption_matches_uninterrupted(
    data_root, learnable_clip, tmp_path, monkeypatch
):
    """Stop after epoch 2 (checkpoint every epoch), rerun the same command: same end state."""
    from coop.hosts import on_host
    from coop.trainers.coop import CoOp as CoOpMethod

    CoOp = on_host(CoOpMethod)  # the class that runs on the bundled engine

    full = str(tmp_path / "full")
    extra = ("TRAIN.CHECKPOINT_FREQ", "1")
    assert main(_short(data_root, full, learnable_clip, 1, *extra)) == 0

    part = str(tmp_path / "part")
    original_after_epoch = CoOp.after_epoch

    class Interrupted(Exception):
        pass

    def after_epoch_then_stop(self):
        original_after_epoch(self)
        if self.epoch == 1:
            raise Interrupted

    monkeypatch.setattr(CoOp, "after_epoch", after_epoch_then_stop)
    with pytest.raises(Interrupted):
        main(_short(data_root, part, learnable_clip, 1, *extra))
    monkeypatch.setattr(CoOp, "after_epoch", original_after_epoch)
    assert not os.path.exists(os.path.join(part, "finished"))
    assert open(os.path.join(part, "prompt_learner", "checkpoint")).read() == "model.pth.tar-2\n"

    assert main(_short(data_root, part, learnable_clip, 1, *extra)) == 0
    resumed_log = [f for f in os.listdir(part) if f.startswith("log.txt-")]
    assert resumed_log, "the second run logs to a time-stamped file"
    log2 = open(os.path.join(part, resumed_log[0]), encoding="utf-8").read()
    assert "Previous epoch: 2" in log2
    assert (
        loss_lines(os.path.join(part, resumed_log[0]))
        == loss_lines(os.path.join(full, "log.txt"))[2 * 5 :]
    )
    cf = torch.load(os.path.join(full, "prompt_learner", "model.pth.tar-4"), weights_only=True)
    cp = torch.load(os.path.join(part, "prompt_learner", "model.pth.tar-4"), weights_only=True)
    assert torch.equal(cf["state_dict"]["ctx"], cp["state_dict"]["ctx"])
    assert cf["optimizer"]["param_groups"][0]["lr"] == cp["optimizer"]["param_groups"][0]["lr"]
    assert read_results(full)["metrics"] == read_results(part)["metrics"]


@pytest.mark.parametrize(
    "extra,ctx_shape",
    [
        ((), (16, 64)),
        (("TRAINER.COOP.CSC", "True"), (10, 16, 64)),
        (("TRAINER.COOP.CLASS_TOKEN_POSITION", "middle", "TRAINER.COOP.N_CTX", "8"), (8, 64)),
        (("TRAINER.COOP.CLASS_TOKEN_POSITION", "front"), (16, 64)),
        (("TRAINER.COOP.CTX_INIT", "a photo of a"), (4, 64)),
        (("TRAINER.COOP.CTX_INIT", "a photo of a", "TRAINER.COOP.CSC", "True"), (10, 4, 64)),
    ],
)
def test_variants_train_and_save(data_root, tiny_vit, tmp_path, extra, ctx_shape):
    out = str(tmp_path / "v")
    argv = coop_argv(data_root, out, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "1", *extra)
    assert main(argv) == 0
    ckpt = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-1"), weights_only=True)
    assert tuple(ckpt["state_dict"]["ctx"].shape) == ctx_shape


@pytest.mark.parametrize("ckpt_name", ["tiny_vit_jit", "tiny_rn"])
def test_torchscript_and_resnet_checkpoints_train(data_root, request, tmp_path, ckpt_name):
    ckpt = request.getfixturevalue(ckpt_name)
    out = str(tmp_path / "o")
    assert main(coop_argv(data_root, out, ckpt, 1, 1, "OPTIM.MAX_EPOCH", "1")) == 0
    assert read_results(out)["total"] == 60


def test_zeroshot2_ensemble_runs(data_root, tiny_vit, tmp_path):
    out = str(tmp_path / "zs2")
    argv = zeroshot_argv(data_root, out, tiny_vit)
    argv[argv.index("ZeroshotCLIP")] = "ZeroshotCLIP2"
    assert main(argv) == 0
    assert read_results(out)["trainer"] == "ZeroshotCLIP2"


def test_old_format_checkpoint_loads_for_evaluation(data_root, tiny_vit, tmp_path):
    """A checkpoint as the original writes it (token buffers, pickled scheduler object)."""
    out = str(tmp_path / "a")
    assert main(coop_argv(data_root, out, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "1")) == 0
    ours = torch.load(os.path.join(out, "prompt_learner", "model.pth.tar-1"), weights_only=True)
    ctx = ours["state_dict"]["ctx"]
    opt = torch.optim.SGD([torch.nn.Parameter(ctx.clone())], lr=0.002, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1.0)
    legacy = {
        "state_dict": {
            "ctx": ctx.half(),
            "token_prefix": torch.zeros(10, 1, 64).half(),
            "token_suffix": torch.zeros(10, 60, 64).half(),
        },
        "epoch": 1,
        "optimizer": opt.state_dict(),
        "scheduler": {"successor": sched, "last_epoch": 1},
        "val_result": None,
    }
    old = tmp_path / "old"
    (old / "prompt_learner").mkdir(parents=True)
    torch.save(legacy, old / "prompt_learner" / "model.pth.tar-1")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old / "prompt_learner" / "model.pth.tar-1", weights_only=True)

    e = str(tmp_path / "e")
    argv = coop_argv(data_root, e, tiny_vit, 1, 2)
    assert main(["--eval-only", "--model-dir", str(old), "--load-epoch", "1", *argv]) == 0
    assert read_results(e)["total"] == 60


def test_checkpoint_of_other_class_count_is_refused(data_root, tiny_vit, tmp_path, capsys):
    out = str(tmp_path / "a")
    assert (
        main(
            coop_argv(
                data_root, out, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "1", "TRAINER.COOP.CSC", "True"
            )
        )
        == 0
    )
    e = str(tmp_path / "e")
    argv = coop_argv(
        data_root,
        e,
        tiny_vit,
        1,
        2,
        "DATASET.SUBSAMPLE_CLASSES",
        "base",
        "TRAINER.COOP.CSC",
        "True",
    )
    assert main(["--eval-only", "--model-dir", out, "--load-epoch", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "(10, 16, 64)" in err and "(5, 16, 64)" in err


def test_generic_context_loads_into_class_specific_model(data_root, tiny_vit, tmp_path):
    """The original trained CSC + CTX_INIT runs with one generic context: such a checkpoint
    evaluates in our class-specific model with the same predictions as the generic model."""
    gen = str(tmp_path / "gen")
    init = ("TRAINER.COOP.CTX_INIT", "a photo of a")
    assert main(coop_argv(data_root, gen, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "1", *init)) == 0
    e = str(tmp_path / "e")
    argv = coop_argv(data_root, e, tiny_vit, 1, 2, *init, "TRAINER.COOP.CSC", "True")
    assert main(["--eval-only", "--model-dir", gen, "--load-epoch", "1", *argv]) == 0
    assert read_results(e)["metrics"] == read_results(gen)["metrics"]
