"""Atomic file writes and safe checkpoint loading.

Every file the package writes goes through these helpers: the content is written to a
temporary file in the same folder, flushed and fsync'ed, then renamed over the target, so a
crash or a full disk never leaves a half-written file behind and the previous version stays
intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Iterator


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, ...)."""


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it atomically replaces ``path``."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder
        )
    except OSError as e:
        raise WriteError(e.errno, f"Cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, f"Cannot write {path}: {e.strerror or e}") from None
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str, obj: Any, indent: int | None = 4) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, separators=(",", ": "))
        f.write("\n") if indent is None else None


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class _Inert:
    """Stands in for any object a legacy checkpoint pickled (optimizers, schedulers, ...).

    It accepts any construction arguments and state and does nothing with them, so
    nothing from the file is ever executed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __repr__(self) -> str:
        return "<object not loaded>"


def _restricted_pickle_module() -> Any:
    """A ``pickle``-compatible module whose Unpickler only builds tensors and containers."""
    import pickle
    import types

    import torch

    allowed = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "slice"),
    }

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in allowed:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            return _Inert

    mod = types.ModuleType("coop_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    mod.__name__ = "coop_restricted_pickle"
    return mod


def _strip_inert(obj: Any) -> Any:
    if isinstance(obj, _Inert):
        return None
    if isinstance(obj, dict):
        return type(obj)((k, _strip_inert(v)) for k, v in obj.items() if not isinstance(v, _Inert))
    if isinstance(obj, list):
        return [_strip_inert(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_strip_inert(v) for v in obj)
    return obj


def read_legacy_checkpoint(path: str) -> Any:
    """Read a Dassl-format checkpoint (e.g. the released CoOp models) without unpickling
    arbitrary objects: tensors, numbers, strings and containers are kept; every other
    pickled object (optimizer/scheduler instances) is replaced by ``None``."""
    import torch

    try:
        obj = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module()
        )
    except Exception as e:  # noqa: BLE001 - any failure means: not a readable checkpoint
        raise CheckpointError(f"Cannot read checkpoint {path}: {e}") from None
    return _strip_inert(obj)


def load_checkpoint(path: str) -> Any:
    """Load a checkpoint safely.

    Our own checkpoints hold only tensors and plain values and load with
    ``weights_only=True``. Legacy Dassl checkpoints, which also pickle optimizer and
    scheduler objects, are read by :func:`read_legacy_checkpoint`, which builds tensors and
    containers only. No code path unpickles arbitrary objects.
    """
    import os

    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f'No checkpoint at "{path}"')
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - fall back to the restricted reader
        ckpt = read_legacy_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a dict with a 'state_dict' entry"
        )
    return ckpt
