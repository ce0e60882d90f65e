"""coop-sweep: scripts/main.sh's grid in one process, with the numbers of separate processes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from coop.sweep import main, paper_cfg


def _opts(ckpt: str, *extra: str):
    return [
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "TRAINER.COOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        "OPTIM.MAX_EPOCH", "2",
        *extra,
    ]  # fmt: skip


def _sweep(root, out, ckpt, *flags, shots="1", seeds="1,2", opts=()):
    argv = ["--root", root, "--datasets", "caltech101", "--shots", shots, "--seeds", seeds,
            "--output", out, *flags, *_opts(ckpt, *opts)]  # fmt: skip
    return main(argv)


def _run_dir(out, cfg, shots, seed):
    return os.path.join(out, "caltech101", "CoOp", f"{cfg}_{shots}shots",
                        "nctx16_cscFalse_ctpend", f"seed{seed}")  # fmt: skip


def _ctx(run_dir):
    (name,) = [f for f in os.listdir(os.path.join(run_dir, "prompt_learner")) if "model" in f]
    path = os.path.join(run_dir, "prompt_learner", name)
    return torch.load(path, weights_only=True)["state_dict"]["ctx"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        return json.load(f)["metrics"]


def test_the_paper_schedule_picks_the_config_per_shot_count():
    assert [paper_cfg("rn50", k, "caltech101") for k in (1, 2, 4, 8, 16)] == [
        "rn50_ep50", "rn50_ep100", "rn50_ep100", "rn50", "rn50",
    ]  # fmt: skip
    assert {paper_cfg("vit_b16", k, "imagenet") for k in (1, 2, 4, 8, 16)} == {"vit_b16_ep50"}


def test_dry_run_prints_main_sh_commands(data_root, tiny_rn, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _sweep(data_root, out, tiny_rn, "--dry-run", shots="2,16", seeds="3") == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [ln for ln in printed if not ln.startswith("#")]  # the commands; comments say more
    assert len(lines) == 2 and not os.path.exists(out)
    assert printed[0].startswith("# [1/2] to run: ") and printed[0].endswith(
        _run_dir(out, "rn50_ep100", 2, 3)
    )
    assert printed[-1] == "# 2 runs: 0 done, 0 running, 0 failed, 2 missing"
    cmd = shlex.split(lines[0])
    assert cmd[:3] == ["coop-train", "--root", data_root]
    # the folder and arguments of main.sh (caltech101 rn50_ep100 end 16 2 False), seed 3
    assert cmd[cmd.index("--output-dir") + 1] == _run_dir(out, "rn50_ep100", 2, 3)
    assert cmd[cmd.index("--config-file") + 1] == "configs/trainers/CoOp/rn50_ep100.yaml"
    assert cmd[cmd.index("--dataset-config-file") + 1] == "configs/datasets/caltech101.yaml"
    pairs = dict(
        zip(
            cmd[cmd.index("TRAINER.COOP.N_CTX") :: 2], cmd[cmd.index("TRAINER.COOP.N_CTX") + 1 :: 2]
        )
    )
    assert pairs["TRAINER.COOP.N_CTX"] == "16" and pairs["TRAINER.COOP.CSC"] == "False"
    assert pairs["TRAINER.COOP.CLASS_TOKEN_POSITION"] == "end"
    assert pairs["DATASET.NUM_SHOTS"] == "2" and pairs["OPTIM.MAX_EPOCH"] == "2"
    assert shlex.split(lines[1])[shlex.split(lines[1]).index("--config-file") + 1].endswith(
        "CoOp/rn50.yaml"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--datasets", "caltech102"], "unknown dataset 'caltech102'"),
        (["--backbone", "rn101", "--shots", "2"], "no trainer config 'rn101_ep100'"),
        (["--shots", "1,x"], "--shots takes comma-separated integers"),
        (["--shots", "0"], "--shots must be positive"),
        (["--csc", "yes"], "--csc is False or True"),
        (["--ctp", "start"], "--ctp is end, middle or front"),
        (["--root", "/nonexistent/data"], "--root /nonexistent/data: no such folder"),
        (["OPTIM.MAX_EPOCHS", "3"], "OPTIM.MAX_EPOCHS"),
    ],
)
def test_bad_arguments_stop_before_any_run(data_root, tmp_path, capsys, flags, message):
    out = str(tmp_path / "out")
    argv = ["--root", data_root, "--datasets", "caltech101", "--output", out]
    for flag, value in zip(flags[0::2], flags[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("coop-sweep: error: ") and message in err
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "extra",
    [
        (),
        # loader workers (persistent, re-seeded per epoch) and the opt-in training cache
        (
            "DATALOADER.NUM_WORKERS",
            "2",
            "FAST.TRAIN_FEATURE_CACHE",
            "True",
            "FAST.TRAIN_CACHE_VIEWS",
            "2",
        ),
    ],  # fmt: skip
    ids=["default", "workers+train_cache"],
)
def test_runs_in_one_process_equal_separate_processes(data_root, tiny_rn, tmp_path, capsys, extra):
    out = str(tmp_path / "out")
    extra = (*extra, "FAST.CACHE_DIR", str(tmp_path / "cache"))
    assert _sweep(data_root, out, tiny_rn, opts=extra) == 0
    printed = capsys.readouterr().out
    first, second = (_run_dir(out, "rn50_ep50", 1, s) for s in (1, 2))
    for d in (first, second):
        assert os.path.isfile(os.path.join(d, "finished"))

    # seed 2 ran after seed 1 in the same process; now alone, in a fresh one
    alone = str(tmp_path / "alone")
    argv = [
        "--root", data_root, "--seed", "2", "--trainer", "CoOp",
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", "configs/trainers/CoOp/rn50_ep50.yaml", "--output-dir", alone,
        "TRAINER.COOP.N_CTX", "16", "TRAINER.COOP.CSC", "False",
        "TRAINER.COOP.CLASS_TOKEN_POSITION", "end", "DATASET.NUM_SHOTS", "1",
        *_opts(tiny_rn, *extra),
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "coop.train", *argv], check=True, capture_output=True)
    assert _metrics(second) == _metrics(alone)
    assert torch.equal(_ctx(second), _ctx(alone))
    assert not torch.equal(_ctx(first), _ctx(second))  # the seeds differ

    accs = [_metrics(d)["accuracy"] for d in (first, second)]
    expected = f"* accuracy: {np.mean(accs):.2f}% +- {np.std(accs):.2f}% (2 of 2 seeds)"
    assert f"{os.path.dirname(first)}: {expected}" in printed


def test_finished_runs_are_skipped_and_a_failure_stops_the_sweep(
    data_root, tiny_rn, tmp_path, capsys
):
    out = str(tmp_path / "out")
    assert _sweep(data_root, out, tiny_rn, seeds="1") == 0
    done = _run_dir(out, "rn50_ep50", 1, 1)
    stamp = os.stat(os.path.join(done, "results.json")).st_mtime_ns
    capsys.readouterr()
    # seed 1 is finished; seeds 2 and 3 fail (the checkpoint does not exist)
    missing = str(tmp_path / "missing.pt")
    argv = ["--root", data_root, "--datasets", "caltech101", "--shots", "1", "--seeds",
            "1,2,3", "--output", out, *_opts(missing)]  # fmt: skip
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert f"Oops! The results exist at {done} (so skip this job)" in cap.out
    assert os.stat(os.path.join(done, "results.json")).st_mtime_ns == stamp
    assert cap.err.count("coop-sweep: failed:") == 1  # stopped at seed 2
    assert "missing.pt" in cap.err
    assert main([*argv[:8], "--keep-going", *argv[8:]]) == 1
    assert capsys.readouterr().err.count("coop-sweep: failed:") == 2  # seeds 2 and 3


def test_zeroshot_baseline_runs_first_as_zeroshot_sh(data_root, tiny_rn, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _sweep(data_root, out, tiny_rn, "--zeroshot", "--dry-run", seeds="1") == 0
    first, second = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    zs_dir = os.path.join(out, "ZeroshotCLIP", "rn50", "caltech101")
    # zeroshot.sh caltech101 rn50: no seed, no shots, eval only
    assert shlex.split(first)[:12] == [
        "coop-train", "--root", data_root, "--trainer", "ZeroshotCLIP",
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", "configs/trainers/CoOp/rn50.yaml", "--output-dir", zs_dir,
        "--eval-only",
    ]  # fmt: skip
    assert "--seed" not in shlex.split(first) and "DATASET.NUM_SHOTS" not in first
    assert "--trainer CoOp" in second

    assert _sweep(data_root, out, tiny_rn, "--zeroshot", seeds="1") == 0
    printed = capsys.readouterr().out
    acc = _metrics(zs_dir)["accuracy"]
    assert f"{zs_dir}: * accuracy: {acc:.2f}%" in printed
    stamp = os.stat(os.path.join(zs_dir, "results.json")).st_mtime_ns
    assert _sweep(data_root, out, tiny_rn, "--zeroshot", seeds="1") == 0
    assert f"Oops! The results exist at {zs_dir} (so skip this job)" in capsys.readouterr().out
    assert os.stat(os.path.join(zs_dir, "results.json")).st_mtime_ns == stamp


def test_a_run_locked_by_another_process_is_skipped(data_root, tiny_rn, tmp_path, capsys):
    import fcntl

    out = str(tmp_path / "out")
    busy = _run_dir(out, "rn50_ep50", 1, 2)
    os.makedirs(busy)
    fd = os.open(os.path.join(busy, ".sweep.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running coop-sweep holds it
        assert _sweep(data_root, out, tiny_rn, seeds="1,2,3") == 0
    finally:
        os.close(fd)
    printed = capsys.readouterr().out
    assert f"[2/3] running in another process, skipped: {busy}" in printed
    assert not os.path.exists(os.path.join(busy, "log.txt"))
    for seed in (1, 3):
        assert os.path.isfile(os.path.join(_run_dir(out, "rn50_ep50", 1, seed), "finished"))
    assert "(2 of 3 seeds)" in printed
    # released: the next sweep runs it and skips the others
    assert _sweep(data_root, out, tiny_rn, seeds="1,2,3") == 0
    assert os.path.isfile(os.path.join(busy, "finished"))


def test_two_sweeps_share_one_grid(data_root, tiny_rn, tmp_path):
    out = str(tmp_path / "out")
    argv = [sys.executable, "-m", "coop.sweep", "--root", data_root, "--datasets",
            "caltech101", "--shots", "1,2", "--seeds", "1,2", "--output", out,
            *_opts(tiny_rn)]  # fmt: skip
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    dirs = [_run_dir(out, cfg, k, s) for cfg, k in (("rn50_ep50", 1), ("rn50_ep100", 2))
            for s in (1, 2)]  # fmt: skip
    for d in dirs:
        assert os.path.isfile(os.path.join(d, "finished"))
        assert [f for f in os.listdir(d) if f.startswith("log.txt")] == ["log.txt"]  # one run
    done = [line for text in outputs for line in text.splitlines() if " done in " in line]
    assert len(done) == len(dirs)  # every run made exactly once, by one of the two


def test_the_prompts_preset_runs_coop_prompts(data_root, tiny_vit, tmp_path, capsys):
    from coop import prompt_study

    out = str(tmp_path / "out")
    opts = ["MODEL.BACKBONE.NAME", tiny_vit, "INPUT.SIZE", "(32, 32)",
            "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    argv = ["prompts", "--root", data_root, "--datasets", "caltech101", "--output", out]
    assert main([*argv, "--quiet", *opts]) == 0
    printed = capsys.readouterr().out
    run_dir = os.path.join(out, "prompt_study", "rn50", "caltech101")
    with open(os.path.join(run_dir, "prompt_study.json"), encoding="utf-8") as f:
        table = json.load(f)

    # the table of coop-prompts run by hand with the same arguments
    alone = str(tmp_path / "alone")
    assert prompt_study.main(["--root", data_root, "--dataset", "caltech101", "--config-file",
                              "configs/trainers/CoOp/rn50.yaml", "--output-dir", alone,
                              *opts]) == 0  # fmt: skip
    with open(os.path.join(alone, "prompt_study.json"), encoding="utf-8") as f:
        assert json.load(f) == table
    acc = table["rows"][0]["accuracy"]
    assert f"{run_dir}: a [CLASS].: {acc['a [CLASS].']:.2f}%; " in printed
    # quiet: the run's own output is in its console file, not on the terminal
    assert "Zero-shot CLIP (" not in printed
    with open(os.path.join(run_dir, ".sweep.console.txt"), encoding="utf-8") as f:
        assert "Zero-shot CLIP (" in f.read()

    capsys.readouterr()
    assert main(["status", *argv, *opts]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"done     {run_dir}"
    assert main([*argv, *opts]) == 0
    assert f"Oops! The results exist at {run_dir} (so skip this job)" in capsys.readouterr().out


def test_a_failed_prompt_study_is_recorded_with_its_error(data_root, tiny_vit, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["prompts", "--root", data_root, "--datasets", "dtd", "--output", out,
            "MODEL.BACKBONE.NAME", tiny_vit]  # fmt: skip
    assert main([*argv[:7], "--quiet", *argv[7:]]) == 1
    err = capsys.readouterr().err
    run_dir = os.path.join(out, "prompt_study", "rn50", "dtd")
    console = os.path.join(run_dir, ".sweep.console.txt")
    assert f"(its output: {console})" in err and "coop-prompts: error: " in err
    assert main(["status", *argv]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert (
        line.startswith(f"failed   {run_dir}  (exit status 2") and "coop-prompts: error: " in line
    )
