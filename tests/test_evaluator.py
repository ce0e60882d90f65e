"""The ``Classification`` evaluator (protocol §(e) "Evaluator Classification")."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from coop.config import get_cfg_default
from coop.evaluation import Classification
from coop.registry import build_evaluator


@pytest.fixture
def log(caplog, monkeypatch):
    """Capture the evaluator's INFO lines, even if an earlier run stopped propagation."""
    monkeypatch.setattr(logging.getLogger("coop"), "propagate", True)
    caplog.set_level(logging.INFO, logger="coop.evaluation")
    return caplog


def _cfg(tmp_path=None, per_class=False, cmat=False):
    cfg = get_cfg_default()
    cfg.TEST.PER_CLASS_RESULT = per_class
    cfg.TEST.COMPUTE_CMAT = cmat
    if tmp_path is not None:
        cfg.OUTPUT_DIR = str(tmp_path)
    return cfg


def _logits(y_pred, n_cls):
    """Logits whose argmax is ``y_pred`` (with distinct, non-trivial values)."""
    y_pred = torch.as_tensor(y_pred)
    out = torch.randn(len(y_pred), n_cls, generator=torch.Generator().manual_seed(0))
    out[torch.arange(len(y_pred)), y_pred] = out.abs().max() + 1.0
    return out


def _run(ev, y_true, y_pred, n_cls, batch=7):
    logits = _logits(y_pred, n_cls)
    gt = torch.as_tensor(y_true)
    for i in range(0, len(y_true), batch):
        ev.process(logits[i : i + batch], gt[i : i + batch])
    return ev.evaluate()


def _messages(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "coop.evaluation")


def test_hand_computed_metrics():
    # class 0: tp 2, fp 0, fn 1 -> F1 0.8; class 1: tp 1, fp 1, fn 1 -> 0.5;
    # class 2: tp 1, fp 1, fn 0 -> 2/3
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    res = _run(Classification(_cfg()), y_true, y_pred, 3, batch=4)
    assert list(res) == ["accuracy", "error_rate", "macro_f1"]
    assert res["accuracy"] == pytest.approx(100 * 4 / 6, rel=1e-12)
    assert res["error_rate"] == pytest.approx(100 - 100 * 4 / 6, rel=1e-12)
    assert res["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3, rel=1e-12)


def test_metrics_match_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 9, size=500).tolist()
    y_pred = [t if rng.random() < 0.6 else int(rng.integers(0, 12)) for t in y_true]
    res = _run(Classification(_cfg()), y_true, y_pred, 12, batch=64)
    correct = sum(int(a == b) for a, b in zip(y_true, y_pred))
    assert res["accuracy"] == pytest.approx(100 * correct / 500, rel=1e-12)
    assert res["error_rate"] == pytest.approx(100 - 100 * correct / 500, rel=1e-12)
    expected_f1 = 100 * f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))
    assert res["macro_f1"] == pytest.approx(expected_f1, rel=1e-12)


def test_predicted_label_absent_from_y_true_is_ignored_by_macro_f1():
    # class 0: tp 1, fn 1 -> F1 2/3; class 1: F1 1; class 3 only predicted: ignored
    res = _run(Classification(_cfg()), [0, 0, 1, 1], [0, 3, 1, 1], 4)
    assert res["macro_f1"] == pytest.approx(100 * (2 / 3 + 1) / 2, rel=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_present_label_never_predicted_counts_zero():
    # class 0: P 1/2 R 1 -> 2/3; class 1 never predicted -> 0
    res = _run(Classification(_cfg()), [0, 1], [0, 0], 2)
    assert res["macro_f1"] == pytest.approx(100 * (2 / 3) / 2, rel=1e-12)
    assert res["accuracy"] == 50.0


def test_block_format_51_of_90(log):
    y_true = [i % 3 for i in range(90)]
    y_pred = [t if i < 51 else (t + 1) % 3 for i, t in enumerate(y_true)]
    res = _run(Classification(_cfg()), y_true, y_pred, 3, batch=32)
    f1 = 100 * f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))
    text = _messages(log)
    lines = text.splitlines()
    assert lines == [
        "=> result",
        "* total: 90",
        "* correct: 51",
        "* accuracy: 56.7%",
        "* error: 43.3%",
        f"* macro_f1: {format(f1, '.1f')}%",
    ]
    # full precision is returned; rounding happens only when printing
    assert res["accuracy"] == pytest.approx(100 * 51 / 90, rel=1e-12)
    assert res["error_rate"] == pytest.approx(100 - 100 * 51 / 90, rel=1e-12)


