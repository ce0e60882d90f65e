"""Building CLIP without its random initialisers (``FAST.CLIP_INIT_MEMO``).

``clip.model.build_model`` constructs ``CLIP`` with torch's default initialisers and then
overwrites every value with the checkpoint's. The initialisers only advance the global torch
generator, and the state they leave it in is a function of the state before and of the
architecture. :func:`memoised_builder` gives :func:`coop.clip_adapter.load_clip` a build that
remembers that state on disk the first time and afterwards restores it without running them:
the same model and the same random stream afterwards (CoOp's context initialisation), without
the time the initialisers take.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
import types
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from coop.io import atomic_write_bytes

logger = logging.getLogger(__name__)

_INIT_MEMO_VERSION = 1
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


def clip_args_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> tuple:
    """The positional arguments of ``clip.model.CLIP`` that ``build_model`` infers from a
    checkpoint's state dict (embed dim, resolution, vision layers, vision width, patch size or
    None for a ResNet, context length, vocab size, text width, text heads, text layers)."""
    sd = state_dict
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        layers: Any = len(
            [k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]
        )
        patch: Optional[int] = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        resolution = patch * grid
    else:
        layers = tuple(
            len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}")})
            for b in (1, 2, 3, 4)
        )
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        out_width = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        if out_width**2 + 1 != sd["visual.attnpool.positional_embedding"].shape[0]:
            raise ValueError("visual.attnpool.positional_embedding is not a square grid + 1")
        patch = None
        resolution = out_width * 32
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")})
    return (
        sd["text_projection"].shape[1],
        resolution,
        layers,
        width,
        patch,
        sd["positional_embedding"].shape[0],
        sd["token_embedding.weight"].shape[0],
        text_width,
        text_width // 64,
        text_layers,
    )


@functools.cache
def _skeleton_class(clip_cls: type) -> type:
    """``clip_cls`` whose ``initialize_parameters`` (CLIP's own initialisers, called at the
    end of its constructor) does nothing: on the meta device they draw nothing but still
    cost a quarter of the construction, and the checkpoint replaces every value."""

    class _Skeleton(clip_cls):  # type: ignore[misc, valid-type]
        def initialize_parameters(self) -> None:
            pass

    return _Skeleton


def _build_without_init(
    clip_mod: types.ModuleType, state_dict: Dict[str, torch.Tensor], args: tuple
):
    """What ``build_model`` returns, built without running (or drawing random numbers for)
    the initialisers whose values the checkpoint overwrites anyway, and without a second copy
    of the weights: the module (``CLIP(*args)``) is created and cast like ``convert_weights``
    on the meta device, and the checkpoint's tensors become its parameters and buffers (each
    cast to the dtype ``build_model`` would give it, laid out contiguously, and copied only
    where two of them share memory). None if anything is left unmaterialised (an unknown
    CLIP version)."""
    model_mod = importlib.import_module(clip_mod.__name__.rsplit(".", 1)[0] + ".model")
    with torch.device("meta"):
        model = _skeleton_class(model_mod.CLIP)(*args)
        model.__class__ = model_mod.CLIP  # the skeleton differs only in its construction
        model_mod.convert_weights(model)
    # the text tower's causal mask is a plain attribute, not a buffer: build it for real
    with torch.device("cpu"):
        mask = model.build_attention_mask()
    for block in model.transformer.resblocks:
        block.attn_mask = mask
    target = model.state_dict()
    sd: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for k, v in state_dict.items():
        if k in _NON_WEIGHT_KEYS:
            continue
        want = target.get(k)
        if want is not None and v.dtype != want.dtype:
            v = v.to(want.dtype)  # as copy_ into the built parameter would round it
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:
            v = v.clone()
        seen.add(ptr)
        sd[k] = v
    model.load_state_dict(sd, assign=True)
    attributes = [v for m in model.modules() for v in vars(m).values() if torch.is_tensor(v)]
    if any(t.is_meta for t in (*model.parameters(), *model.buffers(), *attributes)):
        return None
    return model.eval()


def _memo_path(memo_dir: str, args: tuple, rng_before: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"clip-init-rng|{_INIT_MEMO_VERSION}|{torch.__version__}|{args!r}|".encode())
    h.update(rng_before.numpy().tobytes())
    return os.path.join(memo_dir, h.hexdigest() + ".rng")


def _read_rng_state(path: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A remembered generator state (a SHA-256 of the state, then the state), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    digest, state = data[:32], data[32:]
    if len(state) != like.numel() or hashlib.sha256(state).digest() != digest:
        logger.warning(f"Ignoring the damaged random-state memo {path}")
        return None
    return torch.frombuffer(bytearray(state), dtype=torch.uint8).clone()


def _write_rng_state(path: str, state: torch.Tensor) -> None:
    data = state.numpy().tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, hashlib.sha256(data).digest() + data)


def _build_model_memoised(
    clip_mod: types.ModuleType, state_dict: Dict[str, torch.Tensor], memo_dir: str
) -> nn.Module:
    """``build_model(state_dict)`` with its random initialisers skipped where possible.

    Those initialisers only advance the global torch generator (the checkpoint overwrites
    their values), and the state they leave it in is a function of the state before and the
    architecture. It is remembered in ``memo_dir`` the first time (the full build runs) and
    restored afterwards, so the model and every later random draw (CoOp's context
    initialisation) are bit-identical to ``build_model``'s.
    """
    args = clip_args_from_state_dict(state_dict)
    before = torch.get_rng_state()
    path = _memo_path(memo_dir, args, before)
    after = _read_rng_state(path, before)
    if after is not None:
        model = _build_without_init(clip_mod, state_dict, args)
        if model is not None:
            torch.set_rng_state(after)
            return model
        torch.set_rng_state(before)
    model = clip_mod.build_model(state_dict)
    try:
        _write_rng_state(path, torch.get_rng_state())
    except OSError as e:  # the memo only saves time; the build itself succeeded
        logger.warning(f"Could not remember the CLIP build's random state in {memo_dir}: {e}")
    return model


def memoised_builder(
    memo_dir: str,
) -> Callable[[types.ModuleType, Dict[str, torch.Tensor]], nn.Module]:
    """The ``build`` hook of :func:`coop.clip_adapter.load_clip` that remembers the random
    state of CLIP's initialisers in ``memo_dir`` (see :func:`_build_model_memoised`)."""
    return functools.partial(_build_model_memoised, memo_dir=memo_dir)
