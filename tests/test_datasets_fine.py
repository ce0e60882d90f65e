"""OxfordPets, StanfordCars, OxfordFlowers, Food101, DescribableTextures and EuroSAT on
miniatures in their real on-disk layouts (coop.testing.fixtures_more)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import pytest
from helpers_train import coop_argv, read_results, zeroshot_argv

import coop.datasets.dtd  # noqa: F401
import coop.datasets.eurosat  # noqa: F401
import coop.datasets.food101  # noqa: F401
import coop.datasets.oxford_flowers  # noqa: F401
import coop.datasets.oxford_pets  # noqa: F401
import coop.datasets.stanford_cars  # noqa: F401
from coop.config import get_cfg_default
from coop.datasets.oxford_pets import breed_name
from coop.datasets.stanford_cars import year_first
from coop.registry import DATASET_REGISTRY, build_dataset
from coop.testing.fixtures_more import (
    make_dtd,
    make_eurosat,
    make_food101,
    make_oxford_flowers,
    make_oxford_pets,
    make_stanford_cars,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Item = Tuple[str, int, str]

EUROSAT_FOLDERS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


@dataclass
class Case:
    stem: str  # config yaml stem
    name: str  # DATASET.NAME
    folder: str  # folder under DATASET.ROOT
    prefix: str  # JSON path prefix, relative to the dataset folder ("" = the folder itself)
    split_file: str
    make: Callable[..., str]
    kwargs: Dict[str, int]
    classnames: List[str]  # expected, in label order
    sizes: Tuple[int, int, int]  # full train/val/test, hand-computed from the split rules
    per_class: Tuple[int, int, int]  # the same per class
    json_prefixes: Tuple[str, ...] = field(default_factory=tuple)  # of generated JSON paths


# Sizes. Pets/Cars: n_per_class // 2 images per class are test images, the other 5 trainval
# -> val round(5 * 0.2) = 1, train 4. Flowers with 7 per class: train round(3.5) = 4 (half
# to even), val round(1.4) = 1, test 2. Food101 with 5: round(2.5) = 2, round(1.0) = 1, 2.
# DTD/EuroSAT with 10: 5/2/3.
CASES = {
    "oxford_pets": Case(
        "oxford_pets",
        "OxfordPets",
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        make_oxford_pets,
        {"n_classes": 5, "n_per_class": 10},
        ["abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle"],
        (20, 5, 25),
        (4, 1, 5),
        ("Abyssinian_", "american_", "basset_hound_", "beagle_"),
    ),
    "stanford_cars": Case(
        "stanford_cars",
        "StanfordCars",
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        make_stanford_cars,
        {"n_classes": 4, "n_per_class": 10},
        [
            "2000 AM General Hummer SUV",
            "2012 Acura RL Sedan",
            "2012 Acura TL Sedan",
            "2008 Acura TL Type-S",
        ],
        (16, 4, 20),
        (4, 1, 5),
        ("cars_train/", "cars_test/"),
    ),
    "oxford_flowers": Case(
        "oxford_flowers",
        "OxfordFlowers",
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        make_oxford_flowers,
        {"n_classes": 4, "n_per_class": 7},
        ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"],
        (16, 4, 8),
        (4, 1, 2),
        ("image_",),
    ),
    "food101": Case(
        "food101",
        "Food101",
        "food-101",
        "images",
        "split_zhou_Food101.json",
        make_food101,
        {"n_classes": 3, "n_per_class": 5},
        ["apple_pie", "baby_back_ribs", "baklava"],
        (6, 3, 6),
        (2, 1, 2),
        ("apple_pie/", "baby_back_ribs/", "baklava/"),
    ),
    "dtd": Case(
        "dtd",
        "DescribableTextures",
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        make_dtd,
        {"n_classes": 5, "n_per_class": 10},
        ["banded", "blotchy", "braided", "bubbly", "bumpy"],
        (25, 10, 15),
        (5, 2, 3),
        ("banded/", "blotchy/", "braided/", "bubbly/", "bumpy/"),
    ),
    "eurosat": Case(
        "eurosat",
        "EuroSAT",
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        make_eurosat,
        {"n_classes": 10, "n_per_class": 10},
        [
            "Annual Crop Land",
            "Forest",
            "Herbaceous Vegetation Land",
            "Highway or Road",
            "Industrial Buildings",
            "Pasture Land",
            "Permanent Crop Land",
            "Residential Buildings",
            "River",
            "Sea or Lake",
        ],
        (50, 20, 30),
        (5, 2, 3),
        tuple(f"{f}/{f}_" for f in EUROSAT_FOLDERS),
    ),
}
STEMS = list(CASES)

# the EuroSAT folders, in sorted (= label) order, and their names in CoOp
EUROSAT_RENAMES = dict(zip(EUROSAT_FOLDERS, CASES["eurosat"].classnames))


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Pristine miniatures of every dataset, with and without the split JSON."""
    base = tmp_path_factory.mktemp("fine_src")
    out = {}
    for stem, case in CASES.items():
        out[stem, True] = case.make(str(base / stem / "with"), with_split=True, **case.kwargs)
        out[stem, False] = case.make(str(base / stem / "without"), with_split=False, **case.kwargs)
    return out


