"""The benchmark script's own logic (its timings are not tested: they live in benchmarks/)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import run as bench  # noqa: E402


def test_class_names_of_the_cases():
    names = bench.benchmark_classnames(100)
    assert len(set(names)) == 100
    assert "face" in names and "car side" in names and all("_" not in n for n in names)
    many = bench.benchmark_classnames(1000)
    assert len(set(many)) == 1000
    assert bench.benchmark_classnames(1000) == many  # deterministic


@pytest.mark.parametrize(
    "value,target,result",
    [(3.0, (">=", 2.5), "PASS"), (2.0, (">=", 2.5), "FAIL"), (0.1, ("<=", 0.15), "PASS")],
)
def test_row_judges_against_the_target(value, target, result):
    r = bench.row("c", "s", 1.0, 1.0, value, target)
    assert r["result"] == result and r["passed"] == (result == "PASS")
    skipped = bench.row("c", "s", None, 1.0, None, target, skip="does not fit")
    assert skipped["passed"] is None and skipped["result"] == "SKIP (does not fit)"


def _child(fast: bool, limit: int, n_cls: int = 300, fast_opts=()) -> dict:
    spec = dict(quick=True, device="cpu", shape="RN50", n_cls=n_cls, fast=fast, threads=1)
    spec["limit"] = limit
    spec["fast_opts"] = list(fast_opts)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--memory-child"]
        + [json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_step_that_does_not_fit_under_the_cap_reports_instead_of_crashing():
    # the plain 300-class step needs ~780 MiB more than the fast one; cap between the two
    base = _child(fast=True, limit=0)
    cap = base["data_after"] + 300 * 2**20
    plain = _child(fast=False, limit=cap)
    assert plain["oom"] is True and plain["limit"] == cap
    assert "allocate" in plain["error"]
    fast = _child(fast=True, limit=cap)
    assert not fast.get("oom") and 0 < fast["extra"] < 300 * 2**20


def test_official_estimate_scales_only_the_epoch_loops_and_new_views():
    epochs = {1: 3, 16: 10}
    runs = [
        # 16 shots: 2 s of epoch loops at 10 epochs -> 40 s at 200; 1 s of other costs
        dict(shots=16, total=3.0, epochs=2.0, cache=0.0, views=0.0),
        # 1 shot with the cache: loops 0.3 s at 3 epochs -> 5 s at 50; 0.2 s computing one
        # view per image -> 2 s for ten; 0.1 s reading stored views; 0.4 s other costs
        dict(shots=1, total=1.0, epochs=0.6, cache=0.3, views=0.2),
    ]
    est = bench.official_estimate(runs, epochs, views=1)
    assert est == pytest.approx((1.0 + 40.0) + (0.4 + 0.3 * 50 / 3 + 0.1 + 2.0))


def test_run_main_reports_the_parts_of_a_run(tmp_path):
    plan = bench.make_plan(True, "cpu")
    plan.tmp = str(tmp_path)
    plan.run_clip = dict(arch="resnet", embed_dim=32, image_resolution=32, vision_width=64,
                         vision_layers=(1, 1, 1, 1), text_width=64, text_layers=1)  # fmt: skip
    env = bench._RunEnv(plan)
    data = env.data(3, 12)
    cache = ["FAST.CACHE_DIR", str(tmp_path / "cache"), "FAST.TRAIN_FEATURE_CACHE", "True"]
    argv = env.argv(data, str(tmp_path / "out1"), "OPTIM.MAX_EPOCH", "2", *cache, shots=4)
    t = bench.run_main(argv)
    assert t["views"] > 0  # a cold cache computes its views
    assert 0 < t["views"] <= t["cache"] <= t["epochs"] < t["total"]
    assert t["build"] > 0 and t["test"] > 0 and t["build"] + t["epochs"] < t["total"]
    # a second run of the same images computes no new views but reads them
    argv = env.argv(data, str(tmp_path / "out2"), "OPTIM.MAX_EPOCH", "2", *cache, shots=4)
    again = bench.run_main(argv)
    assert again["views"] == 0 and 0 < again["cache"] <= again["epochs"]
    plain = bench.run_main(env.argv(data, str(tmp_path / "out3"), "OPTIM.MAX_EPOCH", "1", shots=4))
    assert plain["cache"] == plain["views"] == 0 and plain["epochs"] > 0


def test_eval_process_times_whole_processes_side_by_side(tmp_path, capsys):
    plan = bench.make_plan(True, "cpu")
    plan.tmp = str(tmp_path)
    # a tiny ResNet CLIP (32 px) and 4 classes: 12 test images, one process per path
    tiny = bench.Shape("RN-tiny", (32, 32, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1), 2, 2)
    plan.shapes = {"RN50": tiny}
    plan.n_small, plan.reps, plan.warmup, plan.threads = 4, 1, 0, 1
    res = bench.case_eval_process(plan, bench._RunEnv(plan))
    (r,) = res["rows"]
    assert r["case"] == "eval_process" and r["setting"] == "RN-tiny 4 cls 12 imgs"
    assert r["target"] == [">=", 1.0] and r["result"] in ("PASS", "FAIL")
    assert r["value"] == pytest.approx(r["plain"] / r["fast"])
    for path in ("plain", "fast"):
        (t,) = res["times"]["RN-tiny"][path]
        assert min(t["wall"], t["user"], t["minflt"]) > 0 and t["maxrss"] > 2**20
    assert sorted(os.listdir(tmp_path)) == ["clip_RN_tiny.pt", "data_4x10_32px"]  # runs removed
    bench.print_row(r)
    out = capsys.readouterr().out
    assert out.startswith("eval_process     RN-tiny 4 cls 12 imgs")
    assert "whole coop-train --eval-only processes, each cold" in out


def test_linear_probe_times_the_original_path_against_a_cached_run(tmp_path):
    plan = bench.make_plan(True, "cpu")
    plan.tmp = str(tmp_path)
    plan.run_clip = dict(arch="vit", embed_dim=32, image_resolution=32)
    plan.sweep_classes, plan.sweep_per_class, plan.reps = 3, 34, 2
    res = bench.case_linear_probe(plan, bench._RunEnv(plan))
    (r,) = res["rows"]
    assert r["case"] == "linear_probe" and r["setting"] == "3 cls, 16 shots, per run"
    assert r["value"] == pytest.approx(r["plain"] / r["fast"]) and r["result"] == "-"
    times = res["times"]
    assert len(times["original"]) == len(times["cached"]) == 2
    # the same seeds in the same order: both paths reach the same test accuracy
    for orig, cached in zip(times["original"], times["cached"]):
        assert orig["accuracy"] == pytest.approx(cached["accuracy"])
        assert cached["cpu"] > 0 and cached["epochs"] < cached["total"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("linear_probe_")]


def test_sweep_runs_every_shot_count_for_the_chosen_seeds(tmp_path, monkeypatch):
    calls = []

    def fake_run_main(argv):
        seed = int(argv[argv.index("--seed") + 1])
        shots = int(argv[argv.index("DATASET.NUM_SHOTS") + 1])
        calls.append((seed, shots, "FAST.ENABLED" in argv))
        return dict(build=0.1, test=0.1, epochs=1.0, cache=0.0, views=0.0, total=1.5)

    plan = bench.make_plan(True, "cpu")
    plan.tmp = str(tmp_path)
    plan.sweep_seeds = bench.SEEDS[:1]
    env = bench._RunEnv(plan)
    monkeypatch.setattr(env, "data", lambda n, k: str(tmp_path))
    monkeypatch.setattr(env, "ckpt", lambda: "clip.pt")
    monkeypatch.setattr(bench, "run_main", fake_run_main)
    res = bench.case_sweep(plan, env)
    configs = len(res["totals"])
    assert len(calls) == len(bench.SHOTS) * configs
    assert {(s, k) for s, k, _ in calls} == {(1, k) for k in bench.SHOTS}
    assert sum(plain for *_, plain in calls) == len(bench.SHOTS)  # one plain run per shot count
    assert "5 shots x 1 seeds" in res["rows"][0]["setting"]
    assert res["rows"][0]["value"] == pytest.approx(1.0)


def test_sweep_seeds_out_of_range_is_refused():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--sweep-seeds", "4"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--sweep-seeds must be between 1 and 3, got 4" in out.stderr


def test_fast_opts_reach_the_fast_models_only(tmp_path):
    from coop.clip_adapter import load_clip
    from coop.testing.tiny_clip import save_tiny_clip

    clip = load_clip(save_tiny_clip(str(tmp_path / "c.pt"), arch="vit")).float()
    plan = bench.make_plan(True, "cpu")
    plan.fast_opts = ("FAST.TEXT", "truncate", "FAST.CUDA_GRAPHS", "True")
    shape = bench.Shape("tiny", (0, 32), 2, 2)  # only the resolution is read
    fast, _ = bench.build_coop(plan, clip, shape, ["a", "b c"], fast=True)
    plain, _ = bench.build_coop(plan, clip, shape, ["a", "b c"], fast=False)
    assert fast.text_mode == "truncate" and fast.text_encoder.cuda_graphs
    assert plain.text_mode == "plain" and not plain.text_encoder.cuda_graphs
    assert "fast opts FAST.TEXT truncate FAST.CUDA_GRAPHS True" in bench.machine_line(plan)


@pytest.mark.parametrize(
    "opt, message",
    [
        ("TRAIN.X=1", "--fast-opt takes FAST.KEY=VALUE, got 'TRAIN.X=1'"),
        ("FAST.NOPE=1", "Unknown config key 'FAST.NOPE' in --fast-opt"),
    ],
)
def test_bad_fast_opt_is_refused(opt, message):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--fast-opt", opt],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and message in out.stderr


def test_sweep_reuses_each_cached_view_as_often_as_the_official_schedule():
    # the sweep scales epochs and views by the same factor: a cached view serves as many
    # epochs as with the official 10 views at 50/100/200 epochs
    epochs, views = bench.sweep_schedule()
    assert views >= 1 and epochs[1] < bench.OFFICIAL_EPOCHS[1]
    for shots, official in bench.OFFICIAL_EPOCHS.items():
        assert epochs[shots] / views == official / bench.OFFICIAL_VIEWS
    # a factor the views cannot follow (10 / 20 rounds up to 1) would break that
    epochs, views = bench.sweep_schedule(20)
    assert views == 1 and epochs[1] / views != bench.OFFICIAL_EPOCHS[1] / bench.OFFICIAL_VIEWS


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_timing_shows_progress_on_a_terminal_only(monkeypatch, terminal):
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    plan = bench.make_plan(True, "cpu")
    calls = []

    def fn(name):  # slower than the bar's refresh interval (0.1 s), so each call shows
        return lambda: (time.sleep(0.12), calls.append(name))

    t = bench.bench(plan, {"a": fn("a"), "b": fn("b")}, reps=2, warmup=1, desc="case X")
    assert len(calls) == 6 and len(t["a"][1]) == len(t["b"][1]) == 2
    if terminal:
        assert "case X" in err.getvalue() and "6/6" in err.getvalue()
    else:
        assert err.getvalue() == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "--device takes cpu, cuda or cuda:N, got 'tpu'"),
        (["--threads", "-1"], "--threads must not be negative"),
        (["--warmup", "-2"], "--eval-batches and --threads must not be negative"),
        (["--cases", "train_step_100,bogus"], "unknown case(s) ['bogus']"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", *argv])
    assert e.value.code == 2
    err = capsys.readouterr()
    assert message in err.err and err.out == ""  # not even the machine line


def test_the_memory_step_runs_the_fast_path_that_fast_opt_asks_for():
    # each path's step runs in a fresh process: --fast-opt must reach it there too
    assert _child(fast=True, limit=0, n_cls=20)["text_mode"] == "shared_prefix"
    truncated = _child(fast=True, limit=0, n_cls=20, fast_opts=["FAST.TEXT", "truncate"])
    assert truncated["text_mode"] == "truncate"
    assert _child(fast=False, limit=0, n_cls=20)["text_mode"] == "plain"


def test_gpu_checks_runs_the_chosen_parts_and_goes_on_after_a_failure(tmp_path):
    fake = tmp_path / "python"  # stands in for the python: logs its arguments
    fake.write_text('#!/bin/sh\necho "$@" >> "$LOG"\n[ "$1 $2" = "-m pytest" ] && exit 3\nexit 0\n')
    fake.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(fake), LOG=str(log), PARTS="cuda_tests truncate")
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_checks.sh"), str(out)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[0].startswith("-m pytest")  # the failing part ...
    assert "--fast-opt FAST.TEXT=truncate" in calls[1]  # ... does not stop the next
    assert "== cuda_tests: exit 3" in proc.stdout and "== truncate: exit 0" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cuda_tests.txt", "truncate.txt"]
    env["PARTS"] = "full grpahs"  # a misspelled part: refused before anything runs
    bad = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_checks.sh"), str(tmp_path / "out2")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown part 'grpahs' in PARTS" in bad.stderr
    assert len(log.read_text().splitlines()) == 2 and not (tmp_path / "out2").exists()


def test_deep_prompts_times_maples_plain_and_fast_paths_side_by_side():
    plan = bench.make_plan(True, "cpu")
    # a tiny ViT CLIP (32 px, 3 blocks per tower) and 4 classes
    tiny = bench.Shape("ViT-tiny", (32, 32, 3, 64, 16, 77, 49408, 64, 1, 3), 2, 3)
    plan.shapes = {"ViT-B/16": tiny}
    plan.n_small, plan.reps, plan.warmup, plan.eval_batches = 4, 1, 0, 2
    res = bench.case_deep_prompts(plan)
    step, ev = res["rows"]
    assert step["setting"] == "MaPLe ViT-tiny 4 cls step b2"
    assert ev["setting"] == "MaPLe ViT-tiny 4 cls eval 2x3"
    for r in (step, ev):
        assert r["case"] == "deep_prompts" and r["target"] == [">=", 1.0]
        assert r["value"] == pytest.approx(r["plain"] / r["fast"])
    plain, fast = (bench.build_deep(plan, bench.build_clip(plan, tiny), tiny, ["a", "b"], f)[0]
                   for f in (False, True))  # fmt: skip
    assert type(plain.text_encoder).__name__ == "DeepTextEncoder"
    assert type(fast.text_encoder).__name__ == "TruncatedDeepTextEncoder"
    trained = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("prompt_learner.") for n in trained)


def test_cocoop_case_times_fast_against_plain_side_by_side(tmp_path):
    plan = bench.make_plan(True, "cpu")
    plan.tmp = str(tmp_path)
    # a tiny ViT CLIP (32 px, embed 32, text 64 wide, 1 layer each), 5 classes, test batch 3
    tiny = bench.Shape("ViT-tiny", (32, 32, 1, 64, 16, 77, 49408, 64, 1, 1), 2, 3)
    plan.shapes = {"ViT-B/16": tiny}
    plan.n_small, plan.reps, plan.warmup = 5, 1, 0
    res = bench.case_cocoop(plan, bench._Models(plan))
    train, evaluation = res["rows"]
    assert train["setting"] == "ViT-tiny 5 cls train b1"
    assert evaluation["setting"] == "ViT-tiny 5 cls eval b3"
    for r in (train, evaluation):
        assert r["case"] == "cocoop" and r["target"] == [">=", bench.COCOOP_TARGET]
        assert r["value"] == pytest.approx(r["plain"] / r["fast"])
        assert r["result"] in ("PASS", "FAIL")
    assert "text mode truncate" in train["note"]
    # at most 256 prompts per pass on a CPU: the whole test batch of 3 x 5 prompts at once
    assert evaluation["note"].startswith("3 images per text pass (at most 256 prompts)")
    times = res["times"]["ViT-tiny 5 cls eval b3"]
    assert set(times) == {"plain", "fast", "one_per_pass", "image"}
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())


def test_the_cocoop_models_take_the_plain_and_the_fast_path(tmp_path):
    from coop.clip_adapter import load_clip
    from coop.testing.tiny_clip import save_tiny_clip

    clip = load_clip(save_tiny_clip(str(tmp_path / "c.pt"), arch="vit")).float()
    plan = bench.make_plan(True, "cpu")
    shape = bench.Shape("tiny", (0, 32), 2, 2)  # only the resolution is read
    plain, _ = bench.build_cocoop(plan, clip, shape, ["a", "b c"], fast=False)
    fast, _ = bench.build_cocoop(plan, clip, shape, ["a", "b c"], fast=True)
    one, _ = bench.build_cocoop(plan, clip, shape, ["a", "b c"], True, ("FAST.CLASS_CHUNK", "2"))
    assert plain.text_encoder.text_mode == "loop" and fast.text_encoder.text_mode == "truncate"
    assert fast.text_encoder.images_per_pass(100) == 100  # 200 prompts: all in one pass
    assert fast.text_encoder.images_per_pass(1000) == 128  # 256 prompts per pass on a CPU
    assert fast.text_encoder.images_per_pass(1000, "cuda") == 512  # FAST.CLASS_CHUNK 1024
    assert one.text_encoder.images_per_pass(100) == 1
    assert one.text_encoder.images_per_pass(100, "cuda") == 1
    assert plain.prompt_learner.ctx.shape == (4, 64)  # "a photo of a", as the protocol's YAML
