"""Tiny random CLIP checkpoints in OpenAI's file formats.

The files load through the real ``coop.clip_adapter.load_clip`` (so tests, the demo and the
benchmarks exercise the same code path as the released weights). Two formats:

- ``"state_dict"``: ``torch.save`` of a plain tensor dict (loads under ``weights_only=True``);
- ``"torchscript"``: a traced TorchScript archive like OpenAI's released ``.pt`` files, whose
  ``state_dict()`` holds the CLIP parameter names plus ``input_resolution``,
  ``context_length`` and ``vocab_size`` (which ``build_model`` deletes).

Weights are stored in fp32 but hold values that are exactly representable in fp16 where
``build_model`` casts to fp16, so a loaded model after ``.float()`` reproduces the source
model's outputs bit for bit. Building draws from a private RNG fork: the caller's global
torch RNG is untouched. Nothing here downloads anything.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from coop.clip_adapter import import_clip
from coop.io import atomic_open

__all__ = ["save_tiny_clip", "tiny_clip_args", "tiny_clip_model", "tiny_clip_state_dict"]

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
FORMATS = ("state_dict", "torchscript")


def tiny_clip_args(
    arch: str = "vit",
    embed_dim: int = 64,
    image_resolution: int = 32,
    vision_width: Optional[int] = None,
    vision_layers: Union[int, Sequence[int], None] = None,
    patch_size: int = 16,
    text_width: int = 64,
    text_layers: int = 1,
) -> Tuple:
    """Positional arguments of ``clip.model.CLIP`` for a tiny model.

    Defaults: ViT width 64, 1 layer, patch 16; ResNet width 8, layers (1, 1, 1, 1). These are
    the arguments ``build_model`` infers back from the saved weights.
    """
    if arch == "vit":
        width = 64 if vision_width is None else vision_width
        layers: Union[int, Tuple[int, ...]] = 1 if vision_layers is None else vision_layers
        if not isinstance(layers, int):
            raise ValueError("a ViT takes an int vision_layers")
        if width % 64 or image_resolution % patch_size:
            raise ValueError("ViT width must be a multiple of 64 and resolution of the patch size")
        patch: Optional[int] = patch_size
    elif arch == "resnet":
        width = 8 if vision_width is None else vision_width
        if vision_layers is None:
            layers = (1, 1, 1, 1)
        elif isinstance(vision_layers, int):
            layers = (vision_layers,) * 4
        else:
            layers = tuple(vision_layers)
        if image_resolution % 32:
            raise ValueError("a ResNet needs a resolution that is a multiple of 32")
        patch = None
    else:
        raise ValueError(f"arch must be 'vit' or 'resnet', not {arch!r}")
    if text_width % 64:
        raise ValueError("text_width must be a multiple of 64")
    return (
        embed_dim,
        image_resolution,
        layers,
        width,
        patch,
        CONTEXT_LENGTH,
        VOCAB_SIZE,
        text_width,
        text_width // 64,
        text_layers,
    )


def tiny_clip_model(
    arch: str = "vit",
    embed_dim: int = 64,
    image_resolution: int = 32,
    vision_width: Optional[int] = None,
    vision_layers: Union[int, Sequence[int], None] = None,
    patch_size: int = 16,
    text_width: int = 64,
    text_layers: int = 1,
    seed: int = 0,
    logit_scale: float = math.log(100),
) -> nn.Module:
    """A tiny random fp32 ``clip.model.CLIP`` in eval mode (see ``tiny_clip_args``).

    Built under ``torch.random.fork_rng`` with ``manual_seed(seed)``. The tensors that
    ``build_model`` casts to fp16 are rounded to fp16 values (kept in fp32), and
    ``logit_scale`` is set to ln(100) like the released models.
    """
    import_clip()  # the `clip` package needs its pkg_resources shim first
    from clip.model import CLIP, convert_weights

    args = tiny_clip_args(
        arch, embed_dim, image_resolution, vision_width, vision_layers, patch_size,
        text_width, text_layers,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(*args)
    convert_weights(model)  # round what build_model stores in fp16 ...
    model.float()  # ... and keep fp32 storage
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model.eval()


def tiny_clip_state_dict(arch: str = "vit", **kw) -> Dict[str, torch.Tensor]:
    """The state dict of ``tiny_clip_model(arch, **kw)`` (CLIP parameter names, fp32)."""
    model = tiny_clip_model(arch, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _traced_archive(model: nn.Module) -> torch.jit.ScriptModule:
    """Trace ``model`` like OpenAI's released JIT files (with their three extra buffers)."""
    res = int(model.visual.input_resolution)
    # build_model deletes these three entries; released archives hold them as buffers
    del model.context_length
    del model.vocab_size
    model.register_buffer("input_resolution", torch.tensor(res))
    model.register_buffer("context_length", torch.tensor(CONTEXT_LENGTH))
    model.register_buffer("vocab_size", torch.tensor(VOCAB_SIZE))
    image = torch.zeros(1, 3, res, res)
    text = torch.zeros(1, CONTEXT_LENGTH, dtype=torch.long)
    text[0, 0], text[0, 1] = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # [SOT, EOT, 0, ...]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        return torch.jit.trace(model, (image, text), check_trace=False)


def save_tiny_clip(path: str, arch: str = "vit", fmt: str = "state_dict", **kw) -> str:
    """Write a tiny CLIP checkpoint to ``path`` atomically and return ``path``.

    ``fmt`` is ``"state_dict"`` (``torch.save`` of the tensor dict) or ``"torchscript"``
    (a traced archive like OpenAI's released files). ``kw`` go to ``tiny_clip_model``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    path = os.fspath(path)
    if fmt == "state_dict":
        state_dict = tiny_clip_state_dict(arch, **kw)
        with atomic_open(path, "wb") as f:
            torch.save(state_dict, f)
    else:
        archive = _traced_archive(tiny_clip_model(arch, **kw))
        with warnings.catch_warnings(), atomic_open(path, "wb") as f:
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(archive, f)
    return path
