"""Miniatures of FGVCAircraft, SUN397, UCF101, ImageNet and the four ImageNet variants.

Each builder writes the dataset in its real on-disk layout (folder names, list files, line
formats) with small learnable synthetic images (:func:`coop.testing.fixtures.class_image`)
and returns ``root``, the folder that contains the dataset folder(s), i.e. what
``DATASET.ROOT`` must point to. Everything is deterministic given ``seed`` and uses numpy's
own ``Generator``: the global ``random``/numpy/torch generators are never touched.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from coop.testing.fixtures import class_image

__all__ = [
    "FGVC_VARIANTS",
    "SUN397_CATEGORIES",
    "UCF101_ACTIONS",
    "IMAGENET_CLASSES",
    "imagenet_classes",
    "ucf101_rename",
    "sun397_classname",
    "make_fgvc_aircraft",
    "make_sun397",
    "make_ucf101",
    "make_imagenet",
    "make_imagenet_variants",
]

# Real FGVC-Aircraft variant names, in an order that is NOT sorted (variants.txt order is
# what defines the labels) and with the awkward ones (spaces, "/") first.
FGVC_VARIANTS: List[str] = [
    "707-320", "Falcon 2000", "F-16A/B", "BAE 146-200", "A300B4", "Cessna 172", "F/A-18",
    "Boeing 717", "DHC-8-100", "Tu-154", "Yak-42", "Model B200",
]  # fmt: skip

# Real SUN397 categories (ClassName.txt without the leading "/"), with 2- and 3-level ones.
SUN397_CATEGORIES: List[str] = [
    "a/abbey", "a/apartment_building/outdoor", "b/bakery/shop", "b/beach",
    "c/cathedral/indoor", "c/cathedral/outdoor", "d/dam", "y/youth_hostel",
]  # fmt: skip

# Real UCF101 action names (the order here only decides which ones a miniature uses;
# classInd.txt lists the chosen ones in sorted order, as the real file does).
UCF101_ACTIONS: List[str] = [
    "ApplyEyeMakeup", "Archery", "YoYo", "TaiChi", "BabyCrawling", "JumpingJack",
    "PlayingDaf", "Biking", "HandstandPushups", "WallPushups",
]  # fmt: skip

# The first ImageNet classes (sorted wnids) with CLIP's curated names.
IMAGENET_CLASSES: List[Tuple[str, str]] = [
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"),
    ("n01494475", "hammerhead shark"),
    ("n01496331", "electric ray"),
    ("n01498041", "stingray"),
    ("n01514668", "rooster"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich"),
    ("n01530575", "brambling"),
    ("n01531178", "goldfinch"),
]


def imagenet_classes(n: int) -> List[Tuple[str, str]]:
    """``n`` (wnid, name) pairs in sorted-wnid order: the real ones of
    :data:`IMAGENET_CLASSES`, then synthetic ``n15xxxxxx`` wnids named ``class <i>`` (so a
    full 1000-line classnames.txt can be written)."""
    out = list(IMAGENET_CLASSES[:n])
    for i in range(len(out), n):
        out.append((f"n{15000000 + i:08d}", f"class {i}"))
    return out


def ucf101_rename(action: str) -> str:
    """``ApplyEyeMakeup`` -> ``Apply_Eye_Makeup`` (the fixture's own copy of the rule)."""
    pieces, cur = [], ""
    for ch in action:
        if ch.isupper() and cur:
            pieces.append(cur)
            cur = ""
        cur += ch
    pieces.append(cur)
    return "_".join(p for p in pieces if p[:1].isupper())


def sun397_classname(category: str) -> str:
    """``a/apartment_building/outdoor`` -> ``outdoor apartment_building``."""
    return " ".join(reversed(category.split("/")[1:]))


def _save_jpeg(path: str, array: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def _write_lines(path: str, lines: Sequence[str], newline: str = "\n") -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + newline for line in lines))


