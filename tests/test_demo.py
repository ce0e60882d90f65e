"""coop-demo (coop/demo.py): the paper's story on the embedded data, its three parts in
order, every number the one its run wrote."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from coop import demo

RUNS = "output"
COOP = "caltech101/CoOp/rn50_ep50_{k}shots/nctx16_cscFalse_ctpend/seed1"  # main.sh's folders
PROBE = "caltech101/LinearProbeCLIP/rn50_{k}shots/seed1"
ZEROSHOT = "ZeroshotCLIP/rn50/caltech101"  # zeroshot.sh's folder
PROMPTS = "prompt_study/rn50/caltech101"


def _accuracy(out, run):
    with open(os.path.join(out, RUNS, run, "results.json"), encoding="utf-8") as f:
        return json.load(f)["metrics"]["accuracy"]


def _row(lines, method):
    (row,) = [ln.split() for ln in lines if ln.split()[:1] == [method]]
    return row


def test_the_quick_demo_tells_the_three_parts_with_the_runs_numbers(
    learnable_clip, tmp_path, capsys, monkeypatch
):
    import torch

    out = str(tmp_path / "demo")
    argv = ["--quick", "--output-dir", out, "--backbone", learnable_clip]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    seen = []
    from coop.sweep_exec import InProcessExecutor

    real_run = InProcessExecutor.run
    monkeypatch.setattr(
        InProcessExecutor,
        "run",
        lambda s, r: seen.append(torch.get_num_threads()) or real_run(s, r),
    )
    assert demo.main(argv) == 0
    # the runs on one thread (the tiny model), the caller's thread count given back
    assert seen == [1] and torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    heads = ["(a) Prompt sensitivity", "(b) CoOp vs zero-shot CLIP vs linear-probe CLIP",
             "(c) What CoOp learned"]  # fmt: skip
    at = [printed.index("\n" + h) for h in heads]
    assert at == sorted(at)
    progress = printed[: at[0]]
    assert "6 runs in" in progress and progress.count("done in") == 6  # quiet: no run logs
    assert "epoch [" not in printed
    part_a, part_b, part_c = (printed[i:j] for i, j in zip(at, at[1:] + [len(printed)]))

    # (a) the prompt study's table; its "dataset's own" column is the zero-shot run
    with open(os.path.join(out, RUNS, PROMPTS, "prompt_study.json"), encoding="utf-8") as f:
        study = json.load(f)
    acc = study["rows"][0]["accuracy"]
    assert [c["spec"] for c in study["columns"]] == [
        "a [CLASS].", "a photo of [CLASS].", "a photo of a [CLASS].", "dataset", "ensemble",
    ]  # fmt: skip
    cells = _row(part_a.splitlines(), "Caltech101")[1:]
    assert cells == [f"{acc[c['spec']]:.2f}" for c in study["columns"]]
    zs = _accuracy(out, ZEROSHOT)
    assert acc["dataset"] == zs

    # (b) method x shots: each cell the run's results.json (one seed: the mean is the run)
    lines = part_b.splitlines()
    header = [ln for ln in lines if ln.startswith("Method")][0].split()
    assert header == ["Method", "Backbone", "Seeds", "0", "shots", "1", "shot", "4", "shots"]
    assert _row(lines, "ZeroshotCLIP")[2:] == ["1", f"{zs:.2f}", "-", "-"]
    coop = [_accuracy(out, COOP.format(k=k)) for k in (1, 4)]
    probe = [_accuracy(out, PROBE.format(k=k)) for k in (1, 4)]
    assert _row(lines, "CoOp")[2:] == ["1", "-", *(f"{a:.2f}" for a in coop)]
    assert _row(lines, "LinearProbeCLIP")[2:] == ["1", "-", *(f"{a:.2f}" for a in probe)]
    with open(os.path.join(out, RUNS, COOP.format(k=4), "results.json"), encoding="utf-8") as f:
        assert json.load(f)["config"]["OPTIM"]["MAX_EPOCH"] == demo.QUICK_EPOCHS
    for ext, magic in (("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF-")):
        path = os.path.join(out, "curves", f"Caltech101.{ext}")
        assert f"  {path}\n" in part_b
        with open(path, "rb") as f:
            assert f.read(len(magic)) == magic
    assert os.path.isfile(os.path.join(out, "report", "report.txt"))

    # (c) the nearest words of the 4-shot CoOp run's 16 context vectors
    with open(os.path.join(out, "nearest_words.json"), encoding="utf-8") as f:
        words = json.load(f)
    run_dir = os.path.join(out, RUNS, COOP.format(k=4))
    assert words["checkpoint"] == os.path.join(run_dir, "prompt_learner", "model.pth.tar-5")
    assert [p["position"] for p in words["positions"]] == list(range(1, 17))
    assert all(len(p["words"]) == demo.TOPK for p in words["positions"])
    first = words["positions"][0]
    assert f"1: {first['words']}" in part_c and "16: [" in part_c

    # again: every run is skipped, the story is the same
    assert demo.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("Oops! The results exist at") == 6 and "done in" not in again
    assert again[again.index("\n" + heads[0]) :] == printed[at[0] :]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--root", "/nonexistent/data"], "--root /nonexistent/data: no such folder"),
        (["--epochs", "0"], "--epochs must be positive, got 0"),
        (["--shots", "1,x"], "--shots takes comma-separated integers"),
    ],
)
def test_bad_input_is_one_clear_error(learnable_clip, tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    assert demo.main([*argv, "--output-dir", str(out), "--backbone", learnable_clip]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coop-demo: error: ") and message in err
    assert not (out / RUNS).exists()


def test_with_a_root_it_plans_the_paper_settings(data_root, tmp_path):
    args = demo.build_parser().parse_args(["--root", data_root, "--output-dir", str(tmp_path)])
    runs = demo.plan_runs(demo.Setting(args, str(tmp_path)), "out")
    (prompts,) = runs["prompts"]
    assert prompts.command == "coop-prompts" and prompts.out == "out/prompt_study/rn50/caltech101"
    zeroshot, *coop = runs["fewshot"]
    assert zeroshot.out == "out/ZeroshotCLIP/rn50/caltech101" and zeroshot.eval_only
    # COOP.md's schedule: 1 shot 50 epochs, 2 and 4 shots 100, 8 and 16 shots 200
    schedule = {1: "rn50_ep50", 2: "rn50_ep100", 4: "rn50_ep100", 8: "rn50", 16: "rn50"}
    assert [(r.shots, r.seed, r.cfg) for r in coop] == [
        (k, s, schedule[k]) for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)
    ]
    assert all(r.trainer == "CoOp" for r in coop)
    assert all("MODEL.BACKBONE.NAME" not in r.argv for r in coop)  # RN50 from the YAML
    probe = runs["linear-probe"]
    assert [(r.trainer, r.shots, r.seed, r.cfg) for r in probe] == [
        ("LinearProbeCLIP", k, s, "rn50") for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)
    ]
    assert all("TRAINER.LINEARPROBECLIP.NUM_STEP" not in r.argv for r in probe)
    vit = argparse.Namespace(**{**vars(args), "backbone": "ViT-B/16", "seeds": "1"})
    runs = demo.plan_runs(demo.Setting(vit, str(tmp_path)), "out")
    assert [r.cfg for r in runs["fewshot"][1:]] == [
        "vit_b16_ep50", "vit_b16_ep100", "vit_b16_ep100", "vit_b16", "vit_b16",
    ]  # fmt: skip
    assert runs["prompts"][0].cfg == "vit_b16" and runs["linear-probe"][0].cfg == "vit_b16"
