"""Split machinery shared by the datasets: split JSON files, split generation, few-shot cache.

The split JSON (``split_zhou_<Name>.json``) and the generation rules are CoOp's. The few-shot
cache is CoOp's ``split_fewshot/shot_{K}-seed_{SEED}`` file, stored as JSON (not pickle),
with a fingerprint of the split it was drawn from so that a changed split is never served
stale items.

Both files are created under a file lock (``<file>.lock`` beside the file, see
:func:`coop.io.file_lock`): runs that share a dataset root and start together never write
the same file twice; the later ones wait and then read what the first one wrote. A split
JSON is checked when read: its labels must be 0..n-1 (every one present in train), each label
with one class name, and val/test labels must occur in train.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from coop.data import DatasetBase, Datum, MissingImageError
from coop.io import WriteError, atomic_write_json, file_lock, remove_stale_temp_files

logger = logging.getLogger(__name__)

__all__ = [
    "SplitFileError",
    "DatasetNotFoundError",
    "NotWritableError",
    "listdir_nohidden",
    "read_split",
    "save_split",
    "read_and_split_data",
    "split_trainval",
    "dir_is_writable",
    "cache_root",
    "fewshot_cache_path",
    "load_or_create_fewshot",
    "SplitDataset",
]

FEWSHOT_CACHE_VERSION = 1

Split = Tuple[List[Datum], List[Datum], List[Datum]]


class SplitFileError(ValueError):
    """A split JSON file that cannot be used."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder is not where the config says it is."""


class NotWritableError(PermissionError):
    """A cache or split file must be written, but its folder is not writable."""


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def listdir_nohidden(path: str, sort: bool = False) -> List[str]:
    """``os.listdir`` without names starting with "."; sorted only when ``sort``."""
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    if sort:
        items.sort()
    return items


