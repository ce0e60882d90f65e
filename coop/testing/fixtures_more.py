"""Miniatures of OxfordPets, StanfordCars, Flowers102, Food101, DTD and EuroSAT.

Each builder writes the real on-disk layout (annotation text files, ``.mat`` files, JSON
files and image names in the original formats) under ``<root>/<dataset folder>`` and returns
``root``. Images are the learnable synthetic images of :func:`coop.testing.fixtures.class_image`
(one colour/stripe pattern per class). Everything is deterministic given ``seed`` and uses
numpy's own ``Generator``; the global ``random``/numpy/torch generators are never touched.

With ``with_split=True`` the CoOp split JSON is written too (its own deterministic split, in
the original format); without it the loaders must generate the split from the raw files.
Building the StanfordCars and Flowers102 miniatures needs scipy (``.mat`` files).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from coop.testing.fixtures import class_image

__all__ = [
    "PETS_BREEDS",
    "CARS_CLASS_NAMES",
    "FLOWERS_NAMES",
    "FOOD101_FOLDERS",
    "DTD_FOLDERS",
    "EUROSAT_FOLDERS",
    "EUROSAT_CLASSNAMES",
    "make_oxford_pets",
    "make_stanford_cars",
    "make_oxford_flowers",
    "make_food101",
    "make_dtd",
    "make_eurosat",
]

# (breed as in the image names, SPECIES: 1 = cat, 2 = dog), in CLASS-ID order (1..37)
PETS_BREEDS: List[Tuple[str, int]] = [
    ("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2),
    ("basset_hound", 2), ("beagle", 2), ("Bengal", 1), ("Birman", 1), ("Bombay", 1),
    ("boxer", 2), ("British_Shorthair", 1), ("chihuahua", 2), ("Egyptian_Mau", 1),
    ("english_cocker_spaniel", 2), ("english_setter", 2), ("german_shorthaired", 2),
    ("great_pyrenees", 2), ("havanese", 2), ("japanese_chin", 2), ("keeshond", 2),
    ("leonberger", 2), ("Maine_Coon", 1), ("miniature_pinscher", 2), ("newfoundland", 2),
    ("Persian", 1), ("pomeranian", 2), ("pug", 2), ("Ragdoll", 1), ("Russian_Blue", 1),
    ("saint_bernard", 2), ("samoyed", 2), ("scottish_terrier", 2), ("shiba_inu", 2),
    ("Siamese", 1), ("Sphynx", 1), ("staffordshire_bull_terrier", 2), ("wheaten_terrier", 2),
    ("yorkshire_terrier", 2),
]  # fmt: skip

# the first entries of devkit/cars_meta.mat "class_names" (class id = index + 1)
CARS_CLASS_NAMES: List[str] = [
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
    "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001",
    "Acura ZDX Hatchback 2012", "Aston Martin V8 Vantage Convertible 2012",
    "Aston Martin V8 Vantage Coupe 2012", "Aston Martin Virage Convertible 2012",
    "Aston Martin Virage Coupe 2012", "Audi RS 4 Convertible 2008",
]  # fmt: skip

# the first entries of cat_to_name.json (key = str(index + 1))
FLOWERS_NAMES: List[str] = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot",
]  # fmt: skip

FOOD101_FOLDERS: List[str] = [
    "apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare",
    "beet_salad", "beignets", "bibimbap", "bread_pudding", "breakfast_burrito",
    "bruschetta", "caesar_salad",
]  # fmt: skip

DTD_FOLDERS: List[str] = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed",
    "cracked", "crosshatched", "crystalline", "dotted", "fibrous",
]  # fmt: skip

# all ten EuroSAT class folders (sorted = label order)
EUROSAT_FOLDERS: List[str] = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
]  # fmt: skip


# the readable names CoOp gives the EuroSAT folders
EUROSAT_CLASSNAMES: Dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _check_n(name: str, n_classes: int, available: Sequence) -> None:
    if not 1 <= n_classes <= len(available):
        raise ValueError(f"{name}: n_classes must be in 1..{len(available)}, got {n_classes}")


def _write_image(
    path: str, label: int, n_classes: int, rng: np.random.Generator, size: int, i: int
) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    width = size + 4 * (i % 3)  # a little variation so shorter-edge resizing is exercised
    Image.fromarray(class_image(label, n_classes, rng, size, width)).save(
        path, format="JPEG", quality=90
    )


def _write_text(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _save_split_json(
    dataset_dir: str,
    split_file: str,
    prefix: str,
    parts: Tuple[List[Tuple[str, int, str]], ...],
) -> None:
    """Write the CoOp split JSON through the package's own writer (same format)."""
    from coop.data import Datum
    from coop.splits import save_split

    train, val, test = (
        [Datum(impath=p, label=y, classname=c) for p, y, c in part] for part in parts
    )
    save_split(train, val, test, os.path.join(dataset_dir, split_file), prefix)


