"""Small utilities: seeding, meters, logging set-up, environment info."""

from __future__ import annotations

import datetime
import logging
import os
import random
import sys
import time
from collections import defaultdict
from typing import Dict, Optional

import numpy as np
import torch

LOGGER_NAME = "coop"


def set_random_seed(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (CPU and CUDA), as Dassl does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class AverageMeter:
    """Current value and running average."""

    def __init__(self, ema: bool = False) -> None:
        self.ema = ema
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        if isinstance(val, torch.Tensor):
            val = val.item()
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


class MetricMeter:
    """A group of AverageMeters printed as ``name val (avg)``."""

    def __init__(self, delimiter: str = " ") -> None:
        self.meters: Dict[str, AverageMeter] = defaultdict(AverageMeter)
        self.delimiter = delimiter

    def update(self, input_dict: Optional[dict]) -> None:
        if input_dict is None:
            return
        if not isinstance(input_dict, dict):
            raise TypeError("Input to MetricMeter.update() must be a dictionary")
        for k, v in input_dict.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(v)

    def __str__(self) -> str:
        return self.delimiter.join(
            f"{name} {meter.val:.4f} ({meter.avg:.4f})" for name, meter in self.meters.items()
        )


class _FlushingFileHandler(logging.FileHandler):
    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


def setup_logger(output_dir: Optional[str], console: bool = True) -> Optional[str]:
    """Send the package's log lines to the console and to ``<output_dir>/log.txt``.

    As in Dassl, an existing ``log.txt`` is kept and the new file gets a time stamp
    (``log.txt-YYYY-MM-DD-HH-MM-SS``). Returns the log file path (or None).
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if logging.root.manager.disable:
        # e.g. importing dassl.data runs logging.disable(WARNING); a run's log is complete
        logging.disable(logging.NOTSET)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(message)s")
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    if not output_dir:
        return None
    if output_dir.endswith(".txt") or output_dir.endswith(".log"):
        fpath = output_dir
    else:
        fpath = os.path.join(output_dir, "log.txt")
    if os.path.exists(fpath):
        fpath += time.strftime("-%Y-%m-%d-%H-%M-%S")
    os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
    fh = _FlushingFileHandler(fpath, encoding="utf-8")
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    return fpath


def close_logger() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def collect_env_info() -> str:
    import platform

    import torchvision

    lines = [
        f"Python: {sys.version.split()[0]} ({platform.platform()})",
        f"PyTorch: {torch.__version__}",
        f"torchvision: {torchvision.__version__}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    from coop import __version__

    lines.append(f"coop-dassl: {__version__}")
    return "\n".join(lines)


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
