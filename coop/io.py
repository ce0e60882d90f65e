"""Atomic file writes, file locks and safe checkpoint loading.

Every file the package writes goes through these helpers: the content is written to a
temporary file in the same folder (``.<name>.<pid>@<host>.<random>.tmp``), flushed and
fsync'ed, then renamed over the target, so a crash, a kill or a full disk never leaves a
half-written file behind and the previous version stays intact. A temporary file left by a
killed process is removed by :func:`remove_stale_temp_files` (only when its process is gone).

Sections that check for a shared cache file and create it when it is missing (split files,
few-shot subsets) run under :func:`file_lock`, so concurrent runs that share a dataset root
never both write it: the second waits and then reads what the first wrote.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import socket
import tempfile
import warnings
from typing import Any, Iterator, List, Optional

logger = logging.getLogger(__name__)

__all__ = [
    "WriteError",
    "CheckpointError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "file_lock",
    "remove_stale_temp_files",
    "safe_torch_load",
    "read_legacy_checkpoint",
    "load_checkpoint",
]


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder, ...).

    ``str()`` is the plain message (no ``[Errno N]`` prefix); ``errno`` is kept."""

    def __str__(self) -> str:
        return str(self.strerror if self.strerror is not None else super().__str__())


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(path: str, e: OSError) -> WriteError:
    """A :class:`WriteError` for ``path`` that says in words what went wrong."""
    if e.errno in _DISK_FULL:
        what = "disk quota exceeded" if e.errno != errno.ENOSPC else "no space left on device"
        msg = (
            f"Cannot write {path}: the disk is full ({what}). The previous version of the "
            f"file, if any, is unchanged; free some space and run the same command again"
        )
    elif e.errno in _NO_PERMISSION:
        msg = f"Cannot write {path}: permission denied (the folder is read-only or not yours)"
    else:
        msg = f"Cannot write {path}: {e.strerror or e}"
    return WriteError(e.errno, msg)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:40]


_TMP_RE = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[^.]+\.tmp$")


def _commit(tmp: str, path: str) -> None:
    """Rename the finished temporary file over the target (a test hook)."""
    os.replace(tmp, path)