def _split_three_way(
    groups: Dict[int, Tuple[str, List[str]]], rng: np.random.Generator
) -> Tuple[List[Tuple[str, int, str]], ...]:
    """50/20/30 per label (labels ascending): ``groups`` = {label: (classname, paths)}."""
    train: List[Tuple[str, int, str]] = []
    val: List[Tuple[str, int, str]] = []
    test: List[Tuple[str, int, str]] = []
    for label in sorted(groups):
        cname, paths = groups[label]
        shuffled = [paths[j] for j in rng.permutation(len(paths))]
        n = len(shuffled)
        n_train, n_val = round(n * 0.5), round(n * 0.2)
        train += [(p, label, cname) for p in shuffled[:n_train]]
        val += [(p, label, cname) for p in shuffled[n_train : n_train + n_val]]
        test += [(p, label, cname) for p in shuffled[n_train + n_val :]]
    return train, val, test


def _split_trainval(
    trainval: List[Tuple[str, int, str]], rng: np.random.Generator
) -> Tuple[List[Tuple[str, int, str]], List[Tuple[str, int, str]]]:
    """80/20 train/val per label (labels ascending)."""
    train: List[Tuple[str, int, str]] = []
    val: List[Tuple[str, int, str]] = []
    for label in sorted({y for _p, y, _c in trainval}):
        items = [it for it in trainval if it[1] == label]
        shuffled = [items[j] for j in rng.permutation(len(items))]
        n_val = round(len(items) * 0.2)
        val += shuffled[:n_val]
        train += shuffled[n_val:]
    return train, val


def _folder_dataset(
    root: str,
    folder: str,
    image_dir_name: str,
    class_folders: List[str],
    file_name,
    cname_of,
    split_file: str,
    n_per_class: int,
    image_size: int,
    with_split: bool,
    rng: np.random.Generator,
) -> Tuple[str, str, Dict[str, List[str]]]:
    """A ``<image dir>/<class folder>/<file>`` dataset (the ``read_and_split_data`` layout)."""
    dataset_dir = os.path.join(root, folder)
    image_dir = os.path.join(dataset_dir, image_dir_name)
    os.makedirs(image_dir, exist_ok=True)
    n_classes = len(class_folders)
    sorted_folders = sorted(class_folders)  # label order = case-sensitive sorted folders
    files: Dict[str, List[str]] = {}
    for class_folder in class_folders:
        label = sorted_folders.index(class_folder)
        paths = []
        for i in range(n_per_class):
            path = os.path.join(image_dir, class_folder, file_name(class_folder, i))
            _write_image(path, label, n_classes, rng, image_size, i)
            paths.append(path)
        files[class_folder] = paths
    # hidden files are ignored by the loaders
    with open(os.path.join(image_dir, ".DS_Store"), "wb") as f:
        f.write(b"\0")
    with open(os.path.join(image_dir, class_folders[0], ".hidden"), "wb") as f:
        f.write(b"not an image")
    if with_split:
        groups = {label: (cname_of(f), files[f]) for label, f in enumerate(sorted_folders)}
        _save_split_json(dataset_dir, split_file, image_dir, _split_three_way(groups, rng))
    return dataset_dir, image_dir, files


# --------------------------------------------------------------------------------------
# OxfordPets
# --------------------------------------------------------------------------------------


