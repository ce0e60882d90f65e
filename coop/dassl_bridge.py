"""Use the trainers and datasets from a real Dassl installation.

    from coop.dassl_bridge import register_into_dassl, extend_dassl_cfg
    register_into_dassl()          # our trainers and datasets in Dassl's registries
    cfg = get_cfg_default()        # Dassl's
    extend_dassl_cfg(cfg)          # + the keys our trainers and datasets read

After that, Dassl's own ``tools/train.py``-style scripts build ``CoOp``, ``ZeroshotCLIP``,
``Caltech101``, ... by name. Our dataset classes produce ``Datum``-compatible items (same
attribute names), so Dassl's data manager reads them as its own.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, List

from coop.config import CN, get_cfg_default
from coop.registry import DATASET_REGISTRY, TRAINER_REGISTRY

logger = logging.getLogger(__name__)


class DasslNotInstalledError(ImportError):
    pass


def _dassl_registries() -> tuple[Any, Any]:
    try:
        engine = importlib.import_module("dassl.engine")
        datasets = importlib.import_module("dassl.data.datasets")
    except ImportError as e:
        raise DasslNotInstalledError(
            "Dassl is not installed (import dassl failed); coop runs on its own engine "
            "without it: use coop-train"
        ) from e
    return engine.TRAINER_REGISTRY, datasets.DATASET_REGISTRY


def register_into_dassl() -> List[str]:
    """Register every trainer and dataset of this package into Dassl's registries (names
    Dassl already has are left alone). Returns the names registered."""
    dassl_trainers, dassl_datasets = _dassl_registries()
    added = []
    for ours, theirs in ((TRAINER_REGISTRY, dassl_trainers), (DATASET_REGISTRY, dassl_datasets)):
        for name, cls in ours.items():
            try:
                theirs.get(name)
                logger.info(f"Dassl already has {name}; keeping Dassl's")
                continue
            except KeyError:
                pass
            theirs.register(cls)
            added.append(name)
    return added


def extend_dassl_cfg(cfg: CN) -> CN:
    """Add to a Dassl config every key of ours it lacks (with our defaults); keys Dassl has
    keep Dassl's values."""

    def merge(dst: CN, src: CN) -> None:
        for key, value in src.items():
            if key not in dst:
                dst[key] = value.clone() if isinstance(value, CN) else value
            elif isinstance(value, CN) and isinstance(dst[key], CN):
                merge(dst[key], value)

    merge(cfg, get_cfg_default())
    return cfg