@pytest.fixture
def copy_root(sources, tmp_path):
    """``copy_root(stem, with_json)``: a private copy (few-shot caches are written into it)."""

    def copy(stem: str, with_json: bool) -> str:
        dst = str(tmp_path / f"{stem}-{int(with_json)}")
        shutil.copytree(sources[stem, with_json], dst)
        return dst

    return copy


def _cfg(case: Case, root: str, shots: int = -1, seed: int = 1, subsample: str = "all"):
    cfg = get_cfg_default()
    cfg.DATASET.NAME = case.name
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.SEED = seed
    return cfg


def _tuples(items) -> List[Item]:
    return [(it.impath, it.label, it.classname) for it in items]


def _dirs(case: Case, root: str) -> Tuple[str, str, str]:
    dataset_dir = os.path.join(root, case.folder)
    prefix = os.path.normpath(os.path.join(dataset_dir, case.prefix))
    return dataset_dir, prefix, os.path.join(dataset_dir, case.split_file)


def _read_json_split(case: Case, root: str) -> Tuple[List[Item], ...]:
    _dataset_dir, prefix, split_path = _dirs(case, root)
    with open(split_path, encoding="utf-8") as f:
        obj = json.load(f)
    return tuple(
        [(os.path.join(prefix, p), int(y), c) for p, y, c in obj[key]]
        for key in ("train", "val", "test")
    )


# ------------------------------------------------ independent stdlib re-derivations


def _split_trainval_ref(trainval: List[Item]) -> Tuple[List[Item], List[Item]]:
    groups: Dict[int, List[int]] = {}
    for idx, it in enumerate(trainval):
        groups.setdefault(it[1], []).append(idx)
    train, val = [], []
    for idxs in groups.values():
        n_val = round(len(idxs) * 0.2)
        random.shuffle(idxs)
        val += [trainval[i] for i in idxs[:n_val]]
        train += [trainval[i] for i in idxs[n_val:]]
    return train, val


def _three_way(paths: List[str], label: int, cname: str) -> Tuple[List[Item], ...]:
    random.shuffle(paths)
    n = len(paths)
    n_train, n_val = round(n * 0.5), round(n * 0.2)
    return (
        [(p, label, cname) for p in paths[:n_train]],
        [(p, label, cname) for p in paths[n_train : n_train + n_val]],
        [(p, label, cname) for p in paths[n_train + n_val :]],
    )


def _ref_pets(dataset_dir: str) -> Tuple[List[Item], ...]:
    def read(name):
        out = []
        with open(os.path.join(dataset_dir, "annotations", name)) as f:
            for line in f:
                imname, class_id, _species, _breed_id = line.strip().split(" ")
                cname = "_".join(imname.split("_")[:-1]).lower()
                out.append(
                    (os.path.join(dataset_dir, "images", imname + ".jpg"), int(class_id) - 1, cname)
                )
        return out

    trainval, test = read("trainval.txt"), read("test.txt")
    train, val = _split_trainval_ref(trainval)
    return train, val, test