def dir_is_writable(path: str) -> bool:
    """Whether files can be created in ``path`` (or, if it does not exist yet, in the
    nearest existing folder above it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _relpath(impath: str, prefix: str) -> str:
    """Strip ``prefix`` from ``impath`` and then one leading "/" (CoOp's convention)."""
    if prefix and impath.startswith(prefix):
        impath = impath[len(prefix) :]
    if impath.startswith("/"):
        impath = impath[1:]
    return impath


# --------------------------------------------------------------------------------------
# Split JSON
# --------------------------------------------------------------------------------------


def _parse_items(filepath: str, key: str, entries: Any, path_prefix: str) -> List[Datum]:
    if not isinstance(entries, list):
        raise SplitFileError(
            f"Split file {filepath}: '{key}' must be a list of [path, label, classname], "
            f"got {type(entries).__name__}"
        )
    out: List[Datum] = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise SplitFileError(
                f"Split file {filepath}: {key}[{i}] must be [path, label, classname], got {entry!r}"
            )
        relpath, label, classname = entry
        if not isinstance(relpath, str) or not isinstance(classname, str):
            raise SplitFileError(
                f"Split file {filepath}: {key}[{i}] must hold a path string and a classname "
                f"string, got {entry!r}"
            )
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise SplitFileError(
                f"Split file {filepath}: {key}[{i}] has a label that is not an integer: {label!r}"
            ) from None
        impath = os.path.join(path_prefix, relpath)
        try:
            out.append(Datum(impath=impath, label=label, classname=classname))
        except MissingImageError as e:
            raise MissingImageError(f"{e} (listed in split file {filepath})") from None
    return out


def read_split(filepath: str, path_prefix: str) -> Split:
    """Read a CoOp split JSON; paths are joined to ``path_prefix``, labels made ``int``."""
    logger.info("Reading split from %s", filepath)
    try:
        with open(filepath, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SplitFileError(f"Split file {filepath} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SplitFileError(
            f"Split file {filepath} must hold an object with keys train, val and test"
        )
    missing = [k for k in ("train", "val", "test") if k not in data]
    if missing:
        raise SplitFileError(f"Split file {filepath} lacks the key(s) {', '.join(missing)}")
    train = _parse_items(filepath, "train", data["train"], path_prefix)
    val = _parse_items(filepath, "val", data["val"], path_prefix)
    test = _parse_items(filepath, "test", data["test"], path_prefix)
    check_split_labels(filepath, train, val, test)
    return train, val, test


def check_split_labels(
    filepath: str, train: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum]
) -> None:
    """Refuse labels that cannot work: negative, one label with two class names, train
    labels that are not 0..n-1 without gaps, or a val/test label that train lacks."""
    names: Dict[int, Tuple[str, str]] = {}
    for key, items in (("train", train), ("val", val), ("test", test)):
        for i, item in enumerate(items):
            label = item.label
            if label < 0:
                raise SplitFileError(
                    f"Split file {filepath}: {key}[{i}] has a negative label {label}"
                )
            seen = names.setdefault(label, (item.classname, f"{key}[{i}]"))
            if seen[0] != item.classname:
                raise SplitFileError(
                    f"Split file {filepath}: label {label} is {seen[0]!r} in {seen[1]} but "
                    f"{item.classname!r} in {key}[{i}]; each label must name one class"
                )
    if not train:
        raise SplitFileError(f"Split file {filepath}: the train list is empty")
    train_labels = {item.label for item in train}
    n = max(train_labels) + 1
    gaps = sorted(set(range(n)) - train_labels)
    if gaps:
        raise SplitFileError(
            f"Split file {filepath}: the train labels must be 0..{n - 1} without gaps (one per "
            f"class), but no train item has label(s) {gaps[:10]}"
        )
    for key, items in (("val", val), ("test", test)):
        for i, item in enumerate(items):
            if item.label not in train_labels:
                raise SplitFileError(
                    f"Split file {filepath}: {key}[{i}] has label {item.label}, out of the "
                    f"range of the train labels 0..{n - 1} ({n} classes)"
                )


def save_split(
    train: Sequence[Datum],
    val: Sequence[Datum],
    test: Sequence[Datum],
    filepath: str,
    path_prefix: str,
) -> None:
    """Write a CoOp split JSON (paths relative to ``path_prefix``, indent 4), atomically."""

    def convert(items: Sequence[Datum]) -> List[List[Any]]:
        return [[_relpath(it.impath, path_prefix), it.label, it.classname] for it in items]

    split = {"train": convert(train), "val": convert(val), "test": convert(test)}
    atomic_write_json(filepath, split, indent=4)
    logger.info("Saved split to %s", filepath)


# --------------------------------------------------------------------------------------
# Split generation
# --------------------------------------------------------------------------------------


def read_and_split_data(
    image_dir: str,
    p_trn: float = 0.5,
    p_val: float = 0.2,
    ignored: Sequence[str] = (),
    new_cnames: Optional[Dict[str, str]] = None,
) -> Split:
    """Split each category folder of ``image_dir`` into train/val/test (CoOp's DTD rule).

    Categories: the sorted (case-sensitive) non-hidden folders minus ``ignored``; label =
    index in that list, given before renaming with ``new_cnames``. Per category in label
    order: its images (sorted, see below), one ``random.shuffle``, then
    ``n_train = round(n*p_trn)``, ``n_val = round(n*p_val)``, the rest is test.

    Deliberate difference from CoOp: the images of a category are sorted before the shuffle
    (CoOp uses the filesystem order), so a generated split depends only on files and seed.
    """
    p_tst = 1 - p_trn - p_val
    logger.info(
        "Splitting into %.0f%% train, %.0f%% val, and %.0f%% test",
        p_trn * 100,
        p_val * 100,
        p_tst * 100,
    )
    ignored = set(ignored)
    categories = [
        c
        for c in listdir_nohidden(image_dir, sort=True)
        if c not in ignored and os.path.isdir(os.path.join(image_dir, c))
    ]
    if not categories:
        raise ValueError(f"No category folders found in {image_dir}")

    # list every category first so that a bad one fails before any random number is used
    listed: List[Tuple[int, str, List[str], int, int]] = []
    for label, category in enumerate(categories):
        category_dir = os.path.join(image_dir, category)
        images = [
            os.path.join(category_dir, name) for name in listdir_nohidden(category_dir, sort=True)
        ]
        n = len(images)
        n_train = round(n * p_trn)
        n_val = round(n * p_val)
        n_test = n - n_train - n_val
        if not (n_train > 0 and n_val > 0 and n_test > 0):
            raise ValueError(
                f"The category folder {category_dir} has {n} image(s), too few for a "
                f"{p_trn:.0%}/{p_val:.0%}/{p_tst:.0%} split (train {n_train}, val {n_val}, "
                f"test {n_test}; each must be > 0)"
            )
        listed.append((label, category, images, n_train, n_val))

    new_cnames = new_cnames or {}
    train: List[Datum] = []
    val: List[Datum] = []
    test: List[Datum] = []
    for label, category, images, n_train, n_val in listed:
        random.shuffle(images)
        classname = new_cnames.get(category, category)

        def make(paths: List[str], label: int = label, classname: str = classname) -> List[Datum]:
            return [Datum(impath=p, label=label, classname=classname) for p in paths]

        train.extend(make(images[:n_train]))
        val.extend(make(images[n_train : n_train + n_val]))
        test.extend(make(images[n_train + n_val :]))
    return train, val, test


def split_trainval(
    trainval: Sequence[Datum], p_val: float = 0.2
) -> Tuple[List[Datum], List[Datum]]:
    """Split each label of ``trainval`` into train and val (CoOp's OxfordPets rule).

    Labels in order of first appearance; per label ``n_val = round(n*p_val)`` (> 0), one
    ``random.shuffle`` of the indices, the first ``n_val`` go to val, the rest to train.
    """
    p_trn = 1 - p_val
    logger.info("Splitting trainval into %.0f%% train and %.0f%% val", p_trn * 100, p_val * 100)
    tracker: Dict[int, List[int]] = defaultdict(list)
    for idx, item in enumerate(trainval):
        tracker[item.label].append(idx)
    for label, idxs in tracker.items():
        if round(len(idxs) * p_val) <= 0:
            raise ValueError(
                f"Label {label} ({trainval[idxs[0]].classname!r}) has {len(idxs)} image(s), "
                f"too few to put {p_val:.0%} of them into val"
            )
    train: List[Datum] = []
    val: List[Datum] = []
    for _label, idxs in tracker.items():
        n_val = round(len(idxs) * p_val)
        random.shuffle(idxs)
        for n, idx in enumerate(idxs):
            item = trainval[idx]
            new_item = Datum(impath=item.impath, label=item.label, classname=item.classname)
            (val if n < n_val else train).append(new_item)
    return train, val


# --------------------------------------------------------------------------------------
# Few-shot cache
# --------------------------------------------------------------------------------------


def cache_root(cfg: Any, dataset_dir: str) -> str:
    """The dataset folder, or ``<DATASET.CACHE_DIR>/<dataset folder name>`` when set."""
    cache_dir = cfg.DATASET.get("CACHE_DIR", "")
    if cache_dir:
        base = os.path.abspath(os.path.expanduser(cache_dir))
        return os.path.join(base, os.path.basename(os.path.normpath(dataset_dir)))
    return dataset_dir


def fewshot_cache_path(cfg: Any, dataset_dir: str) -> str:
    """``<cache root>/split_fewshot/shot_{K}-seed_{SEED}.json``."""
    name = f"shot_{cfg.DATASET.NUM_SHOTS}-seed_{cfg.SEED}.json"
    return os.path.join(cache_root(cfg, dataset_dir), "split_fewshot", name)


def _records(items: Optional[Sequence[Datum]], dataset_dir: str) -> Optional[List[List[Any]]]:
    if items is None:
        return None
    return [
        [os.path.relpath(it.impath, dataset_dir).replace(os.sep, "/"), it.label, it.classname]
        for it in items
    ]


def _fingerprint(train_rec: Any, val_rec: Any) -> str:
    blob = json.dumps({"train": train_rec, "val": val_rec}, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _from_records(records: Any, dataset_dir: str) -> Optional[List[Datum]]:
    if records is None:
        return None
    return [
        Datum(impath=os.path.join(dataset_dir, rel), label=int(label), classname=cname)
        for rel, label, cname in records
    ]


def _require_writable(folder: str, cfg: Any, what: str) -> None:
    if dir_is_writable(folder):
        return
    if cfg.DATASET.get("CACHE_DIR", ""):
        raise NotWritableError(
            f"Cannot write the {what} to {folder}: DATASET.CACHE_DIR is not writable"
        )
    raise NotWritableError(
        f"Cannot write the {what} to {folder}: the dataset folder is not writable. "
        f"Set DATASET.CACHE_DIR to a writable folder (e.g. DATASET.CACHE_DIR ~/.cache/coop)"
    )


def _write_json(path: str, obj: Any, cfg: Any, what: str) -> None:
    folder = os.path.dirname(path)
    _require_writable(folder, cfg, what)
    try:
        atomic_write_json(path, obj, indent=4)
    except WriteError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        raise NotWritableError(
            f"{e}. Set DATASET.CACHE_DIR to a writable folder for the {what}"
        ) from None


def load_or_create_fewshot(
    dataset: DatasetBase,
    cfg: Any,
    train: List[Datum],
    val: Optional[List[Datum]] = None,
) -> Tuple[List[Datum], Optional[List[Datum]]]:
    """The K-shot train (and min(K, 4)-shot val) subsets, from the JSON cache or drawn anew.

    ``dataset.dataset_dir`` must be the absolute dataset folder. With ``NUM_SHOTS < 1`` the
    inputs are returned and nothing is touched. A cache whose fingerprint (of the full
    ``train``/``val`` lists) differs from the current lists is rebuilt, with a warning.
    Creating draws from Python's ``random``: train with K, then val with min(K, 4).
    """
    num_shots = cfg.DATASET.NUM_SHOTS
    if num_shots < 1:
        return train, val
    dataset_dir = dataset.dataset_dir
    path = fewshot_cache_path(cfg, dataset_dir)
    train_rec = _records(train, dataset_dir)
    val_rec = _records(val, dataset_dir)
    source = _fingerprint(train_rec, val_rec)

    if os.path.isfile(path):
        cached = _load_fewshot(path, num_shots, cfg.SEED, source, dataset_dir)
        if cached is not None:
            logger.info("Loading preprocessed few-shot data from %s", path)
            # a run killed while writing another copy of it left its temporary file
            remove_stale_temp_files(os.path.dirname(path), os.path.basename(path))
            return cached
        # fall through: rebuild (the warning was logged by _load_fewshot)

    _require_writable(os.path.dirname(path), cfg, "few-shot cache")
    with file_lock(path):
        # another run may have written it while this one waited for the lock
        if os.path.isfile(path):
            cached = _load_fewshot(path, num_shots, cfg.SEED, source, dataset_dir, quiet=True)
            if cached is not None:
                logger.info("Loading preprocessed few-shot data from %s", path)
                return cached
        remove_stale_temp_files(os.path.dirname(path), os.path.basename(path))
        return _create_fewshot(dataset, cfg, path, source, train, val)


def _create_fewshot(
    dataset: DatasetBase,
    cfg: Any,
    path: str,
    source: str,
    train: List[Datum],
    val: Optional[List[Datum]],
) -> Tuple[List[Datum], Optional[List[Datum]]]:
    num_shots = cfg.DATASET.NUM_SHOTS
    dataset_dir = dataset.dataset_dir
    train_fs = dataset.generate_fewshot_dataset(train, num_shots=num_shots)
    val_fs = None
    if val is not None:
        val_fs = dataset.generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
    obj = {
        "version": FEWSHOT_CACHE_VERSION,
        "num_shots": num_shots,
        "seed": cfg.SEED,
        "source": source,
        "train": _records(train_fs, dataset_dir),
        "val": _records(val_fs, dataset_dir),
    }
    logger.info("Saving preprocessed few-shot data to %s", path)
    _write_json(path, obj, cfg, "few-shot cache")
    return train_fs, val_fs


def _load_fewshot(
    path: str, num_shots: int, seed: int, source: str, dataset_dir: str, quiet: bool = False
) -> Optional[Tuple[List[Datum], Optional[List[Datum]]]]:
    """The cached subsets, or ``None`` (with a warning unless ``quiet``) when the cache must
    be rebuilt."""
    warn = (lambda *a: None) if quiet else logger.warning
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != FEWSHOT_CACHE_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        if data.get("num_shots") != num_shots or data.get("seed") != seed:
            raise ValueError("it was made for another number of shots or seed")
    except (OSError, ValueError) as e:
        warn("Ignoring the few-shot cache %s (%s); rebuilding it", path, e)
        return None
    if data.get("source") != source:
        warn("The split changed since the few-shot cache %s was made; rebuilding it", path)
        return None
    try:
        train = _from_records(data["train"], dataset_dir)
        val = _from_records(data.get("val"), dataset_dir)
    except (KeyError, TypeError, ValueError, OSError) as e:
        warn("Ignoring the few-shot cache %s (%s); rebuilding it", path, e)
        return None
    return train, val


# --------------------------------------------------------------------------------------
# Base class for the split-JSON datasets
# --------------------------------------------------------------------------------------


class SplitDataset(DatasetBase):
    """A dataset described by a CoOp split JSON.

    Subclasses declare ``dataset_dir`` (folder under DATASET.ROOT), ``image_dir`` (relative
    to it; the path prefix of the JSON paths, "" for the dataset folder itself) and
    ``split_file``, and implement :meth:`build_split` for when the JSON is missing. After
    ``__init__``, ``self.dataset_dir``, ``self.image_dir`` and ``self.split_path`` are
    absolute paths.
    """

    dataset_dir = ""
    image_dir = ""
    split_file = ""

    def __init__(self, cfg: Any) -> None:
        cls = type(self)
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.root = root
        self.dataset_dir = os.path.join(root, cls.dataset_dir)
        self.image_dir = os.path.normpath(os.path.join(self.dataset_dir, cls.image_dir))
        self.split_path = os.path.join(self.dataset_dir, cls.split_file)
        self.cache_root = cache_root(cfg, self.dataset_dir)
        if not os.path.isdir(self.dataset_dir):
            raise DatasetNotFoundError(
                f"{cls.__name__} not found: the folder {self.dataset_dir} does not exist. "
                f"DATASET.ROOT ({root}) must contain the folder '{cls.dataset_dir}' "
                f"(see DATASETS.md for how to download and arrange it)"
            )

        with self._generation_lock(cfg):
            # held while this run generates the split (and then the few-shot subsets drawn
            # right after it), so a concurrent run reads both instead of drawing its own
            train, val, test = self._load_split(cfg)
            train, val = load_or_create_fewshot(self, cfg, train, val)
        subsample = cfg.DATASET.get("SUBSAMPLE_CLASSES", "all")
        train, val, test = self.subsample_classes(train, val, test, subsample=subsample)
        super().__init__(train_x=train, val=val, test=test)

    def _split_target(self) -> Optional[str]:
        """Where a generated split would be written, or ``None`` when a split file exists
        (or this dataset has none)."""
        split_file = type(self).split_file
        if not split_file or os.path.isfile(self.split_path):
            return None
        cached_split = os.path.join(self.cache_root, split_file)
        if self.cache_root != self.dataset_dir:
            return None if os.path.isfile(cached_split) else cached_split
        return self.split_path

    def _generation_lock(self, cfg: Any) -> Any:
        """A lock on the split file when this run must generate it, else a no-op."""
        if type(self)._load_split is not SplitDataset._load_split:
            return contextlib.nullcontext()  # the dataset reads its own lists
        target = self._split_target()
        if target is None:
            return contextlib.nullcontext()
        _require_writable(os.path.dirname(target), cfg, "generated split file")
        return file_lock(target)

    def _load_split(self, cfg: Any) -> Split:
        cached_split = os.path.join(self.cache_root, type(self).split_file)
        if os.path.isfile(self.split_path):
            return read_split(self.split_path, self.image_dir)
        if self.cache_root != self.dataset_dir and os.path.isfile(cached_split):
            return read_split(cached_split, self.image_dir)
        target = cached_split if self.cache_root != self.dataset_dir else self.split_path
        _require_writable(os.path.dirname(target), cfg, "generated split file")
        remove_stale_temp_files(os.path.dirname(target), os.path.basename(target))
        train, val, test = self.build_split()
        try:
            save_split(train, val, test, target, self.image_dir)
        except WriteError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            raise NotWritableError(
                f"{e}. Set DATASET.CACHE_DIR to a writable folder for the generated split file"
            ) from None
        return train, val, test

    def build_split(self) -> Split:
        """Generate (train, val, test) from the raw files when the split JSON is missing."""
        raise NotImplementedError(
            f"{type(self).__name__}: the split file {self.split_path} is missing and this "
            f"dataset cannot generate one; download it (see DATASETS.md)"
        )

    # helpers for build_split: the raw annotation files a split is generated from

    def require_annotation(self, path: str) -> str:
        """``path`` if it exists, else a clear error: the split file is missing and so is
        this file, which generating a split needs."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{type(self).__name__}: the split file {self.split_path} is missing, and so "
                f"is {path}, which is needed to generate a split; download "
                f"{type(self).split_file} into {self.dataset_dir} (see DATASETS.md)"
            )
        return path

    def annotation_lines(self, path: str) -> List[str]:
        """The stripped, non-empty lines of an annotation file."""
        with open(self.require_annotation(path), encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]

    def load_mat(self, path: str) -> Dict[str, Any]:
        """``scipy.io.loadmat`` of an annotation file (scipy is needed only here)."""
        self.require_annotation(path)
        try:
            from scipy.io import loadmat
        except ImportError as e:
            raise ImportError(
                f"{type(self).__name__}: generating the split from {os.path.basename(path)} "
                f"needs scipy (pip install scipy). It is needed only to generate the split: "
                f"with {type(self).split_file} in place, no scipy is required"
            ) from e
        return loadmat(path)
