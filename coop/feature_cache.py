"""A disk cache of frozen image features for evaluation splits.

The image encoder is frozen, so the features of a test split depend only on the weights, the
images, the test transform, the precision, the batch partition and the device. They are
computed once and reused by every run, seed and method that evaluates the same split. The
key is a SHA-256 over all of these (the weights by content hash, each image by path, size
and modification time), so any change gives a new entry. Entries hold tensors only (loaded
with ``weights_only=True``), are written atomically under a file lock, and concurrent runs
share them safely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from coop.io import atomic_torch_save, atomic_write_json, file_lock, sha256_file

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


def file_sha256(path: str, cache_dir: str) -> str:
    """SHA-256 of a file, memoised in ``cache_dir`` by (path, size, mtime)."""
    st = os.stat(path)
    memo_path = os.path.join(cache_dir, "file_hashes.json")
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
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
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{int(label)}\n".encode())
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