def _ref_cars(dataset_dir: str) -> Tuple[List[Item], ...]:
    from scipy.io import loadmat

    meta = loadmat(os.path.join(dataset_dir, "devkit", "cars_meta.mat"))["class_names"][0]

    def read(folder, mat):
        out = []
        for rec in loadmat(mat)["annotations"][0]:
            label = int(rec["class"][0, 0]) - 1
            words = str(meta[label][0]).split(" ")
            cname = " ".join([words[-1]] + words[:-1])
            out.append((os.path.join(dataset_dir, folder, str(rec["fname"][0])), label, cname))
        return out

    trainval = read("cars_train", os.path.join(dataset_dir, "devkit", "cars_train_annos.mat"))
    test = read("cars_test", os.path.join(dataset_dir, "cars_test_annos_withlabels.mat"))
    train, val = _split_trainval_ref(trainval)
    return train, val, test


def _ref_flowers(dataset_dir: str) -> Tuple[List[Item], ...]:
    from scipy.io import loadmat

    values = loadmat(os.path.join(dataset_dir, "imagelabels.mat"))["labels"][0]
    with open(os.path.join(dataset_dir, "cat_to_name.json")) as f:
        names = json.load(f)
    groups: Dict[int, List[str]] = {}
    for i, v in enumerate(values):
        groups.setdefault(int(v), []).append(
            os.path.join(dataset_dir, "jpg", f"image_{i + 1:05d}.jpg")
        )
    out: Tuple[List[Item], ...] = ([], [], [])
    for v, paths in groups.items():
        for part, chunk in zip(out, _three_way(paths, v - 1, names[str(v)])):
            part.extend(chunk)
    return out


def _ref_folders(image_dir: str, renames: Dict[str, str]) -> Tuple[List[Item], ...]:
    cats = sorted(c for c in os.listdir(image_dir) if not c.startswith("."))
    out: Tuple[List[Item], ...] = ([], [], [])
    for label, cat in enumerate(cats):
        d = os.path.join(image_dir, cat)
        paths = [os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.startswith(".")]
        for part, chunk in zip(out, _three_way(paths, label, renames.get(cat, cat))):
            part.extend(chunk)
    return out


def _ref_generate(case: Case, root: str) -> Tuple[List[Item], ...]:
    """The split the loader must generate, drawing from the current global ``random``."""
    dataset_dir, prefix, _ = _dirs(case, root)
    if case.stem == "oxford_pets":
        return _ref_pets(dataset_dir)
    if case.stem == "stanford_cars":
        return _ref_cars(dataset_dir)
    if case.stem == "oxford_flowers":
        return _ref_flowers(dataset_dir)
    return _ref_folders(prefix, EUROSAT_RENAMES if case.stem == "eurosat" else {})


def _ref_fewshot(items: List[Item], k: int) -> List[Item]:
    groups: Dict[int, List[Item]] = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    out: List[Item] = []
    for g in groups.values():
        out += random.sample(g, k) if len(g) >= k else g
    return out


# -------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stem", STEMS)
def test_registered_with_config(stem):
    case = CASES[stem]
    assert case.name in DATASET_REGISTRY
    with open(os.path.join(REPO, "configs", "datasets", f"{stem}.yaml"), encoding="utf-8") as f:
        assert f'NAME: "{case.name}"' in f.read()


@pytest.mark.parametrize("stem", STEMS)
def test_with_json_reads_split_and_draws_nothing(stem, copy_root):
    case = CASES[stem]
    root = copy_root(stem, True)
    random.seed(7)
    state = random.getstate()
    ds = build_dataset(_cfg(case, root))
    assert random.getstate() == state
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == case.sizes
    assert ds.classnames == case.classnames
    assert ds.num_classes == len(case.classnames)
    assert ds.lab2cname == dict(enumerate(case.classnames))
    assert (_tuples(ds.train_x), _tuples(ds.val), _tuples(ds.test)) == _read_json_split(case, root)
    dataset_dir, prefix, _ = _dirs(case, root)
    assert ds.dataset_dir == dataset_dir and ds.image_dir == prefix
    for part, n in zip((ds.train_x, ds.val, ds.test), case.per_class):
        assert [sum(it.label == y for it in part) for y in range(ds.num_classes)] == [n] * len(
            case.classnames
        )
    assert not os.path.exists(os.path.join(dataset_dir, "split_fewshot"))


