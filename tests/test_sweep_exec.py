"""The local executor (child processes, two at a time on a CPU), the runs' states on disk
(``coop-sweep status``), error records, ``--retry-failed``, and evaluations that wait for
their training run."""

from __future__ import annotations

import fcntl
import json
import os

from coop.sweep import main
from coop.sweep_exec import BLOCKED, ERROR_RECORD


def _opts(ckpt, epochs=2):
    return [
        "MODEL.BACKBONE.NAME", ckpt, "INPUT.SIZE", "(32, 32)", "TRAINER.COOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0", "OPTIM.MAX_EPOCH", str(epochs),
    ]  # fmt: skip


def _run_dir(out, seed, cfg="rn50_ep50", shots=1):
    return os.path.join(out, "caltech101", "CoOp", f"{cfg}_{shots}shots",
                        "nctx16_cscFalse_ctpend", f"seed{seed}")  # fmt: skip


def _corrupt_resume(run_dir):
    """A damaged resume checkpoint: the run stops with an error naming it."""
    os.makedirs(os.path.join(run_dir, "prompt_learner"))
    with open(os.path.join(run_dir, "prompt_learner", "resume.pth.tar"), "wb") as f:
        f.write(b"not a checkpoint")


def _record(run_dir):
    with open(os.path.join(run_dir, ERROR_RECORD), encoding="utf-8") as f:
        return json.load(f)


def test_local_executor_runs_two_at_a_time_and_a_failure_does_not_stop_the_others(
    data_root, tiny_rn, tmp_path, capsys
):
    out = str(tmp_path / "out")
    grid = ["--root", data_root, "--datasets", "caltech101", "--shots", "1", "--seeds",
            "1,2,3", "--output", out]  # fmt: skip
    _corrupt_resume(_run_dir(out, 2))
    assert main([*grid, "--executor", "local", "--max-parallel", "2", *_opts(tiny_rn)]) == 1
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    starts = [i for i, ln in enumerate(lines) if "] start caltech101 CoOp" in ln]
    ends = [i for i, ln in enumerate(lines) if "] done in " in ln]
    assert len(starts) == 3 and len(ends) == 2
    assert starts[1] < ends[0]  # two runs at a time
    for seed in (1, 3):  # the others went on
        assert os.path.isfile(os.path.join(_run_dir(out, seed), "finished"))
    failed = _run_dir(out, 2)
    assert not os.path.isfile(os.path.join(failed, "finished"))
    record = _record(failed)
    assert record["exit_status"] == 2 and "resume.pth.tar" in record["error"]
    assert "[2/3] failed (exit status 2)" in cap.err and f"coop-sweep: failed: {failed}" in cap.err
    # the child's output is kept next to its run
    with open(os.path.join(failed, ".sweep.console.txt"), encoding="utf-8") as f:
        assert "coop-train: error:" in f.read()

    # status: two done, one failed with its error
    assert main(["status", "fewshot", *grid]) == 1
    status = capsys.readouterr().out.splitlines()
    assert status[1].startswith(f"failed   {failed}  (exit status 2 on ")
    assert "resume.pth.tar" in status[1]
    assert status[-1] == "3 runs: 2 done, 0 running, 1 failed, 0 missing"

    # the damage repaired, --retry-failed runs only that run (in this process)
    stamps = {
        s: os.stat(os.path.join(_run_dir(out, s), "results.json")).st_mtime_ns for s in (1, 3)
    }
    os.remove(os.path.join(failed, "prompt_learner", "resume.pth.tar"))
    assert main([*grid, "--retry-failed", *_opts(tiny_rn)]) == 0
    printed = capsys.readouterr().out
    assert "Retrying 1 runs" in printed and "[1/1] done in " in printed
    assert os.path.isfile(os.path.join(failed, "finished"))
    assert not os.path.exists(os.path.join(failed, ERROR_RECORD))  # success clears it
    for seed, stamp in stamps.items():
        assert os.stat(os.path.join(_run_dir(out, seed), "results.json")).st_mtime_ns == stamp
    assert main(["status", "fewshot", *grid]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "3 runs: 3 done, 0 running, 0 failed, 0 missing"
    )


