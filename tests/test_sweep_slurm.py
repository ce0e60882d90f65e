"""The Slurm executor against a real one-node Slurm (munged, slurmctld and slurmd started by
the test; skipped, with the reason, where they cannot start): a sweep submitted as a job
array finishes every run, a pre-empted run is requeued and ends as an uninterrupted one, and
an evaluation array waits for its training array."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from coop.sweep import main
from coop.sweep_slurm import parse_extra, parse_time

pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from coop.testing.slurm_cluster import SlurmCluster, SlurmUnavailable

    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster here: {e}")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", cluster.conf)  # sbatch, squeue, scontrol of the sweep
    yield cluster
    mp.undo()
    cluster.stop()


def _opts(ckpt, epochs):
    return [
        "MODEL.BACKBONE.NAME", ckpt, "INPUT.SIZE", "(32, 32)", "TRAINER.COOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0", "OPTIM.MAX_EPOCH", str(epochs),
    ]  # fmt: skip


def _slurm_flags(out):
    return [
        "--executor", "slurm", "--gpus-per-run", "0", "--cpus-per-run", "1",
        "--slurm-array-parallelism", "2", "--time", "30",
        "--slurm-folder", os.path.join(out, ".slurm", "%j"),
    ]  # fmt: skip


def _run_dir(out, cfg, shots, seed):
    return os.path.join(out, "caltech101", "CoOp", f"{cfg}_{shots}shots",
                        "nctx16_cscFalse_ctpend", f"seed{seed}")  # fmt: skip


def _wait(predicate, timeout_s, what, cluster):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    queue = cluster.run("squeue", "-o", "%i %T %r")
    raise AssertionError(f"timed out waiting for {what}; queue:\n{queue}")


def _ctx(run_dir, epoch):
    path = os.path.join(run_dir, "prompt_learner", f"model.pth.tar-{epoch}")
    return torch.load(path, weights_only=True)["state_dict"]["ctx"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        return json.load(f)["metrics"]


def _job_ids(printed):
    return [
        line.split()[3] for line in printed.splitlines() if line.startswith("Submitted job array")
    ]


def test_slurm_options_parse():
    assert [parse_time(t) for t in ("90", "4:00:00", "1-12", "1-00:30", "10:30", "0:59:01")] == [
        90, 240, 2160, 1470, 11, 60,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a Slurm time"):
        parse_time("2h")
    assert parse_extra(["qos=high", "--constraint=a100"]) == {"qos": "high", "constraint": "a100"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_extra(["exclusive"])


def test_a_sweep_array_finishes_and_a_preempted_run_resumes_to_the_same_result(
    slurm, data_root, tiny_rn, tmp_path, capsys
):
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    epochs = 6
    grid = ["--root", data_root, "--datasets", "caltech101", "--shots", "1,2", "--seeds", "1,2"]
    assert main([*grid, "--output", out, *_slurm_flags(out), *_opts(tiny_rn, epochs)]) == 0
    (array,) = _job_ids(capsys.readouterr().out)
    # the reference: the same run of (2 shots, seed 1), uninterrupted, as its own job
    assert main(["--root", data_root, "--datasets", "caltech101", "--shots", "2", "--seeds", "1",
                 "--output", ref, *_slurm_flags(ref), *_opts(tiny_rn, epochs)]) == 0  # fmt: skip
    capsys.readouterr()

    # pre-empt the run of (2 shots, seed 1) once it has a finished epoch (task 2 of the
    # array: the runs go dataset, shots, seed): Slurm sends submitit's signal (USR2)
    victim = _run_dir(out, "rn50_ep100", 2, 1)
    resume = os.path.join(victim, "prompt_learner", "resume.pth.tar")
    _wait(lambda: os.path.isfile(resume), 120, "the victim's first epoch", slurm)
    assert not os.path.isfile(os.path.join(victim, "finished"))
    slurm.run("scancel", "--signal=USR2", f"{array}_2")

    dirs = [_run_dir(out, cfg, k, s) for cfg, k in (("rn50_ep50", 1), ("rn50_ep100", 2))
            for s in (1, 2)]  # fmt: skip
    _wait(lambda: all(os.path.isfile(os.path.join(d, "finished")) for d in dirs), 150,
          "the sweep's runs", slurm)  # fmt: skip
    reference = _run_dir(ref, "rn50_ep100", 2, 1)
    _wait(lambda: os.path.isfile(os.path.join(reference, "finished")), 60, "the reference", slurm)

    # it was requeued (the same job started twice) and resumed from its own checkpoint
    job = slurm.run("scontrol", "show", "job", f"{array}_2")
    assert "Restarts=1" in job, job
    logs = sorted(f for f in os.listdir(victim) if f.startswith("log.txt"))
    assert len(logs) == 2  # the first start's log.txt, then the resumed run's
    with open(os.path.join(victim, logs[1]), encoding="utf-8") as f:
        assert "(will resume training)" in f.read()
    # ... and ended exactly as the uninterrupted run
    assert _metrics(victim) == _metrics(reference)
    assert torch.equal(_ctx(victim, epochs), _ctx(reference, epochs))
    for d in dirs:
        assert _metrics(d)["accuracy"] >= 0

    assert main(["status", "fewshot", *grid, "--output", out]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == "4 runs: 4 done, 0 running, 0 failed, 0 missing"
    # a second submission finds nothing to do
    assert main([*grid, "--output", out, *_slurm_flags(out), *_opts(tiny_rn, epochs)]) == 0
    assert "Nothing to submit" in capsys.readouterr().out


def test_the_evaluation_array_runs_after_the_training_array(
    slurm, data_root, tiny_rn, tmp_path, capsys
):
    out = str(tmp_path / "out")
    argv = ["base2new", "--root", data_root, "--datasets", "caltech101", "--seeds", "1",
            "--cfg", "rn50_ep50", "--output", out, *_slurm_flags(out), "--wait",
            *_opts(tiny_rn, 2)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train_array, test_array = _job_ids(printed)
    assert f"after job afterany:{train_array}" in printed
    shots = "shots_16/CoOp/rn50_ep50/seed1"
    train = os.path.join(out, "base2new", "train_base", "caltech101", shots)
    test = os.path.join(out, "base2new", "test_new", "caltech101", shots)
    assert os.path.isfile(os.path.join(train, "finished"))
    with open(os.path.join(test, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    assert res["subsample_classes"] == "new" and res["split"] == "test"
    # the evaluation started only after the training run had ended
    started = os.stat(os.path.join(test, "log.txt")).st_mtime
    assert started >= os.stat(os.path.join(train, "finished")).st_mtime
    acc = res["metrics"]["accuracy"]
    assert f"{os.path.dirname(test)}: * accuracy: {acc:.2f}% +- 0.00% (1 of 1 seeds)" in printed
