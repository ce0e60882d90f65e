"""coop-parse: parse_test_res.py's reading of the runs' log.txt files."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from coop.parse_results import main

TRAIN_LOG = """epoch [1/2] batch [1/1] loss 1.0 acc 50.0
* accuracy: 11.0%
Finish training
Deploy the last-epoch model
=> result
* total: 100
* correct: {c}
* accuracy: {acc}%
* error: {err}%
* macro_f1: {f1}%
"""


def _write(folder, text):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w", encoding="utf-8") as f:
        f.write(text)


def _train_logs(root, accs, f1s):
    for i, (acc, f1) in enumerate(zip(accs, f1s), 1):
        _write(
            os.path.join(root, f"seed{i}"),
            TRAIN_LOG.format(c=int(acc), acc=acc, err=100 - acc, f1=f1),
        )


def test_seed_values_mean_and_population_std(tmp_path, capsys):
    root = str(tmp_path / "exp")
    accs, f1s = [91.5, 92.25, 90.0], [90.1, 91.0, 89.9]
    _train_logs(root, accs, f1s)
    _write(os.path.join(root, ".hidden"), "Finish training\n* accuracy: 0.0%\n")
    with open(os.path.join(root, "seed1", "log.txt-2026-01-01-00-00-00"), "w") as f:
        f.write("Finish training\n* accuracy: 1.0%\n")  # a time-stamped copy: not read
    assert main([root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"file: {os.path.join(root, f'seed{i}', 'log.txt')}. accuracy: {a:.2f}%. "
        for i, a in enumerate(accs, 1)
    ]
    assert lines[3:] == [
        "===",
        f"Summary of directory: {root}",
        f"* accuracy: {np.mean(accs):.2f}% +- {np.std(accs):.2f}%",
        "===",
    ]
    assert main([root, "--keyword", "macro_f1", "--ci95"]) == 0
    ci = 1.96 * np.std(f1s) / math.sqrt(3)
    assert f"* macro_f1: {np.mean(f1s):.2f}% +- {ci:.2f}%" in capsys.readouterr().out


def test_only_lines_from_the_end_signal_on_count_and_the_last_match_wins(tmp_path, capsys):
    root = str(tmp_path / "exp")
    # the 11.0% before "Finish training" is ignored; of the two after it the last wins
    _write(os.path.join(root, "seed1"), TRAIN_LOG.format(c=80, acc=80.0, err=20.0, f1=79.0)
           + "=> result\n* accuracy: 82.5%\n")  # fmt: skip
    assert main([root]) == 0
    assert "accuracy: 82.50%. " in capsys.readouterr().out
    # an evaluation-only log has no "Finish training": it needs --test-log
    _write(os.path.join(root, "seed1"), "* accuracy: 5.0%\n=> result\n* accuracy: 70.0%\n")
    assert main([root]) == 2
    assert "evaluation-only runs need --test-log" in capsys.readouterr().err
    assert main([root, "--test-log"]) == 0
    assert f"* accuracy: {70.0:.2f}% +- 0.00%" in capsys.readouterr().out


def test_multi_exp_averages_the_experiments_means(tmp_path, capsys):
    base = tmp_path / "many"
    _train_logs(str(base / "expA"), [80.0, 82.0], [0, 0])
    _train_logs(str(base / "expB"), [60.0, 61.0, 65.0], [0, 0, 0])
    assert main([str(base), "--multi-exp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "Average performance",
        f"* accuracy: {np.mean([np.mean([80, 82]), np.mean([60, 61, 65])]):.2f}%",
    ]
    assert sum(line.startswith("Summary of directory: ") for line in out) == 2


@pytest.mark.parametrize("case", ["missing_log", "no_folder", "no_results"])
def test_bad_folders_get_one_clear_error(tmp_path, capsys, case):
    root = tmp_path / "exp"
    if case == "missing_log":
        (root / "seed1").mkdir(parents=True)
        expected = f"{root / 'seed1' / 'log.txt'} does not exist"
    elif case == "no_folder":
        expected = f"{root}: no such folder"
    else:
        _write(str(root / "seed1"), "epoch [1/1]\n* accuracy: 3.0%\n")  # never finished
        expected = "no '* accuracy: ...%' line after 'Finish training'"
    assert main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coop-parse: error: ") and expected in err


def test_reads_what_real_runs_log(data_root, tiny_rn, tmp_path, capsys):
    """coop-sweep's runs, parsed from their logs, give their results.json accuracies."""
    import json

    from coop.sweep import main as sweep

    out = str(tmp_path / "out")
    argv = [
        "--root", data_root, "--datasets", "caltech101", "--shots", "1", "--seeds", "1,2",
        "--output", out, "MODEL.BACKBONE.NAME", tiny_rn, "INPUT.SIZE", "(32, 32)",
        "TRAINER.COOP.PREC", "fp32", "DATALOADER.NUM_WORKERS", "0", "OPTIM.MAX_EPOCH", "1",
    ]  # fmt: skip
    assert sweep(argv) == 0
    exp = os.path.join(out, "caltech101", "CoOp", "rn50_ep50_1shots", "nctx16_cscFalse_ctpend")
    capsys.readouterr()
    assert main([exp]) == 0
    printed = capsys.readouterr().out
    accs = []
    for seed in ("seed1", "seed2"):
        with open(os.path.join(exp, seed, "results.json"), encoding="utf-8") as f:
            acc = json.load(f)["metrics"]["accuracy"]
        accs.append(round(acc, 1))  # the log prints one decimal
        assert f"{os.path.join(exp, seed, 'log.txt')}. accuracy: {round(acc, 1):.2f}%. " in printed
    assert f"* accuracy: {np.mean(accs):.2f}% +- {np.std(accs):.2f}%" in printed


def test_a_resumed_runs_result_is_read_from_its_newest_stamped_log(tmp_path, capsys):
    root = str(tmp_path / "exp")
    _train_logs(root, [70.0, 72.0], [0, 0])
    seed2 = os.path.join(root, "seed2")
    # seed 2 was killed, then resumed: its end is in the newer time-stamped log
    _write(seed2, "epoch [1/2] batch [1/1] loss 1.0 acc 50.0\n")
    stamped = [os.path.join(seed2, f"log.txt-2026-12-0{d}-10-00-00") for d in (1, 2)]
    with open(stamped[0], "w", encoding="utf-8") as f:
        f.write("Finish training\n* accuracy: 10.0%\n")
    with open(stamped[1], "w", encoding="utf-8") as f:
        f.write("Finish training\n* accuracy: 74.0%\n")
    assert main([root]) == 0
    out = capsys.readouterr().out
    assert f"file: {stamped[1]}. accuracy: 74.00%. " in out
    assert f"* accuracy: {np.mean([70.0, 74.0]):.2f}% +- {np.std([70.0, 74.0]):.2f}%" in out