def _fsync_dir(folder: str) -> None:
    """Make the rename durable (best effort; not every filesystem supports it)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str, mode: str = "wb", encoding: str | None = None, durable: bool = True
) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it atomically replaces ``path``.

    Any ``OSError`` (full disk, permission, ...) becomes a :class:`WriteError` naming
    ``path``; the temporary file is removed and ``path`` keeps its previous content.
    ``durable=False`` skips the two ``fsync`` calls (for cache files that carry their own
    checksum: after a power loss such a file may be damaged, is detected and recomputed)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.{os.getpid()}@{_host_tag()}.",
            suffix=".tmp",
            dir=folder,
        )
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e) from None
        raise
    if durable:
        _fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    with atomic_open(path, "wb", durable=durable) as f:
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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: nothing of ours is being written right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists but belongs to someone else
        return True
    return True


def remove_stale_temp_files(folder: str, basename: Optional[str] = None) -> List[str]:
    """Remove the temporary files that killed processes of this host left in ``folder``
    (only those of ``basename`` when given); returns the removed paths.

    A temporary file is removed only when the process that wrote it no longer exists, so
    this is safe while other processes write into the same folder."""
    removed: List[str] = []
    if not folder or not os.path.isdir(folder):
        return removed
    host = _host_tag()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if not m or m.group("host") != host:
            continue
        if basename is not None and m.group("base") != basename:
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
            logger.info("Removed %s, left by an interrupted write", path)
    return removed


@contextlib.contextmanager
def _flock(path: str, wait: bool) -> Iterator[bool]:
    """The exclusive ``fcntl.flock`` on ``<path>.lock`` for the ``with`` block; yields whether
    it is held (``wait``: block until it is, with a log line). The kernel releases it when
    the holder exits, however it exits. Without ``fcntl`` the block runs unlocked (True)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    lock_path = path + ".lock"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(lock_path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            logger.info("Waiting for another process to finish writing %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``) for the ``with`` block.

    Use it around "check whether ``path`` exists, create it if not, write it": a second
    process waits until the first has written ``path`` and then finds it. The lock file is
    left in place (removing it would race with waiting processes). On systems without
    ``fcntl`` the block runs unlocked."""
    with _flock(path, wait=True):
        yield


@contextlib.contextmanager
def try_file_lock(path: str) -> Iterator[bool]:
    """Try to take the lock of :func:`file_lock` without waiting; yields whether it was taken
    (held for the ``with`` block). On systems without ``fcntl`` it always yields True."""
    with _flock(path, wait=False) as held:
        yield held


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class _Inert:
    """Stands in for any object a legacy checkpoint pickled (optimizers, schedulers, ...).

    It accepts any construction arguments, state and contents and keeps none of them, so
    nothing from the file is ever executed. Pickle fills objects that it rebuilt with the
    container opcodes too (``SETITEM(S)``, ``APPEND(S)``, ``ADDITEMS``: e.g. the
    ``defaultdict`` of a pickled optimizer's ``state``, keyed by its parameters), so the
    stand-in takes those calls as well: without ``__setitem__``, Python would try the key as
    a sequence index and a parameter tensor fails with "only integer tensors of a single
    element can be converted to an index"."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
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
            # torch.save writes protocol 2, which names the builtins module "__builtin__"
            # (Python 2's); the base class would map it only after this check
            if module == "__builtin__":
                module = "builtins"
            if (module, name) in allowed:
                return super().find_class(module, name)
            # vars(), not getattr(): torch's module __getattr__ imports submodules by name
            dtype = vars(torch).get(name) if module == "torch" else None
            if isinstance(dtype, torch.dtype):
                return dtype
            return _Inert

    def load(file: Any, **kwargs: Any) -> Any:
        # torch reads the header pickles of old-format files with ``pickle_module.load``:
        # they must go through the restricted unpickler too, never ``pickle.load``
        return RestrictedUnpickler(file, **kwargs).load()

    mod = types.ModuleType("coop_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.__name__ = "coop_restricted_pickle"
    return mod


def _is_inert(obj: Any) -> bool:
    # the class itself too: a pickled reference to a class (not an instance) resolves to it
    return obj is _Inert or isinstance(obj, _Inert)


def _strip_inert(obj: Any) -> Any:
    """``obj`` with every stand-in replaced by ``None`` (in dicts, lists and tuples); a dict
    entry whose key is a stand-in and a stand-in member of a set are dropped."""
    if _is_inert(obj):
        return None
    if isinstance(obj, dict):
        return type(obj)((k, _strip_inert(v)) for k, v in obj.items() if not _is_inert(k))
    if isinstance(obj, list):
        return [_strip_inert(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_strip_inert(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(v for v in obj if not _is_inert(v))
    return obj


def read_legacy_checkpoint(path: str) -> Any:
    """Read a Dassl-format checkpoint (e.g. the released CoOp models) without unpickling
    arbitrary objects: tensors, numbers, strings and containers are kept; every other
    pickled object is replaced by ``None``.

    In a checkpoint of Dassl's ``save_checkpoint`` that is the scheduler's ``successor``
    (Dassl's warm-up wrapper keeps the wrapped scheduler, and with it the optimizer
    instance, in its state dict); ``state_dict``, ``epoch``, ``val_result`` and the
    optimizer's state dict (plain dicts of tensors) are kept. A TorchScript archive is
    refused before anything is loaded: ``torch.load`` would hand it to ``torch.jit.load``,
    which compiles and runs the code stored in the file."""
    import zipfile

    import torch

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            raise CheckpointError(
                f"{path} is a TorchScript archive, not a checkpoint: it is not loaded (loading "
                "it would run the code it holds)"
            )
    try:
        obj = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module()
        )
        return _strip_inert(obj)
    except Exception as e:  # noqa: BLE001 - any failure means: not a readable checkpoint
        # (RecursionError included: a file may nest containers deeper than the stack)
        raise CheckpointError(f"Cannot read checkpoint {path}: {e}") from None


def read_checkpoint(path: str) -> Any:
    """Read any checkpoint file safely: ``torch.load(weights_only=True)``, else the
    restricted reader (:func:`read_legacy_checkpoint`)."""
    import os

    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f'No checkpoint at "{path}"')
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": we fall back
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - fall back to the restricted reader
        return read_legacy_checkpoint(path)


def load_checkpoint(path: str) -> Any:
    """Load a checkpoint safely.

    Our own checkpoints hold only tensors and plain values and load with
    ``weights_only=True``. Legacy Dassl checkpoints, which also pickle optimizer and
    scheduler objects, are read by :func:`read_legacy_checkpoint`, which builds tensors and
    containers only. No code path unpickles arbitrary objects.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a dict with a 'state_dict' entry"
        )
    return ckpt


def sha256_file(path: str) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
