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
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
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
