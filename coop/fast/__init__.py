"""Speed machinery behind the ``FAST`` config node, kept apart from the methods.

Every path here gives the plain computation's numbers up to float rounding, and
``FAST.ENABLED False`` computes exactly what the original code computes. Methods use it
through the functions below.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from coop.clip_adapter import load_clip
from coop.fast.clip_init import memoised_builder
from coop.fast.feature_cache import default_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["load_clip_for"]


def load_clip_for(cfg) -> nn.Module:
    """Load the configured CLIP backbone on the CPU (fp16 weights, as built); with
    ``FAST.CLIP_INIT_MEMO`` without running its random initialisers where their effect on
    the random stream is remembered (:mod:`coop.fast.clip_init`)."""
    logger.info(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
    build = None
    if cfg.FAST.ENABLED and cfg.FAST.CLIP_INIT_MEMO:
        build = memoised_builder(os.path.join(default_cache_dir(cfg.FAST.CACHE_DIR), "clip_init"))
    return load_clip(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.CACHE_DIR, build=build)
