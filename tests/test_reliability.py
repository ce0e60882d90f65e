"""Reliability: a run killed at any point resumes to the same result; writes are atomic; a
full disk stops with one clear message; concurrent runs share a dataset root safely.

The kills are real: each run is a subprocess that gets SIGKILL, either from this test (when
its log shows a given ``epoch [e/E] batch [b/B]`` line) or from itself at an exact point (a
small wrapper patches a function to ``os.kill(os.getpid(), SIGKILL)``). The same command is
then run again to completion and compared with an uninterrupted run: equal results.json
metrics, bit-identical learned context, the same printed loss/lr lines, no temporary file.
All runs use one intra-op thread, so their float arithmetic is identical.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers_train import coop_argv, loss_lines, read_results

from coop.train import main

SHORT = ("OPTIM.MAX_EPOCH", "4", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "TRAIN.PRINT_FREQ", "1")

# KILL_AT: "none" | "slow" (0.15 s per batch, so the test can kill it from outside) |
# "eval" (at the first evaluator batch of the final test) |
# "write:<basename>:<n>" (the n-th write of <basename>, after the temporary file is complete
# and before it is renamed over the target) | "slow-fewshot" (sleep before drawing shots)
WRAPPER = r"""
import os, signal, sys, time

point = os.environ.get("KILL_AT", "none")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "slow":
    from coop.hosts import on_host
    from coop.trainers.coop import CoOp as CoOpMethod

    CoOp = on_host(CoOpMethod)  # the class that runs on the bundled engine

    orig_fb = CoOp.forward_backward

    def forward_backward(self, batch):
        time.sleep(0.15)
        return orig_fb(self, batch)

    CoOp.forward_backward = forward_backward
elif point == "eval":
    from coop.evaluation import Classification

    def process(self, mo, gt):
        die()

    Classification.process = process
elif point.startswith("write:"):
    import coop.io

    _, name, nth = point.split(":")
    orig_commit = coop.io._commit
    seen = [0]

    def commit(tmp, path):
        if os.path.basename(path) == name:
            seen[0] += 1
            if seen[0] == int(nth):
                die()
        orig_commit(tmp, path)

    coop.io._commit = commit
elif point == "slow-fewshot":
    from coop.data import DatasetBase

    orig = DatasetBase.generate_fewshot_dataset

    def generate(self, *a, **k):
        time.sleep(1.0)
        return orig(self, *a, **k)

    DatasetBase.generate_fewshot_dataset = generate

from coop.train import main

