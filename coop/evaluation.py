"""Dassl's ``Classification`` evaluator: accuracy, error, macro F1, optional per-class.

The printed block is the one the original ``parse_test_res.py`` reads.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

import numpy as np

from coop.registry import EVALUATOR_REGISTRY

logger = logging.getLogger(__name__)


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
        matches = pred.eq(gt).float()
        self._correct += int(matches.sum().item())
        self._total += gt.shape[0]
        self._y_true.extend(gt.data.cpu().numpy().tolist())
        self._y_pred.extend(pred.data.cpu().numpy().tolist())
        if self._per_class_res is not None:
            for i, label in enumerate(gt):
                self._per_class_res[int(label.item())].append(int(matches[i].item()))

    def evaluate(self) -> OrderedDict[str, float]:
        from sklearn.metrics import confusion_matrix, f1_score

        results: OrderedDict[str, float] = OrderedDict()
        if self._total == 0:
            raise ValueError("Nothing to evaluate: the evaluation split is empty")
        acc = 100.0 * self._correct / self._total
        err = 100.0 - acc
        macro_f1 = 100.0 * f1_score(
            self._y_true, self._y_pred, average="macro", labels=np.unique(self._y_true)
        )
        results["accuracy"] = acc
        results["error_rate"] = err
        results["macro_f1"] = macro_f1

        logger.info(
            "=> result\n"
            f"* total: {self._total:,}\n"
            f"* correct: {self._correct:,}\n"
            f"* accuracy: {acc:.1f}%\n"
            f"* error: {err:.1f}%\n"
            f"* macro_f1: {macro_f1:.1f}%"
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
            import torch

            from coop.io import atomic_torch_save

            cmat = confusion_matrix(self._y_true, self._y_pred, normalize="true")
            save_path = os.path.join(self.cfg.OUTPUT_DIR, "cmat.pt")
            atomic_torch_save(torch.as_tensor(cmat), save_path)
            logger.info(f"Confusion matrix is saved to {save_path}")

        return results