def test_block_format_thousands_separators(log):
    n, n_correct = 2465, 2263
    y_true = [i % 5 for i in range(n)]
    y_pred = [t if i < n_correct else (t + 2) % 5 for i, t in enumerate(y_true)]
    _run(Classification(_cfg()), y_true, y_pred, 5, batch=100)
    f1 = 100 * f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))
    lines = _messages(log).splitlines()
    assert lines == [
        "=> result",
        "* total: 2,465",
        "* correct: 2,263",
        "* accuracy: 91.8%",
        "* error: 8.2%",
        f"* macro_f1: {format(f1, '.1f')}%",
    ]


def test_per_class_block(log):
    lab2cname = {0: "cat", 1: "dog", 2: "hello kitty"}
    # class 0: 2/3; class 1: 1/1; class 2: 1/2
    y_true = [0, 0, 0, 1, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 0]
    ev = Classification(_cfg(per_class=True), lab2cname=lab2cname)
    res = _run(ev, y_true, y_pred, 3, batch=4)
    mean = (200 / 3 + 100 + 50) / 3
    assert list(res) == ["accuracy", "error_rate", "macro_f1", "perclass_accuracy"]
    assert res["perclass_accuracy"] == pytest.approx(mean, rel=1e-12)

    text = _messages(log)
    per_class = text[text.index("=> per-class result") :].splitlines()
    assert per_class == [
        "=> per-class result",
        "* class: 0 (cat)\ttotal: 3\tcorrect: 2\tacc: 66.7%",
        "* class: 1 (dog)\ttotal: 1\tcorrect: 1\tacc: 100.0%",
        "* class: 2 (hello kitty)\ttotal: 2\tcorrect: 1\tacc: 50.0%",
        f"* average: {format(mean, '.1f')}%",
    ]
    # the overall block comes first
    assert text.index("=> result") < text.index("=> per-class result")


def test_no_per_class_block_by_default(log):
    _run(Classification(_cfg()), [0, 1], [0, 1], 2)
    assert "per-class" not in _messages(log)


def test_reset_clears_state():
    ev = Classification(_cfg())
    _run(ev, [0, 0, 1], [1, 1, 0], 2)
    ev.reset()
    res = _run(ev, [0, 1, 1, 1], [0, 1, 1, 0], 2)
    assert res["accuracy"] == 75.0


def test_compute_cmat_writes_normalized_confusion_matrix(tmp_path):
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    _run(Classification(_cfg(tmp_path, cmat=True)), y_true, y_pred, 3)
    path = tmp_path / "cmat.pt"
    assert path.is_file()
    cmat = torch.as_tensor(torch.load(path, weights_only=True), dtype=torch.float64)
    expected = torch.tensor(
        [[2 / 3, 1 / 3, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(cmat, expected, rtol=1e-12, atol=1e-12)


def test_no_cmat_by_default(tmp_path):
    _run(Classification(_cfg(tmp_path)), [0, 1], [0, 1], 2)
    assert not (tmp_path / "cmat.pt").exists()


def test_built_from_registry_by_config_name():
    cfg = _cfg()
    assert cfg.TEST.EVALUATOR == "Classification"
    ev = build_evaluator(cfg, lab2cname={0: "a"})
    assert isinstance(ev, Classification)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.parametrize("seed", range(6))
def test_macro_f1_equals_sklearn_exactly(seed):
    from coop.evaluation import macro_f1

    rng = np.random.default_rng(seed)
    n_cls = int(rng.integers(1, 40))
    n = int(rng.integers(1, 400))
    y_true = rng.integers(0, n_cls, size=n)
    noise = rng.integers(0, n_cls + 5, size=n)  # some predicted labels never occur as truth
    y_pred = np.where(rng.random(n) < rng.random(), y_true, noise)
    expected = f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))
    assert macro_f1(y_true, y_pred) == expected


def test_macro_f1_rejects_bad_label_lists():
    from coop.evaluation import macro_f1

    with pytest.raises(ValueError, match="equal, non-empty"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="equal, non-empty"):
        macro_f1([0, 1], [0])
    with pytest.raises(ValueError, match="non-negative"):
        macro_f1([0, -1], [0, 0])


def test_an_evaluation_does_not_import_sklearn():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from coop.config import get_cfg_default\n"
        "from coop.evaluation import Classification\n"
        "ev = Classification(get_cfg_default())\n"
        "ev.process(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2]))\n"
        "res = ev.evaluate()\n"
        "print(round(res['macro_f1'], 6), 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # class 0: F1 1; class 1: tp 1 fp 1 -> 2/3; class 2: 0
    assert out.stdout.split() == [str(round(100 * (1 + 2 / 3) / 3, 6)), "False"]