def _split_json(
    path: str,
    prefix: str,
    parts: Sequence[Sequence[Tuple[str, int, str]]],
) -> None:
    from coop.data import Datum
    from coop.splits import save_split

    train, val, test = (
        [Datum(p, label=label, classname=c) for p, label, c in part] for part in parts
    )
    save_split(train, val, test, path, prefix)


def _trainval_split(
    items: Sequence[Tuple[str, int, str]], rng: np.random.Generator, p_val: float = 0.2
) -> Tuple[List[Tuple[str, int, str]], List[Tuple[str, int, str]]]:
    """A deterministic per-label 80/20 split (numpy, not ``random``)."""
    groups: Dict[int, List[Tuple[str, int, str]]] = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    train: List[Tuple[str, int, str]] = []
    val: List[Tuple[str, int, str]] = []
    for group in groups.values():
        order = rng.permutation(len(group))
        n_val = max(1, round(len(group) * p_val))
        val.extend(group[j] for j in order[:n_val])
        train.extend(group[j] for j in order[n_val:])
    return train, val


def _random_name(rng: np.random.Generator, n: int = 16) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[k] for k in rng.integers(0, 26, size=n))


# ------------------------------------------------------------------------- FGVCAircraft


def make_fgvc_aircraft(
    root: str,
    n_classes: int = 4,
    n_per_split: int = 4,
    image_size: int = 40,
    seed: int = 0,
) -> str:
    """Write ``<root>/fgvc_aircraft`` (the ``data/`` folder of fgvc-aircraft-2013b).

    ``variants.txt`` lists the first ``n_classes`` names of :data:`FGVC_VARIANTS` (label =
    line index); ``images/<7-digit id>.jpg``; ``images_variant_{train,val,test}.txt`` with
    ``n_per_split`` images per class each, lines ``<id> <variant name>`` sorted by id (so
    classes interleave, as in the real files), plus an unused ``images_variant_trainval.txt``
    and ``images_family_train.txt``. There is never a split JSON.
    """
    if not 1 <= n_classes <= len(FGVC_VARIANTS):
        raise ValueError(f"n_classes must be in 1..{len(FGVC_VARIANTS)}, got {n_classes}")
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "fgvc_aircraft")
    image_dir = os.path.join(dataset_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    variants = FGVC_VARIANTS[:n_classes]
    _write_lines(os.path.join(dataset_dir, "variants.txt"), variants)

    n_total = n_classes * n_per_split * 3
    ids = rng.choice(np.arange(1000000, 2300000), size=n_total, replace=False)
    lists: Dict[str, List[Tuple[int, str]]] = {"train": [], "val": [], "test": []}
    k = 0
    for label, variant in enumerate(variants):
        for split in ("train", "val", "test"):
            for i in range(n_per_split):
                image_id = int(ids[k])
                k += 1
                width = image_size + 4 * (i % 3)
                _save_jpeg(
                    os.path.join(image_dir, f"{image_id:07d}.jpg"),
                    class_image(label, n_classes, rng, image_size, width),
                )
                lists[split].append((image_id, variant))
    for split, entries in lists.items():
        entries.sort()
        _write_lines(
            os.path.join(dataset_dir, f"images_variant_{split}.txt"),
            [f"{i:07d} {v}" for i, v in entries],
        )
    trainval = sorted(lists["train"] + lists["val"])
    _write_lines(
        os.path.join(dataset_dir, "images_variant_trainval.txt"),
        [f"{i:07d} {v}" for i, v in trainval],
    )
    _write_lines(
        os.path.join(dataset_dir, "images_family_train.txt"),
        [f"{i:07d} Family{j % 2}" for j, (i, _v) in enumerate(lists["train"])],
    )
    return root


# ------------------------------------------------------------------------------ SUN397


def make_sun397(
    root: str,
    n_classes: int = 4,
    n_trainval: int = 10,
    n_test: int = 4,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """Write ``<root>/sun397``: ``SUN397/<letter>/<category>[/<sub>]/sun_<16 letters>.jpg``,
    ``ClassName.txt`` (lines ``/a/abbey``), ``Training_01.txt``/``Testing_01.txt`` (lines
    ``/a/abbey/sun_x.jpg``; ``n_trainval``/``n_test`` per class), decoy ``Training_02.txt``/
    ``Testing_02.txt``, and one unlisted extra image per class. The categories are the first
    ``n_classes`` of :data:`SUN397_CATEGORIES` (listed sorted in ClassName.txt, like the real
    file). With ``with_split`` a ``split_zhou_SUN397.json`` (80/20 of Training_01, numpy
    ``Generator``) is written.
    """
    if not 1 <= n_classes <= len(SUN397_CATEGORIES):
        raise ValueError(f"n_classes must be in 1..{len(SUN397_CATEGORIES)}, got {n_classes}")
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "sun397")
    image_dir = os.path.join(dataset_dir, "SUN397")
    os.makedirs(image_dir, exist_ok=True)
    categories = sorted(SUN397_CATEGORIES[:n_classes])
    _write_lines(os.path.join(dataset_dir, "ClassName.txt"), ["/" + c for c in categories])

    trainval_lines: List[str] = []
    test_lines: List[str] = []
    trainval: List[Tuple[str, int, str]] = []
    test: List[Tuple[str, int, str]] = []
    for label, cat in enumerate(categories):
        cname = sun397_classname(cat)
        names = set()
        while len(names) < n_trainval + n_test + 1:
            names.add(f"sun_{_random_name(rng)}.jpg")
        ordered = sorted(names)
        for i, name in enumerate(ordered):
            width = image_size + 4 * (i % 3)
            path = os.path.join(image_dir, cat, name)
            _save_jpeg(path, class_image(label, n_classes, rng, image_size, width))
        picked = [ordered[j] for j in rng.permutation(len(ordered))]
        for name in picked[:n_trainval]:
            trainval_lines.append(f"/{cat}/{name}")
            trainval.append((os.path.join(image_dir, cat, name), label, cname))
        for name in picked[n_trainval : n_trainval + n_test]:
            test_lines.append(f"/{cat}/{name}")
            test.append((os.path.join(image_dir, cat, name), label, cname))
    _write_lines(os.path.join(dataset_dir, "Training_01.txt"), trainval_lines)
    _write_lines(os.path.join(dataset_dir, "Testing_01.txt"), test_lines)
    # other partitions exist in Partitions.zip but are unused; make them different
    _write_lines(os.path.join(dataset_dir, "Training_02.txt"), test_lines)
    _write_lines(os.path.join(dataset_dir, "Testing_02.txt"), trainval_lines)

    if with_split:
        train, val = _trainval_split(trainval, rng)
        _split_json(
            os.path.join(dataset_dir, "split_zhou_SUN397.json"), image_dir, (train, val, test)
        )
    return root


# ------------------------------------------------------------------------------ UCF101


def make_ucf101(
    root: str,
    n_classes: int = 4,
    n_trainval: int = 10,
    n_test: int = 4,
    image_size: int = 40,
    with_split: bool = True,
    with_lists: bool = True,
    seed: int = 0,
) -> str:
    """Write ``<root>/ucf101``: ``UCF-101-midframes/<Renamed_Action>/v_<Action>_gXX_cYY.jpg``
    (one middle frame per video) and, with ``with_lists``, ``ucfTrainTestlist/classInd.txt``
    (``<1-based id> <Action>``), ``trainlist01.txt`` (``Action/v_..avi <id>``) and
    ``testlist01.txt`` (``Action/v_..avi``), all with CRLF line ends like the real files,
    plus decoy ``trainlist02.txt``/``testlist02.txt``. Test videos use the first groups
    (g01...), trainval videos the later ones, as in split 1. Actions: the first
    ``n_classes`` of :data:`UCF101_ACTIONS`, listed sorted in classInd.txt. With
    ``with_split`` a ``split_zhou_UCF101.json`` (80/20 of trainlist01, numpy ``Generator``)
    is written.
    """
    if not 1 <= n_classes <= len(UCF101_ACTIONS):
        raise ValueError(f"n_classes must be in 1..{len(UCF101_ACTIONS)}, got {n_classes}")
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "ucf101")
    image_dir = os.path.join(dataset_dir, "UCF-101-midframes")
    list_dir = os.path.join(dataset_dir, "ucfTrainTestlist")
    os.makedirs(image_dir, exist_ok=True)
    actions = sorted(UCF101_ACTIONS[:n_classes])

    train_lines: List[str] = []
    test_lines: List[str] = []
    trainval: List[Tuple[str, int, str]] = []
    test: List[Tuple[str, int, str]] = []
    for label, action in enumerate(actions):
        renamed = ucf101_rename(action)
        videos = []
        for i in range(n_trainval + n_test):
            group, clip = 1 + i // 2, 1 + i % 2
            videos.append(f"v_{action}_g{group:02d}_c{clip:02d}")
        for i, stem in enumerate(videos):
            width = image_size + 4 * (i % 3)
            path = os.path.join(image_dir, renamed, stem + ".jpg")
            _save_jpeg(path, class_image(label, n_classes, rng, image_size, width))
        for stem in videos[:n_test]:
            test_lines.append(f"{action}/{stem}.avi")
            test.append((os.path.join(image_dir, renamed, stem + ".jpg"), label, renamed))
        for stem in videos[n_test:]:
            train_lines.append(f"{action}/{stem}.avi {label + 1}")
            trainval.append((os.path.join(image_dir, renamed, stem + ".jpg"), label, renamed))

    if with_lists:
        os.makedirs(list_dir, exist_ok=True)
        crlf = "\r\n"
        _write_lines(
            os.path.join(list_dir, "classInd.txt"),
            [f"{i + 1} {a}" for i, a in enumerate(actions)],
            crlf,
        )
        _write_lines(os.path.join(list_dir, "trainlist01.txt"), train_lines, crlf)
        _write_lines(os.path.join(list_dir, "testlist01.txt"), test_lines, crlf)
        _write_lines(os.path.join(list_dir, "trainlist02.txt"), test_lines, crlf)
        _write_lines(os.path.join(list_dir, "testlist02.txt"), train_lines[:3], crlf)

    if with_split:
        train, val = _trainval_split(trainval, rng)
        _split_json(
            os.path.join(dataset_dir, "split_zhou_UCF101.json"), image_dir, (train, val, test)
        )
    return root


