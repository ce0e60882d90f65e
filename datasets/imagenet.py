"""ImageNet (``imagenet/images/{train,val}/<wnid>/*``, ``imagenet/classnames.txt``).

The validation set is the test set (and also the val set). Labels are the indices of the
wnid folders in sorted order; class names come from ``classnames.txt`` (CLIP's curated
names). Few-shot sampling draws from train only.

The original keeps the lists in ``preprocessed.pkl`` and trusts it blindly, so it serves
stale lists after images are added or removed, or after the dataset moves. Ours is a JSON
file, ``<cache root>/preprocessed.json`` (the dataset folder, or DATASET.CACHE_DIR), that
records the dataset folder it was built from and a fingerprint of the folder listing (the
names of all class folders and images, and classnames.txt); it is rebuilt when either
differs. A dataset folder that cannot be written just runs without the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from coop.data import DatasetBase, Datum
from coop.io import WriteError, atomic_write_json
from coop.registry import DATASET_REGISTRY
from coop.splits import DatasetNotFoundError, cache_root, dir_is_writable, load_or_create_fewshot

logger = logging.getLogger(__name__)

CACHE_FILE = "preprocessed.json"
CACHE_VERSION = 1

# [(wnid, [image file names])] for one split, folders and names sorted
Listing = List[Tuple[str, List[str]]]


def read_classnames(path: str) -> OrderedDict[str, str]:
    """``{wnid: class name}`` in file order from lines ``<wnid> <class name words>``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: it lists '<wnid> <class name>' per line (see DATASETS.md)"
        )
    classnames: OrderedDict[str, str] = OrderedDict()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            words = line.strip().split()
            if not words:
                continue
            if len(words) < 2:
                raise ValueError(f"{path}:{lineno}: expected '<wnid> <class name>', got {line!r}")
            classnames[words[0]] = " ".join(words[1:])
    return classnames


