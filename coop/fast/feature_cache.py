"""Disk caches of frozen image features: evaluation splits and seeded training views.

The image encoder is frozen, so the features of a test split depend only on the weights, the
images, the test transform, the precision, the batch partition and the device. They are
computed once and reused by every run, seed and method that evaluates the same split. The
key is a SHA-256 over all of these (the weights by content hash, each image by path, size
and modification time), so any change gives a new entry. Entries hold tensors only (loaded
with ``weights_only=True``), are written atomically under a file lock, and concurrent runs
share them safely.

The opt-in training feature cache (:class:`TrainViewCache`) keeps, per training image, the
features of its augmented views 0, 1, ...; view ``v`` is drawn with a seed that depends only
on the image's path and ``v`` (:func:`view_seed`), so the runs of a sweep (seeds, shot
counts, methods) share the views of the images their few-shot subsets have in common.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import struct
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from coop.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    sha256_file,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_cache_dir(cfg_value: str = "") -> str:
    """``FAST.CACHE_DIR``, else ``$COOP_CACHE_DIR``, else ``~/.cache/coop``."""
    path = cfg_value or os.environ.get("COOP_CACHE_DIR") or os.path.join("~", ".cache", "coop")
    return os.path.abspath(os.path.expanduser(path))


def _read_memo(memo_path: str) -> Dict[str, str]:
    try:
        with open(memo_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def file_identity(path: str) -> str:
    """``absolute path|size|mtime_ns``: what the caches take a file to be (a changed file
    gets a new identity)."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def file_sha256(path: str, cache_dir: str) -> str:
    """SHA-256 of a file, memoised in ``cache_dir`` by (path, size, mtime)."""
    memo_path = os.path.join(cache_dir, "file_hashes.json")
    ident = file_identity(path)
    known = _read_memo(memo_path).get(ident)
    if known is not None:
        return known
    digest = sha256_file(path)
    with file_lock(memo_path):
        memo = _read_memo(memo_path)  # again: another run may have added entries meanwhile
        memo[ident] = digest
        atomic_write_json(memo_path, memo, indent=None)
    return digest


def split_fingerprint(impaths: Sequence[str], labels: Sequence[int]) -> str:
    """SHA-256 over every image's path, size, modification time and label, in order."""
    h = hashlib.sha256()
    for path, label in zip(impaths, labels):
        h.update(f"{file_identity(path)}|{int(label)}\n".encode())
    return h.hexdigest()


