"""Speed machinery behind the ``FAST`` config node, kept apart from the methods.

Every path here gives the plain computation's numbers up to float rounding (each has a test
that says so), and ``FAST.ENABLED False`` computes exactly what the original code computes.
Methods use it through the functions below:

- :func:`load_clip_for`: the configured CLIP, built without its random initialisers where
  their effect is known (:mod:`coop.fast.clip_init`);
- :func:`image_encoder`: a frozen image encoder with folded batch norms, channels-last and
  CUDA graphs (:mod:`coop.fast.image`, :mod:`coop.fast.cuda_graphs`);
- :func:`prompt_text_encoder`: the class text features of a prompt learner on the plain,
  truncated or shared-prefix text path (:mod:`coop.fast.text`, :mod:`coop.fast.shared_prefix`);
- :func:`deep_text_encoder` and :class:`OncePerEvaluation`: the text side of methods with
  deep prompts, truncated, and computed once per evaluation; :func:`encode_text` of token
  ids truncated (:mod:`coop.fast.deep`).
- :func:`instance_text_encoder`: the class text features of a context per image, several
  images per text-encoder pass (:mod:`coop.fast.instance_text`).

The disk caches of frozen image features (:mod:`coop.fast.feature_cache`) are used by the
trainer base, :class:`coop.clip_trainer.CLIPTrainer`.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from torch import nn

from coop.clip_adapter import load_clip
from coop.fast.clip_init import memoised_builder
from coop.fast.cuda_graphs import cuda_graphs_for
from coop.fast.deep import OncePerEvaluation, deep_text_encoder, encode_text
from coop.fast.feature_cache import default_cache_dir
from coop.fast.image import ImageEncoder
from coop.fast.instance_text import InstanceTextEncoder
from coop.fast.text import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "ImageEncoder",
    "OncePerEvaluation",
    "InstanceTextEncoder",
    "PromptTextEncoder",
    "cuda_graphs_for",
    "deep_text_encoder",
    "encode_text",
    "image_encoder",
    "instance_text_encoder",
    "load_clip_for",
    "prompt_text_encoder",
]


def load_clip_for(cfg) -> nn.Module:
    """Load the configured CLIP backbone on the CPU (fp16 weights, as built); with
    ``FAST.CLIP_INIT_MEMO`` without running its random initialisers where their effect on
    the random stream is remembered (:mod:`coop.fast.clip_init`)."""
    logger.info(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
    build = None
    if cfg.FAST.ENABLED and cfg.FAST.CLIP_INIT_MEMO:
        build = memoised_builder(os.path.join(default_cache_dir(cfg.FAST.CACHE_DIR), "clip_init"))
    return load_clip(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.CACHE_DIR, build=build)


def image_encoder(
    cfg, visual: nn.Module, prec: Optional[str] = None, normalize: bool = True
) -> ImageEncoder:
    """The frozen CLIP image encoder ``visual`` as ``FAST`` says: ``(B, 3, H, W) -> (B,
    embed_dim)`` L2-normalised features (``normalize=False``: raw), with the batch norms folded (``FAST.FOLD_BN``), in
    channels-last (``FAST.CHANNELS_LAST``) and replayed from CUDA graphs (``FAST.CUDA_GRAPHS``
    with ``prec`` fp16 or fp32; ``prec`` None: never). ``visual`` is rewritten in place;
    ``.bn_folded`` and ``.channels_last`` say what was done (the feature caches' keys)."""
    fast = cfg.FAST
    return ImageEncoder(
        visual,
        fold_bn=fast.ENABLED and fast.FOLD_BN,
        channels_last=fast.ENABLED and fast.CHANNELS_LAST,
        cuda_graphs=cuda_graphs_for(cfg, prec),
        normalize=normalize,
    )


def prompt_text_encoder(
    cfg, clip_model: nn.Module, prompt_learner: nn.Module, prec: Optional[str] = None
) -> PromptTextEncoder:
    """CLIP's frozen text tower for ``prompt_learner``: calling it gives the L2-normalised
    class text features of the current context, (n_cls, embed_dim), on the text path
    ``FAST`` chooses per device (plain, truncate or shared_prefix; ``.text_mode``), replayed
    from CUDA graphs in training steps with ``FAST.CUDA_GRAPHS`` and ``prec`` (the method's
    ``TRAINER.<NAME>.PREC``) fp16 or fp32; computed once inside ``.frozen()``. The prompt
    learner's contract is in :class:`~coop.fast.text.PromptTextEncoder`."""
    return PromptTextEncoder(cfg, clip_model, prompt_learner, prec)


def instance_text_encoder(
    cfg, clip_model: nn.Module, prompt_learner: nn.Module
) -> InstanceTextEncoder:
    """CLIP's frozen text tower for a prompt learner with one context per image: calling it
    on the contexts (B, n_ctx, D) gives each image's L2-normalised class text features,
    (B, n_cls, embed_dim); with ``FAST.ENABLED`` several images' prompts per pass (at most
    ``FAST.CLASS_CHUNK``), truncated at the end-of-text token unless ``FAST.TEXT plain``,
    else the original's loop over the images. The prompt learner's contract is in
    :class:`~coop.fast.instance_text.InstanceTextEncoder`."""
    return InstanceTextEncoder(cfg, clip_model, prompt_learner)