sys.exit(main(sys.argv[1:]))
"""


def _env(tmp_cache: str, kill_at: str = "none") -> dict:
    env = dict(os.environ)
    env.update(
        KILL_AT=kill_at,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        COOP_CACHE_DIR=tmp_cache,
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    return env


def _start(argv, cache, kill_at="none", cwd=None):
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *argv],
        env=_env(cache, kill_at),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def _wait(proc, timeout=240):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _argv(root, out, ckpt):
    return coop_argv(root, out, ckpt, 1, 4, *SHORT)


def _ctx(out):
    path = os.path.join(out, "prompt_learner", "model.pth.tar-4")
    return torch.load(path, weights_only=True)["state_dict"]["ctx"]


def _tmp_files(folder):
    return [
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".tmp")
    ]


def _resumed_log(out):
    logs = sorted(f for f in os.listdir(out) if f.startswith("log.txt-"))
    assert logs, "the rerun logs to a time-stamped file"
    return os.path.join(out, logs[-1])


# --------------------------------------------------------------------------------------------
# One uninterrupted run and four killed-then-rerun runs, made once for the module


KILL_POINTS = {
    "mid-epoch": "slow",  # SIGKILL from outside at "epoch [2/4] batch [3/5]"
    "during-eval": "eval",  # SIGKILL inside the final test
    "resume-write": "write:resume.pth.tar:2",  # SIGKILL mid-write of epoch 2's resume state
    "checkpoint-write": "write:model.pth.tar-4:1",  # SIGKILL mid-write of the last checkpoint
}


@pytest.fixture(scope="module")
def runs(caltech_root, tiny_vit, tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability")
    root = str(base / "data")
    shutil.copytree(caltech_root, root)
    cache = str(base / "feature_cache")
    ref = str(base / "ref")
    rc, err = _wait(_start(_argv(root, ref, tiny_vit), cache))
    assert rc == 0, err[-3000:]

    outs = {name: str(base / name) for name in KILL_POINTS}
    procs = {n: _start(_argv(root, outs[n], tiny_vit), cache, k) for n, k in KILL_POINTS.items()}
    # the mid-epoch run is killed from outside when its log reaches epoch 2, batch 3
    log = os.path.join(outs["mid-epoch"], "log.txt")
    deadline = time.time() + 180
    while time.time() < deadline and procs["mid-epoch"].poll() is None:
        if os.path.exists(log) and "epoch [2/4] batch [3/5]" in open(log).read():
            procs["mid-epoch"].kill()  # SIGKILL
            break
        time.sleep(0.02)
    killed = {}
    for name, proc in procs.items():
        rc, err = _wait(proc)
        assert rc == -9, (name, rc, err[-3000:])  # every run died by SIGKILL
        killed[name] = {
            "tmp_files": _tmp_files(outs[name]),
            "files": sorted(os.listdir(os.path.join(outs[name], "prompt_learner"))),
            "resume_epoch": _epoch(os.path.join(outs[name], "prompt_learner", "resume.pth.tar")),
            "log": open(os.path.join(outs[name], "log.txt")).read(),
        }
    # the same command again, to completion
    procs = {n: _start(_argv(root, outs[n], tiny_vit), cache) for n in KILL_POINTS}
    for name, proc in procs.items():
        rc, err = _wait(proc)
        assert rc == 0, (name, err[-3000:])
    return {"ref": ref, "outs": outs, "killed": killed, "root": root, "cache": cache}


def _epoch(path):
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=True)["epoch"]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_to_the_same_result(runs, point):
    ref, out = runs["ref"], runs["outs"][point]
    killed = runs["killed"][point]
    # where the kill happened
    if point == "mid-epoch":
        assert "epoch [2/4] batch [3/5]" in killed["log"]
        assert "epoch [4/4] batch [5/5]" not in killed["log"]
        assert killed["resume_epoch"] in (1, 2)
    elif point == "during-eval":
        assert "Evaluate on the *test* set" in killed["log"] and "=> result" not in killed["log"]
        assert killed["files"] == ["checkpoint", "model.pth.tar-4", "resume.pth.tar"]
    elif point == "resume-write":
        # epoch 2's state was complete in a temporary file; epoch 1's state is intact
        assert killed["resume_epoch"] == 1
        assert any(".resume.pth.tar." in p for p in killed["tmp_files"]), killed
    else:
        assert killed["resume_epoch"] == 3 and "model.pth.tar-4" not in killed["files"]
        assert any(".model.pth.tar-4." in p for p in killed["tmp_files"]), killed

    # the rerun ends exactly as the uninterrupted run
    assert read_results(out)["metrics"] == read_results(ref)["metrics"]
    assert torch.equal(_ctx(out), _ctx(ref))
    assert os.path.exists(os.path.join(out, "finished"))
    assert _tmp_files(out) == []  # no half-written file remains
    # resume.pth.tar is removed once the run has finished; Dassl's files stay
    assert sorted(os.listdir(os.path.join(out, "prompt_learner"))) == [
        "checkpoint",
        "model.pth.tar-4",
    ]
    # the rerun resumed (it did not start over) from the newest saved state, and printed the
    # uninterrupted run's lines from there on
    start = {"during-eval": 4, "resume-write": 1, "checkpoint-write": 3}.get(
        point, killed["resume_epoch"]
    )
    assert f"Previous epoch: {start}\n" in open(_resumed_log(out)).read()
    resumed = loss_lines(_resumed_log(out))
    ref_lines = loss_lines(os.path.join(ref, "log.txt"))
    assert len(ref_lines) == 20 and len(resumed) == (4 - start) * 5
    assert resumed == ref_lines[start * 5 :]


def test_lr_schedule_continues_after_resume(runs):
    """The resumed run prints the same lr (warm-up, then cosine) as the uninterrupted one."""
    out, ref = runs["outs"]["mid-epoch"], runs["ref"]
    log = open(_resumed_log(out)).read()
    prev = int(log.split("Previous epoch: ")[1].split()[0])
    assert "Loaded optimizer" in log and "Loaded scheduler" in log

    def lrs(path):
        return [
            line.split(" lr ")[1].split()[0] for line in open(path) if line.startswith("epoch [")
        ]

    ref_lrs = lrs(os.path.join(ref, "log.txt"))
    assert lrs(_resumed_log(out)) == ref_lrs[prev * 5 :]
    assert len(set(ref_lrs[prev * 5 :])) > 1  # the schedule moves on after the resume


def test_rerunning_a_finished_run_only_repeats_the_final_test(runs, tiny_vit):
    out = runs["outs"]["during-eval"]
    before = read_results(out)
    rc, err = _wait(_start(_argv(runs["root"], out, tiny_vit), runs["cache"]))
    assert rc == 0, err[-3000:]
    log = open(_resumed_log(out)).read()
    assert "only the final test is repeated" in log and "epoch [" not in log
    assert read_results(out)["metrics"] == before["metrics"]
    assert read_results(out)["epoch"] == before["epoch"] == 4


# --------------------------------------------------------------------------------------------
# A full disk while a checkpoint is written


def test_disk_full_during_checkpoint_keeps_the_previous_one(
    runs, tiny_vit, tmp_path, monkeypatch, capsys
):
    out = str(tmp_path / "full")
    monkeypatch.setenv("COOP_CACHE_DIR", runs["cache"])
    real_fsync = os.fsync
    writes = []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".resume.pth.tar." in os.path.basename(target):
            writes.append(target)
            if len(writes) == 2:  # epoch 2's resume state
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_argv(runs["root"], out, tiny_vit)) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        resume = os.path.join(out, "prompt_learner", "resume.pth.tar")
        assert lines[0].startswith(f"coop-train: error: Cannot write {resume}: the disk is full")
        assert (
            f"Error: Cannot write {resume}: the disk is full"
            in open(os.path.join(out, "log.txt")).read()
        )
        assert _tmp_files(out) == []
        ckpt = torch.load(resume, weights_only=True)  # the previous state is intact
        assert ckpt["epoch"] == 1 and torch.isfinite(ckpt["state_dict"]["ctx"]).all()
        assert not os.path.exists(os.path.join(out, "finished"))

        monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the same command resumes
        assert main(_argv(runs["root"], out, tiny_vit)) == 0
    finally:
        torch.set_num_threads(threads)
    assert "Previous epoch: 1" in open(_resumed_log(out)).read()
    assert read_results(out)["metrics"] == read_results(runs["ref"])["metrics"]
    assert torch.equal(_ctx(out), _ctx(runs["ref"]))


# --------------------------------------------------------------------------------------------
# Two runs started together on one dataset root without a few-shot cache


@pytest.mark.parametrize("with_split", [True, False], ids=["fewshot-cache", "split-and-cache"])
def test_concurrent_runs_share_one_dataset_root(caltech_root, tiny_vit, runs, tmp_path, with_split):
    """Both runs succeed; one draws (and, without a split file, generates the split) while the
    other waits on the lock and then reads the same files."""
    root = str(tmp_path / "data")
    shutil.copytree(caltech_root, root)
    ddir = os.path.join(root, "caltech-101")
    cache_file = os.path.join(ddir, "split_fewshot", "shot_4-seed_1.json")
    split_file = os.path.join(ddir, "split_zhou_Caltech101.json")
    assert not os.path.exists(cache_file)
    if not with_split:
        os.unlink(split_file)
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    # drawing the shots takes a second, so the second run surely finds the first one drawing
    procs = [_start(_argv(root, o, tiny_vit), runs["cache"], "slow-fewshot") for o in outs]
    for proc in procs:
        rc, err = _wait(proc)
        assert rc == 0, err[-3000:]
    logs = [open(os.path.join(o, "log.txt")).read() for o in outs]
    saved = [("Saving preprocessed few-shot data" in log) for log in logs]
    loaded = [("Loading preprocessed few-shot data" in log) for log in logs]
    assert sorted(saved) == [False, True] and sorted(loaded) == [False, True], logs
    assert any("Waiting for another process to finish writing" in log for log in logs)
    if not with_split:
        generated = [("Saved split to" in log) for log in logs]
        assert generated == saved  # the run that generated the split also drew the shots
        assert os.path.isfile(split_file)
    with open(cache_file, encoding="utf-8") as f:
        cached = json.load(f)
    assert _tmp_files(root) == []
    a, b = outs
    assert read_results(a)["metrics"] == read_results(b)["metrics"]
    assert torch.equal(_ctx(a), _ctx(b))
    if with_split:  # the same subsets and run as a run alone
        with open(
            os.path.join(runs["root"], "caltech-101", "split_fewshot", "shot_4-seed_1.json")
        ) as f:
            assert cached == json.load(f)
        assert read_results(a)["metrics"] == read_results(runs["ref"])["metrics"]
        assert torch.equal(_ctx(a), _ctx(runs["ref"]))


# --------------------------------------------------------------------------------------------
# --resume DIR: a killed run continues from its own newer state, not from DIR again


def test_resume_flag_prefers_the_runs_own_newer_state(runs, tiny_vit, tmp_path, monkeypatch):
    from coop.hosts import on_host
    from coop.trainers.coop import CoOp as CoOpMethod

    CoOp = on_host(CoOpMethod)  # the class that runs on the bundled engine

    monkeypatch.setenv("COOP_CACHE_DIR", runs["cache"])
    original = CoOp.after_epoch

    class Interrupted(Exception):
        pass

    def stop_after(epoch):
        def after_epoch(self):
            original(self)
            if self.epoch + 1 == epoch:
                raise Interrupted

        return after_epoch

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(CoOp, "after_epoch", stop_after(1))
        with pytest.raises(Interrupted):
            main(_argv(runs["root"], src, tiny_vit))
        monkeypatch.setattr(CoOp, "after_epoch", stop_after(3))
        with pytest.raises(Interrupted):  # resumes from src (epoch 1), killed after epoch 3
            main(["--resume", src, *_argv(runs["root"], dst, tiny_vit)])
        monkeypatch.setattr(CoOp, "after_epoch", original)
        assert main(["--resume", src, *_argv(runs["root"], dst, tiny_vit)]) == 0
    finally:
        torch.set_num_threads(threads)
    logs = sorted(f for f in os.listdir(dst) if f.startswith("log.txt"))
    assert "Previous epoch: 1" in open(os.path.join(dst, logs[0])).read()
    assert "Previous epoch: 3" in open(os.path.join(dst, logs[-1])).read()
    assert read_results(dst)["metrics"] == read_results(runs["ref"])["metrics"]
    assert torch.equal(_ctx(dst), _ctx(runs["ref"]))