# ---------------------------------------------------------------------------- ImageNet


def _write_classnames(path: str, classes: Sequence[Tuple[str, str]]) -> None:
    _write_lines(path, [f"{wnid} {name}" for wnid, name in classes])


def make_imagenet(
    root: str,
    n_classes: int = 5,
    n_train: int = 8,
    n_val: int = 4,
    image_size: int = 40,
    seed: int = 0,
) -> str:
    """Write ``<root>/imagenet``: ``images/train/<wnid>/<wnid>_<n>.JPEG``,
    ``images/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG`` (val arranged in wnid folders),
    ``classnames.txt`` (lines ``<wnid> <name words>``, sorted-wnid order) and a hidden file
    in one class folder. Classes: :func:`imagenet_classes` (``n01440764 tench``, ...)."""
    rng = np.random.default_rng(seed)
    classes = imagenet_classes(n_classes)
    dataset_dir = os.path.join(root, "imagenet")
    os.makedirs(os.path.join(dataset_dir, "images"), exist_ok=True)
    _write_classnames(os.path.join(dataset_dir, "classnames.txt"), classes)
    val_ids = rng.choice(np.arange(1, 50001), size=n_classes * n_val, replace=False)
    k = 0
    # create the folders in reverse order so that creation order != sorted order
    for label in reversed(range(n_classes)):
        wnid = classes[label][0]
        train_ids = rng.choice(np.arange(1, 13000), size=n_train, replace=False)
        for i, tid in enumerate(train_ids):
            width = image_size + 4 * (i % 3)
            _save_jpeg(
                os.path.join(dataset_dir, "images", "train", wnid, f"{wnid}_{tid}.JPEG"),
                class_image(label, n_classes, rng, image_size, width),
            )
        for i in range(n_val):
            vid = int(val_ids[k])
            k += 1
            _save_jpeg(
                os.path.join(dataset_dir, "images", "val", wnid, f"ILSVRC2012_val_{vid:08d}.JPEG"),
                class_image(label, n_classes, rng, image_size, image_size + 4 * (i % 3)),
            )
    with open(os.path.join(dataset_dir, "images", "train", classes[0][0], ".DS_Store"), "wb") as f:
        f.write(b"\0")
    return root