def cache_key(parts: Dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class FeatureCache:
    """Image-feature entries under ``<root>/features/<key>.pt``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.folder = os.path.join(root, "features")

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.pt")

    def load(self, key: str) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("version") != FORMAT_VERSION:
                return None
            return list(entry["features"]), list(entry["labels"])
        except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, not trusted
            logger.warning(f"Ignoring the unreadable feature cache entry {path} ({e})")
            return None

    def store(
        self,
        key: str,
        features: List[torch.Tensor],
        labels: List[torch.Tensor],
        meta: Dict[str, Any],
    ) -> None:
        path = self.path(key)
        entry = {
            "version": FORMAT_VERSION,
            "features": [f.cpu() for f in features],
            "labels": [lb.cpu() for lb in labels],
            "meta": json.dumps(meta, sort_keys=True, default=str),
        }
        with file_lock(path):
            if not os.path.isfile(path):
                atomic_torch_save(entry, path)


def draw_loader_seed() -> None:
    """Consume the one int64 that creating a DataLoader iterator draws from torch's global
    generator, so skipping a pass over a loader leaves the random stream as the original's."""
    torch.empty((), dtype=torch.int64).random_()


# --------------------------------------------------------------------------------------
# Training views (FAST.TRAIN_FEATURE_CACHE)
# --------------------------------------------------------------------------------------

TRAIN_VIEWS_FORMAT = 2  # 2: raw checksummed .views files (1: torch.save .pt)


def view_seed(impath: str, view: int) -> int:
    """The seed of augmented view ``view`` of an image: a function of the image's absolute
    path and ``view`` only (not of the run's seed, shot count or the image's position)."""
    digest = hashlib.sha256(f"{os.path.abspath(impath)}|{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@contextlib.contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator and Python's ``random`` seeded with ``seed``;
    both streams are restored afterwards (CUDA generators are not touched)."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            yield
    finally:
        random.setstate(state)


class SeededViews(torch.utils.data.Dataset):
    """Item ``j`` is view ``pairs[j][1]`` of image ``pairs[j][0]`` of ``wrapper`` (a
    :class:`~coop.data.DatasetWrapper` with the training transform), augmented under
    :func:`view_seed`, as ``{"img": tensor, "pos": j}``. The seeding happens per item, so
    the views are the same with any number of DataLoader workers."""

    def __init__(self, wrapper: Any, pairs: Sequence[Tuple[int, int]]) -> None:
        self.wrapper = wrapper
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> Dict[str, Any]:
        idx, view = self.pairs[j]
        with seeded_random(view_seed(self.wrapper.data_source[idx].impath, view)):
            item = self.wrapper[idx]
        return {"img": item["img"], "pos": j}


# One training-view file: a fixed header, then the (V, E) features' raw bytes (native byte
# order, which the entry's key records). The header holds a magic string, V, E, a dtype code
# and a BLAKE2b digest of the payload, so a file that is short, stale or damaged (written
# without fsync; see TrainViewCache.store) is recognised and its views recomputed.
_VIEWS_MAGIC = b"COOPVW02"
_VIEWS_HEADER = struct.Struct("<8sIIB3x16s")
_VIEWS_DTYPES = {1: torch.float16, 2: torch.float32, 3: torch.bfloat16, 4: torch.float64}
_VIEWS_CODES = {v: k for k, v in _VIEWS_DTYPES.items()}


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def encode_views(feats: torch.Tensor) -> bytes:
    """The file contents of a (V, E) tensor of views (see :func:`decode_views`)."""
    if feats.dim() != 2 or feats.dtype not in _VIEWS_CODES:
        raise ValueError(
            f"expected a (views, dim) float tensor, got {feats.dtype} {tuple(feats.shape)}"
        )
    t = feats.detach().cpu().contiguous()
    payload = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    head = _VIEWS_HEADER.pack(
        _VIEWS_MAGIC, t.shape[0], t.shape[1], _VIEWS_CODES[t.dtype], _digest(payload)
    )
    return head + payload


def decode_views(data: bytes) -> torch.Tensor:
    """The (V, E) tensor of a view file's contents; ``ValueError`` saying what is wrong."""
    if len(data) < _VIEWS_HEADER.size or data[:8] != _VIEWS_MAGIC:
        raise ValueError("not a training-view file (no COOPVW02 header)")
    _, views, dim, code, digest = _VIEWS_HEADER.unpack_from(data)
    dtype = _VIEWS_DTYPES.get(code)
    if dtype is None:
        raise ValueError(f"unknown dtype code {code}")
    payload = data[_VIEWS_HEADER.size :]
    size = views * dim * torch.empty((), dtype=dtype).element_size()
    if len(payload) != size:
        raise ValueError(f"{len(payload)} bytes of features, expected {size} (a truncated file)")
    if _digest(payload) != digest:
        raise ValueError("its checksum does not match its contents")
    if not size:
        return torch.empty((views, dim), dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=dtype).view(views, dim)


def read_views(path: str) -> torch.Tensor:
    """The (V, E) views stored in the training-view file ``path``."""
    with open(path, "rb") as f:
        return decode_views(f.read())


class TrainViewCache:
    """Features of seeded training views, one file per image, under
    ``<root>/train_views/<key>/``.

    The key covers everything the features depend on except which images are used, so runs
    of any seed, shot count or method that share the backbone, precision and training
    transform share the entry. ``<sha256(path|size|mtime_ns)>.views`` holds a (V_i, E)
    tensor of an image's views 0..V_i-1 (:func:`encode_views`: raw bytes behind a checksummed
    header, read without unpickling, since a 16-shot ImageNet run reads 16,000 of them);
    ``meta.json`` records E, the dtype and the key's parts. Views are only ever appended: a
    file is rewritten (atomically, under the entry's lock) with its existing views kept as
    they are, so every run reads the same features for a given view.
    """

    def __init__(
        self, root: str, key: str, parts: Dict[str, Any], subdir: str = "train_views"
    ) -> None:
        self.folder = os.path.join(root, subdir, key)
        self.parts = parts
        self.meta_path = os.path.join(self.folder, "meta.json")

    def image_file(self, impath: str) -> str:
        ident = file_identity(impath)
        return os.path.join(self.folder, hashlib.sha256(ident.encode()).hexdigest() + ".views")

    def read_meta(self) -> Optional[Tuple[int, str]]:
        """``(E, dtype)`` of the entry, or ``None`` when it has no readable ``meta.json``."""
        if not os.path.isfile(self.meta_path):
            return None
        try:
            with open(self.meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            return int(meta["dim"]), str(meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning(f"Ignoring the unreadable {self.meta_path} ({e}); recomputing views")
            return None

    def load(
        self, path: str, meta: Tuple[int, str], impath: str = "", warn: bool = True
    ) -> Optional[torch.Tensor]:
        """The (V_i, E) views stored in ``path``; ``None`` when it is missing or damaged
        (a damaged file is reported when ``warn``)."""
        dim, dtype = meta
        try:
            try:
                feats = read_views(path)
            except FileNotFoundError:
                return None
            if feats.dim() != 2 or feats.shape[0] < 1 or feats.shape[1] != dim:
                raise ValueError(f"shape {tuple(feats.shape)}, expected (views, {dim})")
            if str(feats.dtype) != dtype:
                raise ValueError(f"dtype {feats.dtype}, expected {dtype}")
        except Exception as e:  # noqa: BLE001 - a damaged file is recomputed, not trusted
            if warn:
                logger.warning(
                    f"Recomputing the training views of {impath or path}: the cache file "
                    f"{path} is damaged ({e})"
                )
            return None
        return feats

    def store(self, updates: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Write each ``path -> (V_i, E)`` of ``updates`` unless the file already holds at
        least as many views; views already on disk win over the given ones. Returns the
        features now on disk for each path (what the run must use)."""
        if not updates:
            return {}
        first = next(iter(updates.values()))
        meta = (int(first.shape[1]), str(first.dtype))
        out: Dict[str, torch.Tensor] = {}
        with file_lock(self.meta_path):
            if self.read_meta() != meta:
                record = {"dim": meta[0], "dtype": meta[1], "parts": self.parts}
                atomic_write_json(self.meta_path, json.loads(json.dumps(record, default=str)))
            for path, feats in updates.items():
                disk = self.load(path, meta, warn=False)
                n = 0 if disk is None else disk.shape[0]
                if disk is not None and n >= feats.shape[0]:
                    out[path] = disk
                    continue
                merged = feats if disk is None else torch.cat([disk, feats[n:]])
                merged = merged.contiguous().clone()
                # no fsync: the file's checksum catches what a power loss may leave behind
                atomic_write_bytes(path, encode_views(merged), durable=False)
                out[path] = merged
        return out
