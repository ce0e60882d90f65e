"""Dassl's ``Classification`` evaluator: accuracy, error, macro F1, optional per-class.

The printed block is the one the original ``parse_test_res.py`` reads. Macro F1 is Dassl's
``sklearn.metrics.f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))``,
computed here from per-label counts (:func:`macro_f1`) so that an evaluation does not import
scikit-learn (about a second per process); scikit-learn is imported only for the optional
confusion matrix.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

import numpy as np
import torch

from coop.registry import EVALUATOR_REGISTRY

logger = logging.getLogger(__name__)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the labels present in ``y_true`` (a fraction, not a percentage).

    What ``f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))`` returns,
    computed the way current scikit-learn computes it: per label F1 = 2 tp / (2 tp + fp + fn)
    = 2 tp / (#true + #predicted) in float64, then the plain mean (older versions went
    through precision and recall, which can differ in the last bit). Predictions of a label absent
    from ``y_true`` count only as false negatives of the true label; a present label that is
    never predicted correctly scores 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"macro_f1 needs two equal, non-empty label lists, got {y_true.size} and {y_pred.size}"
        )
    if y_true.min() < 0 or y_pred.min() < 0:
        raise ValueError("macro_f1 needs non-negative integer labels")
    labels = np.unique(y_true)
    size = int(max(y_true.max(), y_pred.max())) + 1
    true_sum = np.bincount(y_true, minlength=size)[labels]
    pred_sum = np.bincount(y_pred, minlength=size)[labels]
    tp_sum = np.bincount(y_true[y_true == y_pred], minlength=size)[labels]
    f = 2.0 * tp_sum.astype(np.float64) / (true_sum.astype(np.float64) + pred_sum)
    return float(np.mean(f))


class EvaluatorBase:
    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, mo, gt) -> None:
        raise NotImplementedError

    def evaluate(self) -> Dict[str, float]:
        raise NotImplementedError


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Evaluator for classification (argmax over the class logits)."""

    def __init__(self, cfg, lab2cname: Optional[Dict[int, str]] = None, **kwargs) -> None:
        super().__init__(cfg)
        self._lab2cname = lab2cname
        self._correct = 0
        self._total = 0
        self._per_class_res = None
        self._y_true: List[int] = []
        self._y_pred: List[int] = []
        if cfg.TEST.PER_CLASS_RESULT:
            assert lab2cname is not None
            self._per_class_res = defaultdict(list)

    def reset(self) -> None:
        self._correct = 0
        self._total = 0
        self._y_true = []
        self._y_pred = []
        if self._per_class_res is not None:
            self._per_class_res = defaultdict(list)

    def process(self, mo, gt) -> None:
        # mo (B, n_cls) logits; gt (B,) labels
        pred = mo.max(1)[1]
        # one copy of labels and predictions to the host (a single wait on a GPU)
        y = torch.stack([gt.detach().long(), pred.detach().long().to(gt.device)]).cpu().numpy()
        matches = y[0] == y[1]
        self._correct += int(matches.sum())
        self._total += gt.shape[0]
        self._y_true.extend(y[0].tolist())
        self._y_pred.extend(y[1].tolist())
        if self._per_class_res is not None:
            for label, ok in zip(y[0].tolist(), matches.tolist()):
                self._per_class_res[label].append(int(ok))

    def evaluate(self) -> OrderedDict[str, float]:
        results: OrderedDict[str, float] = OrderedDict()
        if self._total == 0:
            raise ValueError("Nothing to evaluate: the evaluation split is empty")
        acc = 100.0 * self._correct / self._total
        err = 100.0 - acc
        f1 = 100.0 * macro_f1(self._y_true, self._y_pred)
        results["accuracy"] = acc
        results["error_rate"] = err
        results["macro_f1"] = f1

        logger.info(
            "=> result\n"
            f"* total: {self._total:,}\n"
            f"* correct: {self._correct:,}\n"
            f"* accuracy: {acc:.1f}%\n"
            f"* error: {err:.1f}%\n"
            f"* macro_f1: {f1:.1f}%"
        )

        if self._per_class_res is not None:
            labels = sorted(self._per_class_res.keys())
            lines = ["=> per-class result"]
            accs = []
            for label in labels:
                classname = self._lab2cname[label]
                res = self._per_class_res[label]
                correct = sum(res)
                total = len(res)
                acc_c = 100.0 * correct / total
                accs.append(acc_c)
                lines.append(
                    f"* class: {label} ({classname})\ttotal: {total:,}\t"
                    f"correct: {correct:,}\tacc: {acc_c:.1f}%"
                )
            mean_acc = float(np.mean(accs))
            lines.append(f"* average: {mean_acc:.1f}%")
            logger.info("\n".join(lines))
            results["perclass_accuracy"] = mean_acc

        if self.cfg.TEST.COMPUTE_CMAT:
            from sklearn.metrics import confusion_matrix

            from coop.io import atomic_torch_save

            cmat = confusion_matrix(self._y_true, self._y_pred, normalize="true")
            save_path = os.path.join(self.cfg.OUTPUT_DIR, "cmat.pt")
            atomic_torch_save(torch.as_tensor(cmat), save_path)
            logger.info(f"Confusion matrix is saved to {save_path}")

        return results
