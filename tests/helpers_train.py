"""Helpers for tests that run coop-train in-process."""

from __future__ import annotations

import json
import os
from typing import List


def coop_argv(
    root: str, out: str, ckpt: str, seed: int = 1, shots: int = 16, *extra: str
) -> List[str]:
    """The original CoOp command line, with the opts a CPU test needs."""
    return [
        "--root", root,
        "--seed", str(seed),
        "--trainer", "CoOp",
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", "configs/trainers/CoOp/rn50.yaml",
        "--output-dir", out,
        "DATASET.NUM_SHOTS", str(shots),
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "TRAINER.COOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        *extra,
    ]  # fmt: skip


def zeroshot_argv(root: str, out: str, ckpt: str, *extra: str) -> List[str]:
    return [
        "--root", root,
        "--trainer", "ZeroshotCLIP",
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", "configs/trainers/CoOp/rn50.yaml",
        "--output-dir", out,
        "--eval-only",
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0",
        *extra,
    ]  # fmt: skip


def read_results(out: str) -> dict:
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def loss_lines(log_path: str) -> List[str]:
    """The per-batch training lines of a log, without the timing columns."""
    out = []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("epoch ["):
                parts = line.split()
                # drop "time a (b) data c (d)" and the eta
                keep = parts[:4] + parts[10:-2]
                out.append(" ".join(keep))
    return out


def method_argv(
    root: str, out: str, ckpt: str, trainer: str, config: str, *extra: str, shots: int = 4
) -> List[str]:
    """A method's command line with one of its shipped YAMLs, as a CPU test runs it (fp32,
    32 px, 0 workers)."""
    node = trainer.upper()
    return [
        "--root", root,
        "--seed", "1",
        "--trainer", trainer,
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", f"configs/trainers/{trainer}/{config}.yaml",
        "--output-dir", out,
        "DATASET.NUM_SHOTS", str(shots),
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        f"TRAINER.{node}.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        *extra,
    ]  # fmt: skip