def test_evaluations_wait_for_their_training_run_and_not_for_a_failed_one(
    data_root, tiny_rn, tmp_path, capsys
):
    out = str(tmp_path / "out")
    argv = ["base2new", "--root", data_root, "--datasets", "caltech101", "--seeds", "1,2",
            "--cfg", "rn50_ep50", "--output", out]  # fmt: skip
    common = os.path.join("caltech101", "shots_16", "CoOp", "rn50_ep50")
    train = [os.path.join(out, "base2new", "train_base", common, f"seed{s}") for s in (1, 2)]
    test = [os.path.join(out, "base2new", "test_new", common, f"seed{s}") for s in (1, 2)]
    _corrupt_resume(train[1])
    assert main([*argv, "--executor", "local", "--max-parallel", "2", *_opts(tiny_rn)]) == 1
    cap = capsys.readouterr()
    # the runs in order: [1/4] train seed 1, [2/4] its evaluation, [3/4] train seed 2, [4/4];
    # the evaluation started once its training run had finished
    assert "[2/4] start caltech101 CoOp rn50_ep50 evaluation seed 1" in cap.out
    finished = os.stat(os.path.join(train[0], "finished")).st_mtime
    with open(os.path.join(test[0], ".sweep.console.txt"), encoding="utf-8") as f:
        started = float(f.readline().split("(unix ")[1].split(")")[0])
    assert started >= finished
    with open(os.path.join(test[0], "results.json"), encoding="utf-8") as f:
        assert json.load(f)["subsample_classes"] == "new"
    # the second seed's training failed: its evaluation is recorded as blocked, never run
    assert f"[4/4] not run: its prerequisite run {train[1]} has not finished" in cap.err
    record = _record(test[1])
    assert record["exit_status"] == BLOCKED and train[1] in record["error"]
    assert not os.path.exists(os.path.join(test[1], "log.txt"))

    # retry: the failed training run and the evaluation that needs it
    os.remove(os.path.join(train[1], "prompt_learner", "resume.pth.tar"))
    assert main([*argv, "--retry-failed", "--dry-run", *_opts(tiny_rn)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "# Retrying 2 runs"
    assert listing[1].startswith("# [1/2] failed before, runs again: ")
    assert listing[3].startswith("# [2/2] failed before, runs again after [1/2]: ")


def test_status_reads_each_runs_folder(data_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    grid = ["fewshot", "--root", data_root, "--datasets", "caltech101", "--shots", "1",
            "--seeds", "1,2,3,4", "--output", out]  # fmt: skip
    dirs = [_run_dir(out, s) for s in (1, 2, 3, 4)]
    os.makedirs(dirs[0])
    with open(os.path.join(dirs[0], "finished"), "w") as f:  # what a finished run leaves
        f.write("finished epoch 50\n")
    os.makedirs(dirs[1])
    fd = os.open(os.path.join(dirs[1], ".sweep.lock"), os.O_RDWR | os.O_CREAT)
    os.makedirs(dirs[2])
    with open(os.path.join(dirs[2], ERROR_RECORD), "w") as f:
        json.dump({"exit_status": 1, "error": "RuntimeError: boom", "host": "n7"}, f)
    with open(os.path.join(dirs[2], "log.txt"), "w") as f:
        f.write("started\n")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds it
        assert main(["status", *grid]) == 1
    finally:
        os.close(fd)
    assert capsys.readouterr().out.splitlines() == [
        f"done     {dirs[0]}",
        f"running  {dirs[1]}",
        f"failed   {dirs[2]}  (exit status 1 on n7: RuntimeError: boom)",
        f"missing  {dirs[3]}",
        "4 runs: 1 done, 1 running, 1 failed, 1 missing",
    ]
    # the lock released: that run is no longer running; status wrote nothing, and needs
    # no datasets folder (a login node without the data)
    grid[grid.index("--root") + 1] = str(tmp_path / "no_data_here")
    assert main(["status", *grid]) == 1
    assert capsys.readouterr().out.splitlines()[1] == f"missing  {dirs[1]}"
    assert not os.path.exists(dirs[3])