@pytest.mark.parametrize("stem", STEMS)
def test_without_json_generates_saves_and_rereads(stem, copy_root, caplog):
    caplog.set_level(logging.INFO)
    case = CASES[stem]
    root = copy_root(stem, False)
    _dataset_dir, _prefix, split_path = _dirs(case, root)
    assert not os.path.exists(split_path)

    random.seed(1)
    ds = build_dataset(_cfg(case, root))
    random.seed(1)
    expected = _ref_generate(case, root)
    assert (_tuples(ds.train_x), _tuples(ds.val), _tuples(ds.test)) == expected
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == case.sizes
    assert ds.classnames == case.classnames
    message = {
        "oxford_pets": "Splitting trainval into 80% train and 20% val",
        "stanford_cars": "Splitting trainval into 80% train and 20% val",
        "oxford_flowers": "Splitting data into 50% train, 20% val, and 30% test",
    }.get(stem, "Splitting into 50% train, 20% val, and 30% test")
    assert message in caplog.text

    # the JSON was written in CoOp's format
    with open(split_path, encoding="utf-8") as f:
        text = f.read()
    obj = json.loads(text)
    assert text == json.dumps(obj, indent=4, separators=(",", ": "))
    assert list(obj) == ["train", "val", "test"]
    entries = obj["train"] + obj["val"] + obj["test"]
    assert all(
        isinstance(p, str) and isinstance(y, int) and isinstance(c, str) for p, y, c in entries
    )
    assert all(not p.startswith("/") and p.startswith(case.json_prefixes) for p, _, _ in entries)
    assert {p.split("/")[0] for p, _, _ in entries} >= {
        pre.split("/")[0] for pre in case.json_prefixes if "/" in pre
    }
    assert _read_json_split(case, root) == expected

    # read back: no random draws, identical lists
    random.seed(99)
    state = random.getstate()
    ds2 = build_dataset(_cfg(case, root))
    assert random.getstate() == state
    assert (_tuples(ds2.train_x), _tuples(ds2.val), _tuples(ds2.test)) == expected

    # regenerated with the same seed: the same split (and file); another seed: another split
    os.remove(split_path)
    random.seed(1)
    ds3 = build_dataset(_cfg(case, root))
    assert (_tuples(ds3.train_x), _tuples(ds3.val), _tuples(ds3.test)) == expected
    with open(split_path, encoding="utf-8") as f:
        assert f.read() == text
    os.remove(split_path)
    random.seed(2)
    ds4 = build_dataset(_cfg(case, root))
    assert (_tuples(ds4.train_x), _tuples(ds4.val)) != expected[:2]
    assert len(ds4.test) == case.sizes[2]


@pytest.mark.parametrize("with_json", [True, False], ids=["json", "nojson"])
@pytest.mark.parametrize("stem", STEMS)
def test_fewshot_matches_stdlib_rederivation(stem, with_json, copy_root):
    case = CASES[stem]
    root = copy_root(stem, with_json)
    shots, seed = 2, 3
    random.seed(seed)
    if with_json:
        full = _read_json_split(case, root)
    else:
        full = _ref_generate(case, root)  # the split draws first, then the few-shot step
    exp_train = _ref_fewshot(full[0], shots)
    exp_val = _ref_fewshot(full[1], min(shots, 4))

    random.seed(seed)
    ds = build_dataset(_cfg(case, root, shots=shots, seed=seed))
    assert _tuples(ds.train_x) == exp_train and _tuples(ds.val) == exp_val
    assert _tuples(ds.test) == full[2]
    n_cls = len(case.classnames)
    assert len(ds.train_x) == shots * n_cls
    assert len(ds.val) == min(shots, case.per_class[1]) * n_cls
    assert ds.classnames == case.classnames
    cache = os.path.join(root, case.folder, "split_fewshot", f"shot_{shots}-seed_{seed}.json")
    assert os.path.isfile(cache)

    # the cache is then reused without random draws
    random.seed(1234)
    state = random.getstate()
    ds2 = build_dataset(_cfg(case, root, shots=shots, seed=seed))
    assert random.getstate() == state
    assert _tuples(ds2.train_x) == exp_train and _tuples(ds2.val) == exp_val


