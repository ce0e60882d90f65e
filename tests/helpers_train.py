"""Helpers for tests that run coop-train in-process."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, List, Optional

import pytest


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


def coop_node_argv(
    root: str, out: str, ckpt: str, trainer: str, config_file: str, *opts: str
) -> List[str]:
    """The command line of a method that reads CoOp's node ``TRAINER.COOP``, with its YAML
    ``config_file``, as a CPU test runs it (4 shots, batch 8, fp32, 32 px, 0 workers)."""
    argv = coop_argv(root, out, ckpt, 1, 4, "DATALOADER.TRAIN_X.BATCH_SIZE", "8", *opts)
    argv[argv.index("--trainer") + 1] = trainer
    argv[argv.index("--config-file") + 1] = config_file
    return argv


def build_from_argv(cls: type, argv: List[str], seed: Optional[int] = None) -> Any:
    """The method class ``cls`` on the bundled engine, built from a coop-train command line
    (``seed``: set first, as coop-train seeds a run)."""
    from coop.hosts import on_host
    from coop.train import build_parser, setup_cfg
    from coop.utils import set_random_seed

    if seed is not None:
        set_random_seed(seed)
    return on_host(cls)(setup_cfg(build_parser().parse_args(argv)))


def step_summaries(trainer: Any, batches: List[dict]) -> List[dict]:
    """The loss summaries of ``trainer``'s training steps on ``batches``, one after the
    other, with no learning-rate step in between."""
    trainer.num_batches = len(batches) + 1
    summaries = []
    for i, batch in enumerate(batches):
        trainer.batch_idx = i
        summaries.append(trainer.forward_backward(batch))
    return summaries


def killed_then_resumed(monkeypatch: Any, cls: type, run: Callable[[], int], epoch: int = 1) -> int:
    """``run()`` (a coop-train run of the host class ``cls``) killed right after epoch
    ``epoch`` (0-based, its checkpoint written), then run again: the second run's exit
    status (a resume)."""

    class Killed(Exception):
        pass

    after_epoch = cls.after_epoch

    def after_epoch_then_kill(self):
        after_epoch(self)
        if self.epoch == epoch:
            raise Killed

    monkeypatch.setattr(cls, "after_epoch", after_epoch_then_kill)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(cls, "after_epoch", after_epoch)
    return run()