def make_imagenet_variants(
    root: str,
    n_classes: int = 5,
    n_per_class: int = 3,
    a_classes: Optional[Sequence[int]] = (1, 2, 4),
    r_classes: Optional[Sequence[int]] = (0, 2, 3, 4),
    variants: Sequence[str] = ("v2", "sketch", "a", "r"),
    image_size: int = 40,
    seed: int = 0,
) -> str:
    """Write the test-only ImageNet variants under ``root``, each with its own copy of the
    ``n_classes``-line ``classnames.txt``:

    - ``"v2"``: ``imagenetv2/imagenetv2-matched-frequency-format-val/<0..n-1>/<40 hex>.jpeg``
    - ``"sketch"``: ``imagenet-sketch/images/<wnid>/sketch_<i>.JPEG`` (all classes)
    - ``"a"``: ``imagenet-adversarial/imagenet-a/<wnid>/<i>.jpg`` for the ImageNet labels in
      ``a_classes`` (a subset, like the real 200), plus ``README.txt``
    - ``"r"``: ``imagenet-rendition/imagenet-r/<wnid>/art_<i>.jpg`` for ``r_classes``, plus
      ``README.txt``

    Images are drawn with the ImageNet label's colour/pattern, so a model adapted on
    :func:`make_imagenet` transfers. ``n_classes`` may be 1000 (synthetic wnids after the
    first real ones) with a tiny ``image_size`` for full-size label tests.
    """
    rng = np.random.default_rng(seed)
    classes = imagenet_classes(n_classes)
    unknown = set(variants) - {"v2", "sketch", "a", "r"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}")

    def image(label: int, i: int) -> np.ndarray:
        return class_image(label, n_classes, rng, image_size, image_size + 4 * (i % 3))

    if "v2" in variants:
        ddir = os.path.join(root, "imagenetv2")
        idir = os.path.join(ddir, "imagenetv2-matched-frequency-format-val")
        os.makedirs(idir, exist_ok=True)
        _write_classnames(os.path.join(ddir, "classnames.txt"), classes)
        for label in range(n_classes):
            for i in range(n_per_class):
                name = "".join(f"{b:02x}" for b in rng.integers(0, 256, size=20)) + ".jpeg"
                _save_jpeg(os.path.join(idir, str(label), name), image(label, i))
    if "sketch" in variants:
        ddir = os.path.join(root, "imagenet-sketch")
        idir = os.path.join(ddir, "images")
        os.makedirs(idir, exist_ok=True)
        _write_classnames(os.path.join(ddir, "classnames.txt"), classes)
        for label, (wnid, _name) in enumerate(classes):
            for i in range(n_per_class):
                _save_jpeg(os.path.join(idir, wnid, f"sketch_{i}.JPEG"), image(label, i))
    for key, folder, sub, subset, prefix in (
        ("a", "imagenet-adversarial", "imagenet-a", a_classes, ""),
        ("r", "imagenet-rendition", "imagenet-r", r_classes, "art_"),
    ):
        if key not in variants:
            continue
        ddir = os.path.join(root, folder)
        idir = os.path.join(ddir, sub)
        os.makedirs(idir, exist_ok=True)
        _write_classnames(os.path.join(ddir, "classnames.txt"), classes)
        with open(os.path.join(idir, "README.txt"), "w", encoding="utf-8") as f:
            f.write(f"{sub}: a miniature for tests.\n")
        for label in sorted(subset if subset is not None else range(n_classes)):
            wnid = classes[label][0]
            for i in range(n_per_class):
                _save_jpeg(os.path.join(idir, wnid, f"{prefix}{i}.jpg"), image(label, i))
    return root