def sorted_subdirs(path: str) -> List[str]:
    """The non-hidden sub-directories of ``path``, sorted."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def sorted_images(path: str) -> List[str]:
    """The non-hidden files of ``path``, sorted.

    Deliberate difference from the original, which keeps the ``os.listdir`` order: that
    order differs between filesystems and few-shot sampling depends on it, so sorting makes
    the lists (and the sampled shots) depend only on the files and the seed.
    """
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())


@DATASET_REGISTRY.register()
class ImageNet(DatasetBase):
    dataset_dir = "imagenet"
    image_dir = "images"

    def __init__(self, cfg: Any) -> None:
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.root = root
        self.dataset_dir = os.path.join(root, type(self).dataset_dir)
        self.image_dir = os.path.join(self.dataset_dir, type(self).image_dir)
        self.cache_root = cache_root(cfg, self.dataset_dir)
        self.preprocessed = os.path.join(self.cache_root, CACHE_FILE)
        if not os.path.isdir(self.dataset_dir):
            raise DatasetNotFoundError(
                f"ImageNet not found: the folder {self.dataset_dir} does not exist. "
                f"DATASET.ROOT ({root}) must contain the folder 'imagenet' "
                f"(see DATASETS.md for how to download and arrange it)"
            )
        classnames = read_classnames(os.path.join(self.dataset_dir, "classnames.txt"))
        train, test = self._load_lists(classnames)

        train, _ = load_or_create_fewshot(self, cfg, train, None)  # train only
        subsample = cfg.DATASET.get("SUBSAMPLE_CLASSES", "all")
        train, test = self.subsample_classes(train, test, subsample=subsample)
        super().__init__(train_x=train, val=test, test=test)

    @staticmethod
    def read_classnames(path: str) -> OrderedDict[str, str]:
        return read_classnames(path)

    # ---------------------------------------------------------------- listing

    def _list_split(self, split: str) -> Listing:
        split_dir = os.path.join(self.image_dir, split)
        if not os.path.isdir(split_dir):
            raise DatasetNotFoundError(
                f"ImageNet: the folder {split_dir} does not exist; the images must be in "
                f"images/train/<wnid>/ and images/val/<wnid>/ (see DATASETS.md)"
            )
        folders = sorted_subdirs(split_dir)
        if not folders:
            hint = ""
            if sorted_images(split_dir):
                hint = " (it holds images directly: arrange them in one folder per wnid)"
            raise ValueError(f"ImageNet: no class folders in {split_dir}{hint}")
        return [(wnid, sorted_images(os.path.join(split_dir, wnid))) for wnid in folders]

    def _list_all(self, classnames: Dict[str, str]) -> Dict[str, Listing]:
        listing = {split: self._list_split(split) for split in ("train", "val")}
        train_wnids = [w for w, _ in listing["train"]]
        val_wnids = [w for w, _ in listing["val"]]
        if train_wnids != val_wnids:
            only_train = sorted(set(train_wnids) - set(val_wnids))
            only_val = sorted(set(val_wnids) - set(train_wnids))
            raise ValueError(
                "ImageNet: images/train and images/val must hold the same wnid folders "
                f"(labels are indices in their sorted list); only in train: {only_train[:5]}, "
                f"only in val: {only_val[:5]}"
            )
        for split in ("train", "val"):
            empty = [w for w, files in listing[split] if not files]
            if empty:
                raise ValueError(
                    f"ImageNet: the class folder(s) {empty[:5]} in "
                    f"{os.path.join(self.image_dir, split)} hold no images"
                )
        unknown = [w for w in train_wnids if w not in classnames]
        if unknown:
            raise ValueError(
                f"ImageNet: the folder(s) {unknown[:5]} are not listed in "
                f"{os.path.join(self.dataset_dir, 'classnames.txt')}"
            )
        return listing

    @staticmethod
    def _fingerprint(listing: Dict[str, Listing], classnames: Dict[str, str]) -> str:
        h = hashlib.sha256()
        for wnid, name in classnames.items():
            h.update(f"C {wnid} {name}\n".encode())
        for split in ("train", "val"):
            for wnid, names in listing[split]:
                h.update(f"D {split}/{wnid} {len(names)}\n".encode())
                h.update("".join(f"F {name}\n" for name in names).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ cache

    def _load_lists(self, classnames: Dict[str, str]) -> Tuple[List[Datum], List[Datum]]:
        listing = self._list_all(classnames)
        fingerprint = self._fingerprint(listing, classnames)
        if os.path.isfile(self.preprocessed):
            cached = self._read_cache(fingerprint)
            if cached is not None:
                logger.info("Loading preprocessed ImageNet lists from %s", self.preprocessed)
                return cached

        wnids = [w for w, _ in listing["train"]]
        names = [classnames[w] for w in wnids]
        records = {
            split: [
                [f"{type(self).image_dir}/{folder}/{wnid}/{name}", label]
                for label, (wnid, files) in enumerate(listing[folder])
                for name in files
            ]
            for split, folder in (("train", "train"), ("test", "val"))
        }
        train = self._from_records(records["train"], names)
        test = self._from_records(records["test"], names)
        self._write_cache(
            {
                "version": CACHE_VERSION,
                "dataset_dir": self.dataset_dir,
                "fingerprint": fingerprint,
                "num_classes": len(wnids),
                "num_images": {"train": len(train), "test": len(test)},
                "classnames": names,
                "train": records["train"],
                "test": records["test"],
            }
        )
        return train, test

    def _from_records(self, records: Sequence[Sequence[Any]], names: Sequence[str]) -> List[Datum]:
        return [
            Datum(
                impath=os.path.join(self.dataset_dir, *rel.split("/")),
                label=int(label),
                classname=names[label],
            )
            for rel, label in records
        ]

    def _read_cache(self, fingerprint: str) -> Optional[Tuple[List[Datum], List[Datum]]]:
        path = self.preprocessed
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("version") != CACHE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
        except (OSError, ValueError) as e:
            logger.warning("Ignoring the ImageNet cache %s (%s); rebuilding it", path, e)
            return None
        if data.get("dataset_dir") != self.dataset_dir:
            logger.warning(
                "The ImageNet cache %s was made for %s, not %s; rebuilding it",
                path,
                data.get("dataset_dir"),
                self.dataset_dir,
            )
            return None
        if data.get("fingerprint") != fingerprint:
            logger.warning(
                "The ImageNet images or classnames.txt changed since the cache %s was made; "
                "rebuilding it",
                path,
            )
            return None
        try:
            names = data["classnames"]
            return (
                self._from_records(data["train"], names),
                self._from_records(data["test"], names),
            )
        except (KeyError, TypeError, ValueError, IndexError, OSError) as e:
            logger.warning("Ignoring the ImageNet cache %s (%s); rebuilding it", path, e)
            return None

    def _write_cache(self, obj: Dict[str, Any]) -> None:
        path = self.preprocessed
        if not dir_is_writable(os.path.dirname(path)):
            logger.warning(
                "Cannot write the ImageNet cache to %s (not writable); continuing without it. "
                "Set DATASET.CACHE_DIR to a writable folder to keep one",
                path,
            )
            return
        try:
            atomic_write_json(path, obj, indent=None)
        except WriteError as e:
            logger.warning("Cannot write the ImageNet cache (%s); continuing without it", e)
            return
        logger.info("Saved preprocessed ImageNet lists to %s", path)