def make_oxford_pets(
    root: str,
    n_classes: int = 4,
    n_per_class: int = 10,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """``<root>/oxford_pets``: ``images/<Breed>_<n>.jpg`` (n = 1..n_per_class) for the first
    ``n_classes`` breeds in CLASS-ID order, and ``annotations/{list,trainval,test}.txt``
    (lines ``<name> <CLASS-ID> <SPECIES> <BREED-ID>``; list.txt with its ``#`` header). Per
    breed ``n_per_class // 2`` images (drawn with ``seed``) are in test.txt, the rest in
    trainval.txt; lines are sorted by name, case-insensitively, like the real files."""
    _check_n("make_oxford_pets", n_classes, PETS_BREEDS)
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "oxford_pets")
    image_dir = os.path.join(dataset_dir, "images")
    os.makedirs(image_dir, exist_ok=True)

    breed_ids: Dict[str, int] = {}
    per_species = {1: 0, 2: 0}
    for breed, species in PETS_BREEDS:
        per_species[species] += 1
        breed_ids[breed] = per_species[species]

    trainval_lines, test_lines = [], []
    trainval, test = [], []
    for label, (breed, species) in enumerate(PETS_BREEDS[:n_classes]):
        test_idx = set(rng.choice(n_per_class, size=n_per_class // 2, replace=False).tolist())
        for i in range(n_per_class):
            name = f"{breed}_{i + 1}"
            path = os.path.join(image_dir, name + ".jpg")
            _write_image(path, label, n_classes, rng, image_size, i)
            line = f"{name} {label + 1} {species} {breed_ids[breed]}"
            item = (path, label, breed.lower())
            if i in test_idx:
                test_lines.append(line)
                test.append(item)
            else:
                trainval_lines.append(line)
                trainval.append(item)

    def by_name(line: str) -> str:
        return line.split(" ")[0].lower()

    anno_dir = os.path.join(dataset_dir, "annotations")
    header = [
        "#Image CLASS-ID SPECIES BREED ID",
        "#ID: 1:37 Class ids",
        "#SPECIES: 1:Cat 2:Dog",
        "#BREED ID: 1-25:Cat 1:12:Dog",
        "#All images with 1st letter as captial are cat images",
        "#images with small first letter are dog images",
    ]
    _write_text(
        os.path.join(anno_dir, "list.txt"),
        header + sorted(trainval_lines + test_lines, key=by_name),
    )
    _write_text(os.path.join(anno_dir, "trainval.txt"), sorted(trainval_lines, key=by_name))
    _write_text(os.path.join(anno_dir, "test.txt"), sorted(test_lines, key=by_name))

    if with_split:
        train, val = _split_trainval(trainval, rng)
        _save_split_json(dataset_dir, "split_zhou_OxfordPets.json", image_dir, (train, val, test))
    return root


# --------------------------------------------------------------------------------------
# StanfordCars
# --------------------------------------------------------------------------------------


def _cars_annos(records: List[Tuple[str, int]], rng: np.random.Generator) -> np.ndarray:
    """A (1, N) MATLAB struct array like ``cars_train_annos.mat``'s ``annotations``."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annos = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for j, (fname, class_id) in enumerate(records):
        x1, y1 = (int(v) for v in rng.integers(1, 20, size=2))
        annos[0, j]["bbox_x1"] = np.array([[x1]], dtype=np.uint16)
        annos[0, j]["bbox_y1"] = np.array([[y1]], dtype=np.uint16)
        annos[0, j]["bbox_x2"] = np.array([[x1 + 100]], dtype=np.uint16)
        annos[0, j]["bbox_y2"] = np.array([[y1 + 60]], dtype=np.uint16)
        annos[0, j]["class"] = np.array([[class_id]], dtype=np.uint8)
        annos[0, j]["fname"] = np.array([fname])
    return annos


_MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, written by coop.testing"


def _require_scipy() -> None:
    """Fail before anything is written when scipy (for the .mat files) is missing."""
    import scipy.io  # noqa: F401


def _savemat(path: str, mdict: Dict[str, Any]) -> None:
    """``scipy.io.savemat`` with a fixed 116-byte text header: scipy writes the current time
    there, which would make two fixtures built in different seconds differ."""
    from scipy.io import savemat

    savemat(path, mdict)
    with open(path, "r+b") as f:
        f.write(_MAT_DESCRIPTION.ljust(116, b" "))


def make_stanford_cars(
    root: str,
    n_classes: int = 4,
    n_per_class: int = 10,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """``<root>/stanford_cars``: ``cars_train/`` and ``cars_test/`` (``00001.jpg`` ...),
    ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat`` (struct arrays with
    bbox_*, class (1-based), fname) and ``devkit/cars_meta.mat`` (``class_names``). Per class
    ``n_per_class // 2`` images are test images; the file numbers are assigned in a random
    order, so classes are interleaved in the annotations as in the real files. Needs scipy."""
    _require_scipy()
    _check_n("make_stanford_cars", n_classes, CARS_CLASS_NAMES)
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "stanford_cars")
    devkit = os.path.join(dataset_dir, "devkit")
    os.makedirs(devkit, exist_ok=True)

    n_test = n_per_class // 2
    n_trainval = n_per_class - n_test
    split_items: Dict[str, List[Tuple[str, int, str]]] = {}
    for folder, anno_path, per_class in (
        ("cars_train", os.path.join(devkit, "cars_train_annos.mat"), n_trainval),
        ("cars_test", os.path.join(dataset_dir, "cars_test_annos_withlabels.mat"), n_test),
    ):
        labels = np.repeat(np.arange(n_classes), per_class)[rng.permutation(n_classes * per_class)]
        records, items = [], []
        for j, label in enumerate(labels.tolist()):
            fname = f"{j + 1:05d}.jpg"
            path = os.path.join(dataset_dir, folder, fname)
            _write_image(path, label, n_classes, rng, image_size, j)
            records.append((fname, label + 1))
            words = CARS_CLASS_NAMES[label].split(" ")
            items.append((path, label, " ".join([words[-1], *words[:-1]])))
        _savemat(anno_path, {"annotations": _cars_annos(records, rng)})
        split_items[folder] = items

    class_names = np.empty((1, n_classes), dtype=object)
    for k in range(n_classes):
        class_names[0, k] = np.array([CARS_CLASS_NAMES[k]])
    _savemat(os.path.join(devkit, "cars_meta.mat"), {"class_names": class_names})

    if with_split:
        train, val = _split_trainval(split_items["cars_train"], rng)
        _save_split_json(
            dataset_dir,
            "split_zhou_StanfordCars.json",
            dataset_dir,
            (train, val, split_items["cars_test"]),
        )
    return root


# --------------------------------------------------------------------------------------
# Flowers102
# --------------------------------------------------------------------------------------


def make_oxford_flowers(
    root: str,
    n_classes: int = 4,
    n_per_class: int = 10,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """``<root>/oxford_flowers``: ``jpg/image_00001.jpg`` ..., ``imagelabels.mat`` (key
    ``labels``, shape (1, N), values 1..n_classes in a random order, so classes are
    interleaved as in the real file) and ``cat_to_name.json`` (string keys, in a shuffled
    order, one line like the real file). Needs scipy."""
    _require_scipy()
    _check_n("make_oxford_flowers", n_classes, FLOWERS_NAMES)
    rng = np.random.default_rng(seed)
    dataset_dir = os.path.join(root, "oxford_flowers")
    image_dir = os.path.join(dataset_dir, "jpg")
    os.makedirs(image_dir, exist_ok=True)

    n_total = n_classes * n_per_class
    values = (np.repeat(np.arange(n_classes), n_per_class) + 1)[rng.permutation(n_total)]
    groups: Dict[int, Tuple[str, List[str]]] = {k: (FLOWERS_NAMES[k], []) for k in range(n_classes)}
    for i, value in enumerate(values.tolist()):
        path = os.path.join(image_dir, f"image_{i + 1:05d}.jpg")
        _write_image(path, value - 1, n_classes, rng, image_size, i)
        groups[value - 1][1].append(path)
    _savemat(
        os.path.join(dataset_dir, "imagelabels.mat"),
        {"labels": values.astype(np.uint8).reshape(1, n_total)},
    )
    keys = [str(k + 1) for k in rng.permutation(n_classes).tolist()]
    with open(os.path.join(dataset_dir, "cat_to_name.json"), "w", encoding="utf-8") as f:
        json.dump({k: FLOWERS_NAMES[int(k) - 1] for k in keys}, f)

    if with_split:
        _save_split_json(
            dataset_dir,
            "split_zhou_OxfordFlowers.json",
            image_dir,
            _split_three_way(groups, rng),
        )
    return root


# --------------------------------------------------------------------------------------
# Food101, DTD, EuroSAT (class folders)
# --------------------------------------------------------------------------------------


def make_food101(
    root: str,
    n_classes: int = 4,
    n_per_class: int = 10,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """``<root>/food-101``: ``images/<class>/<numeric id>.jpg`` for the first ``n_classes``
    Food101 classes, plus the (unused) ``meta/{classes,train,test}.txt``, ``README.txt``
    and ``license_agreement.txt``."""
    _check_n("make_food101", n_classes, FOOD101_FOLDERS)
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(100000, 4000000), size=n_classes * n_per_class, replace=False)
    folders = FOOD101_FOLDERS[:n_classes]
    id_of = {
        (f, i): int(ids[c * n_per_class + i])
        for c, f in enumerate(folders)
        for i in range(n_per_class)
    }
    dataset_dir, _image_dir, files = _folder_dataset(
        root,
        "food-101",
        "images",
        folders,
        lambda f, i: f"{id_of[(f, i)]}.jpg",
        lambda f: f,
        "split_zhou_Food101.json",
        n_per_class,
        image_size,
        with_split,
        rng,
    )
    meta = os.path.join(dataset_dir, "meta")
    _write_text(os.path.join(meta, "classes.txt"), folders)
    _write_text(
        os.path.join(meta, "labels.txt"), [f.replace("_", " ").capitalize() for f in folders]
    )
    stems = [f"{f}/{os.path.splitext(os.path.basename(p))[0]}" for f in folders for p in files[f]]
    n_train = (3 * n_per_class) // 4
    _write_text(
        os.path.join(meta, "train.txt"),
        [s for k, s in enumerate(stems) if k % n_per_class < n_train],
    )
    _write_text(
        os.path.join(meta, "test.txt"),
        [s for k, s in enumerate(stems) if k % n_per_class >= n_train],
    )
    _write_text(os.path.join(dataset_dir, "README.txt"), ["Food-101 miniature (synthetic)"])
    _write_text(os.path.join(dataset_dir, "license_agreement.txt"), ["synthetic images"])
    return root


def make_dtd(
    root: str,
    n_classes: int = 4,
    n_per_class: int = 10,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """``<root>/dtd``: ``images/<texture>/<texture>_<4 digits>.jpg`` for the first
    ``n_classes`` DTD textures, plus the (unused) ``labels/{train1,val1,test1}.txt`` and an
    empty ``imdb/`` folder."""
    _check_n("make_dtd", n_classes, DTD_FOLDERS)
    rng = np.random.default_rng(seed)
    folders = DTD_FOLDERS[:n_classes]
    dataset_dir, _image_dir, files = _folder_dataset(
        root,
        "dtd",
        "images",
        folders,
        lambda f, i: f"{f}_{2 * i + 2:04d}.jpg",
        lambda f: f,
        "split_zhou_DescribableTextures.json",
        n_per_class,
        image_size,
        with_split,
        rng,
    )
    rel = [[f"{f}/{os.path.basename(p)}" for p in files[f]] for f in folders]
    for k, name in enumerate(("train1.txt", "val1.txt", "test1.txt")):
        lines = [r for per_class in rel for j, r in enumerate(per_class) if j % 3 == k]
        _write_text(os.path.join(dataset_dir, "labels", name), lines)
    os.makedirs(os.path.join(dataset_dir, "imdb"), exist_ok=True)
    return root


def make_eurosat(
    root: str,
    n_classes: int = 10,
    n_per_class: int = 10,
    image_size: int = 40,
    with_split: bool = True,
    seed: int = 0,
) -> str:
    """``<root>/eurosat``: ``2750/<Class>/<Class>_<n>.jpg`` (n = 1..n_per_class) for the
    first ``n_classes`` (at most 10) of the real class folders ``AnnualCrop`` ...
    ``SeaLake``; the split JSON holds the renamed class names (``Annual Crop Land`` ...)."""
    _check_n("make_eurosat", n_classes, EUROSAT_FOLDERS)
    rng = np.random.default_rng(seed)
    _folder_dataset(
        root,
        "eurosat",
        "2750",
        EUROSAT_FOLDERS[:n_classes],
        lambda f, i: f"{f}_{i + 1}.jpg",
        lambda f: EUROSAT_CLASSNAMES[f],
        "split_zhou_EuroSAT.json",
        n_per_class,
        image_size,
        with_split,
        rng,
    )
    return root