@pytest.mark.parametrize("stem", STEMS)
def test_subsample_base_new(stem, copy_root):
    case = CASES[stem]
    root = copy_root(stem, True)
    n = len(case.classnames)
    m = -(-n // 2)  # ceil(n / 2)
    full = build_dataset(_cfg(case, root))
    full_fs = build_dataset(_cfg(case, root, shots=2))
    for mode, selected in (("base", list(range(m))), ("new", list(range(m, n)))):
        ds = build_dataset(_cfg(case, root, subsample=mode))
        names = [case.classnames[y] for y in selected]
        assert ds.classnames == names and ds.num_classes == len(selected)
        relabel = {old: new for new, old in enumerate(selected)}
        for got, src in zip((ds.train_x, ds.val, ds.test), (full.train_x, full.val, full.test)):
            assert _tuples(got) == [(p, relabel[y], c) for p, y, c in _tuples(src) if y in relabel]
        sizes = tuple(k * len(selected) for k in case.per_class)
        assert (len(ds.train_x), len(ds.val), len(ds.test)) == sizes
        assert {it.label for it in ds.test} == set(range(len(selected)))

        # after the few-shot step (same cache file as the "all" run)
        fs = build_dataset(_cfg(case, root, shots=2, subsample=mode))
        assert _tuples(fs.train_x) == [
            (p, relabel[y], c) for p, y, c in _tuples(full_fs.train_x) if y in relabel
        ]
        assert len(fs.train_x) == 2 * len(selected)
    assert (m, n - m) == {
        "oxford_pets": (3, 2),
        "stanford_cars": (2, 2),
        "oxford_flowers": (2, 2),
        "food101": (2, 1),
        "dtd": (3, 2),
        "eurosat": (5, 5),
    }[stem]


# --------------------------------------------------------------------- loader details


def test_pets_breed_names():
    assert breed_name("Egyptian_Mau_1") == "egyptian_mau"
    assert breed_name("american_pit_bull_terrier_10") == "american_pit_bull_terrier"
    assert breed_name("Abyssinian_100") == "abyssinian"


def test_cars_year_first():
    assert year_first("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert year_first("Acura TL Type-S 2008") == "2008 Acura TL Type-S"


def test_pets_bad_annotation_line_and_missing_file(copy_root):
    case = CASES["oxford_pets"]
    root = copy_root("oxford_pets", False)
    anno = os.path.join(root, "oxford_pets", "annotations", "trainval.txt")
    with open(anno, "a", encoding="utf-8") as f:
        f.write("Abyssinian_1 one 1 1\n")
    with pytest.raises(ValueError, match=r"trainval\.txt, line \d+"):
        build_dataset(_cfg(case, root))
    os.remove(anno)
    with pytest.raises(FileNotFoundError, match=r"trainval\.txt is missing"):
        build_dataset(_cfg(case, root))


@pytest.mark.parametrize("stem", ["stanford_cars", "oxford_flowers"])
def test_scipy_needed_only_to_generate_the_split(stem, copy_root, monkeypatch):
    case = CASES[stem]
    with_json, without = copy_root(stem, True), copy_root(stem, False)
    for mod in [m for m in sys.modules if m == "scipy" or m.startswith("scipy.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "scipy", None)  # "import scipy" now fails
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    ds = build_dataset(_cfg(case, with_json))
    assert ds.classnames == case.classnames
    with pytest.raises(ImportError, match="pip install scipy"):
        build_dataset(_cfg(case, without))
    assert not os.path.exists(_dirs(case, without)[2])


def test_flowers_too_few_images(tmp_path):
    case = CASES["oxford_flowers"]
    root = make_oxford_flowers(str(tmp_path), n_classes=2, n_per_class=3, with_split=False)
    random.seed(0)
    state = random.getstate()
    with pytest.raises(ValueError, match=r"3 image\(s\), too few"):
        build_dataset(_cfg(case, root))
    assert random.getstate() == state  # checked before any draw


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_is_deterministic(stem, tmp_path):
    case = CASES[stem]
    a = case.make(str(tmp_path / "a"), seed=5, **case.kwargs)
    b = case.make(str(tmp_path / "b"), seed=5, **case.kwargs)
    c = case.make(str(tmp_path / "c"), seed=6, **case.kwargs)

    def files(root):
        out = {}
        for dirpath, _subdirs, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
        return out

    fa = files(a)
    assert fa == files(b)
    rel = os.path.join(case.folder, case.split_file)
    assert rel in fa and files(c)[rel] != fa[rel]


@pytest.mark.parametrize("stem", ["oxford_flowers", "stanford_cars"])
def test_mat_fixtures_do_not_depend_on_the_clock(stem, tmp_path, monkeypatch):
    import time

    case = CASES[stem]
    roots = []
    for i, stamp in enumerate(["Mon Jan  1 00:00:00 2001", "Tue Jan  2 00:00:01 2001"]):
        monkeypatch.setattr(time, "asctime", lambda *a, s=stamp: s)  # scipy's header time
        roots.append(case.make(str(tmp_path / str(i)), seed=5, **case.kwargs))
    mats = [
        os.path.relpath(os.path.join(d, n), roots[0])
        for d, _, names in os.walk(roots[0])
        for n in names
        if n.endswith(".mat")
    ]
    assert mats
    for rel in mats:
        with (
            open(os.path.join(roots[0], rel), "rb") as a,
            open(os.path.join(roots[1], rel), "rb") as b,
        ):
            assert a.read() == b.read(), rel


# ----------------------------------------------------------------------- end to end


def _with_dataset(argv: List[str], stem: str) -> List[str]:
    argv = list(argv)
    argv[argv.index("--dataset-config-file") + 1] = os.path.join(
        REPO, "configs", "datasets", f"{stem}.yaml"
    )
    argv[argv.index("--config-file") + 1] = os.path.join(
        REPO, "configs", "trainers", "CoOp", "rn50.yaml"
    )
    return argv


@pytest.mark.parametrize("stem, with_json", [("oxford_pets", False), ("eurosat", True)])
def test_coop_trains(stem, with_json, copy_root, tiny_vit, tmp_path):
    from coop.train import main

    case = CASES[stem]
    root = copy_root(stem, with_json)
    out = str(tmp_path / "coop")
    argv = coop_argv(root, out, tiny_vit, 1, 2, "OPTIM.MAX_EPOCH", "1")
    assert main(_with_dataset(argv, stem)) == 0
    res = read_results(out)
    assert res["trainer"] == "CoOp" and res["dataset"] == case.name
    assert res["total"] == case.sizes[2]
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-1"))
    assert os.path.isfile(_dirs(case, root)[2])
    assert os.path.isfile(os.path.join(root, case.folder, "split_fewshot", "shot_2-seed_1.json"))


@pytest.mark.parametrize(
    "stem, prompt",
    [
        ("stanford_cars", "a photo of a 2000 AM General Hummer SUV."),
        ("oxford_flowers", "a photo of a hard-leaved pocket orchid, a type of flower."),
        ("oxford_pets", "a photo of a american pit bull terrier, a type of pet."),
    ],
)
def test_zeroshot_clip_evaluates(stem, prompt, copy_root, tiny_vit, tmp_path):
    from coop.train import main

    case = CASES[stem]
    root = copy_root(stem, True)
    out = str(tmp_path / "zs")
    assert main(_with_dataset(zeroshot_argv(root, out, tiny_vit), stem)) == 0
    res = read_results(out)
    assert res["trainer"] == "ZeroshotCLIP" and res["dataset"] == case.name
    assert res["total"] == case.sizes[2]
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        assert repr(prompt) in f.read()
