"""FGVCAircraft, SUN397, UCF101, ImageNet and the ImageNet variants on real-layout miniatures."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
from helpers_train import read_results

import coop.datasets.fgvc_aircraft  # noqa: F401
import coop.datasets.imagenet  # noqa: F401
import coop.datasets.imagenet_variants  # noqa: F401
import coop.datasets.sun397  # noqa: F401
import coop.datasets.ucf101  # noqa: F401
from coop.config import get_cfg_default
from coop.registry import DATASET_REGISTRY, build_dataset
from coop.splits import DatasetNotFoundError, read_split
from coop.testing.fixtures_imagenet import (
    FGVC_VARIANTS,
    IMAGENET_CLASSES,
    imagenet_classes,
    make_fgvc_aircraft,
    make_imagenet,
    make_imagenet_variants,
    make_sun397,
    make_ucf101,
)
from coop.train import main

REPO = Path(__file__).resolve().parents[1]

SUN_NAMES = ["abbey", "outdoor apartment_building", "shop bakery", "beach"]
UCF_NAMES = ["Apply_Eye_Makeup", "Archery", "Tai_Chi", "Yo_Yo"]
UCF_ACTIONS = ["ApplyEyeMakeup", "Archery", "TaiChi", "YoYo"]
IN_WNIDS = [w for w, _ in IMAGENET_CLASSES[:5]]
IN_NAMES = [n for _, n in IMAGENET_CLASSES[:5]]


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Pristine miniatures, built once; tests copy the ones they use."""
    base = tmp_path_factory.mktemp("more_src")
    roots = {
        "fgvc": make_fgvc_aircraft(str(base / "fgvc")),
        "sun": make_sun397(str(base / "sun"), with_split=True),
        "sun_nojson": make_sun397(str(base / "sun_nojson"), with_split=False),
        "ucf": make_ucf101(str(base / "ucf"), with_split=True),
        "ucf_nojson": make_ucf101(str(base / "ucf_nojson"), with_split=False),
        "imagenet": make_imagenet(str(base / "imagenet")),
        "variants": make_imagenet_variants(str(base / "variants")),
    }
    return roots


@pytest.fixture
def copy(src, tmp_path):
    def _copy(key, name="data"):
        dst = str(tmp_path / name)
        shutil.copytree(src[key], dst)
        return dst

    return _copy


def _cfg(name, root, shots=-1, seed=1, subsample="all", cache_dir=""):
    cfg = get_cfg_default()
    cfg.DATASET.NAME = name
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.DATASET.CACHE_DIR = cache_dir
    cfg.SEED = seed
    return cfg


def _tuples(items):
    return [(it.impath, it.label, it.classname) for it in items]


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _ref_fewshot(items, k):
    """Dassl's draw: groups by label in order of first appearance, random.sample per group."""
    groups = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    out = []
    for g in groups.values():
        out.extend(random.sample(g, k) if len(g) >= k else g)
    return out


def _ref_split_trainval(trainval, p_val=0.2):
    groups = {}
    for idx, it in enumerate(trainval):
        groups.setdefault(it[1], []).append(idx)
    train, val = [], []
    for idxs in groups.values():
        n_val = round(len(idxs) * p_val)
        random.shuffle(idxs)
        for n, idx in enumerate(idxs):
            (val if n < n_val else train).append(trainval[idx])
    return train, val


def _ref_subsample(lists, which):
    labels = sorted({it[1] for it in lists[0]})
    m = -(-len(labels) // 2)
    keep = labels[:m] if which == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(keep)}
    return [[(p, relabel[y], c) for p, y, c in lst if y in relabel] for lst in lists]


def test_all_registered():
    for name in (
        "FGVCAircraft",
        "SUN397",
        "UCF101",
        "ImageNet",
        "ImageNetV2",
        "ImageNetSketch",
        "ImageNetA",
        "ImageNetR",
    ):
        assert name in DATASET_REGISTRY
        yaml_name = {
            "FGVCAircraft": "fgvc_aircraft",
            "SUN397": "sun397",
            "UCF101": "ucf101",
            "ImageNet": "imagenet",
            "ImageNetV2": "imagenetv2",
            "ImageNetSketch": "imagenet_sketch",
            "ImageNetA": "imagenet_a",
            "ImageNetR": "imagenet_r",
        }[name]
        text = (REPO / "configs" / "datasets" / f"{yaml_name}.yaml").read_text()
        assert f'NAME: "{name}"' in text


# ------------------------------------------------------------------------- FGVCAircraft


def _fgvc_ref(root):
    ddir = os.path.join(root, "fgvc_aircraft")
    variants = _read_lines(os.path.join(ddir, "variants.txt"))
    out = []
    for split in ("train", "val", "test"):
        items = []
        for line in _read_lines(os.path.join(ddir, f"images_variant_{split}.txt")):
            image_id, name = line.split(" ", 1)
            items.append(
                (os.path.join(ddir, "images", image_id + ".jpg"), variants.index(name), name)
            )
        out.append(items)
    return out


def test_fgvc_lists_labels_and_no_randomness(copy):
    root = copy("fgvc")
    random.seed(7)
    state = random.getstate()
    ds = build_dataset(_cfg("FGVCAircraft", root))
    assert random.getstate() == state
    # label = line index of variants.txt (not sorted order); names with spaces and "/"
    assert (
        ds.classnames == FGVC_VARIANTS[:4] == ["707-320", "Falcon 2000", "F-16A/B", "BAE 146-200"]
    )
    assert ds.classnames != sorted(ds.classnames)
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (16, 16, 16)
    assert (_tuples(ds.train_x), _tuples(ds.val), _tuples(ds.test)) == tuple(_fgvc_ref(root))
    # the split files interleave classes; items keep the file order
    assert [it.label for it in ds.train_x] != sorted(it.label for it in ds.train_x)
    ddir = os.path.join(root, "fgvc_aircraft")
    assert not any(f.startswith("split_zhou") for f in os.listdir(ddir))
    assert not os.path.exists(os.path.join(ddir, "split_fewshot"))


def test_fgvc_fewshot_and_subsample(copy, caplog):
    caplog.set_level(logging.INFO)
    root = copy("fgvc")
    train, val, test = _fgvc_ref(root)
    random.seed(1)
    exp_train, exp_val = _ref_fewshot(train, 2), _ref_fewshot(val, 2)
    random.seed(1)
    ds = build_dataset(_cfg("FGVCAircraft", root, shots=2))
    assert _tuples(ds.train_x) == exp_train and _tuples(ds.val) == exp_val
    assert len(ds.test) == 16
    path = os.path.join(root, "fgvc_aircraft", "split_fewshot", "shot_2-seed_1.json")
    assert os.path.isfile(path)
    assert not any(f.startswith("split_zhou") for f in os.listdir(os.path.dirname(path) + "/.."))
    caplog.clear()
    random.seed(99)
    ds2 = build_dataset(_cfg("FGVCAircraft", root, shots=2, subsample="new"))
    assert "Loading preprocessed few-shot data" in caplog.text
    exp = _ref_subsample([exp_train, exp_val, test], "new")
    assert (_tuples(ds2.train_x), _tuples(ds2.val), _tuples(ds2.test)) == tuple(exp)
    assert ds2.classnames == ["F-16A/B", "BAE 146-200"]
    base = build_dataset(_cfg("FGVCAircraft", root, subsample="base"))
    assert base.classnames == ["707-320", "Falcon 2000"] and base.num_classes == 2


def test_fgvc_unknown_variant(copy):
    root = copy("fgvc")
    with open(os.path.join(root, "fgvc_aircraft", "images_variant_val.txt"), "a") as f:
        f.write("1000001 Concorde\n")
    with pytest.raises(ValueError, match=r"images_variant_val\.txt:\d+: .*'Concorde'"):
        build_dataset(_cfg("FGVCAircraft", root))


def test_missing_folders(tmp_path):
    for name, folder in (
        ("FGVCAircraft", "fgvc_aircraft"),
        ("SUN397", "sun397"),
        ("UCF101", "ucf101"),
        ("ImageNet", "imagenet"),
        ("ImageNetA", "imagenet-adversarial"),
        ("ImageNetV2", "imagenetv2"),
    ):
        with pytest.raises(DatasetNotFoundError, match=folder):
            build_dataset(_cfg(name, str(tmp_path)))


# ------------------------------------------------------------------------------ SUN397


def _sun_ref_lists(root):
    """Independent reading of ClassName.txt / Training_01.txt / Testing_01.txt."""
    ddir = os.path.join(root, "sun397")
    cats = [c.lstrip("/") for c in _read_lines(os.path.join(ddir, "ClassName.txt"))]

    def read(name):
        out = []
        for line in _read_lines(os.path.join(ddir, name)):
            rel = line.lstrip("/")
            cat = rel.rsplit("/", 1)[0]
            parts = cat.split("/")[1:]
            out.append((os.path.join(ddir, "SUN397", rel), cats.index(cat), " ".join(parts[::-1])))
        return out

    return read("Training_01.txt"), read("Testing_01.txt")


def test_sun397_with_json(copy):
    root = copy("sun")
    random.seed(5)
    state = random.getstate()
    ds = build_dataset(_cfg("SUN397", root))
    assert random.getstate() == state
    assert ds.classnames == SUN_NAMES
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (32, 8, 16)
    ddir = os.path.join(root, "sun397")
    exp = read_split(os.path.join(ddir, "split_zhou_SUN397.json"), os.path.join(ddir, "SUN397"))
    assert [_tuples(x) for x in (ds.train_x, ds.val, ds.test)] == [_tuples(x) for x in exp]
    _trainval, test = _sun_ref_lists(root)
    assert _tuples(ds.test) == test
    with open(os.path.join(ddir, "split_zhou_SUN397.json"), encoding="utf-8") as f:
        assert json.load(f)["train"][0][0].startswith(("a/", "b/"))


def test_sun397_without_json_generates_saves_and_rereads(copy):
    root = copy("sun_nojson")
    split_path = os.path.join(root, "sun397", "split_zhou_SUN397.json")
    assert not os.path.exists(split_path)
    trainval, test = _sun_ref_lists(root)
    random.seed(1)
    exp_train, exp_val = _ref_split_trainval(list(trainval))
    random.seed(1)
    ds = build_dataset(_cfg("SUN397", root))
    assert (_tuples(ds.train_x), _tuples(ds.val), _tuples(ds.test)) == (exp_train, exp_val, test)
    assert ds.classnames == SUN_NAMES and (len(ds.train_x), len(ds.val)) == (32, 8)
    assert os.path.isfile(split_path)
    with open(split_path, encoding="utf-8") as f:
        obj = json.load(f)
    assert obj["test"][0] == ["a/abbey/" + os.path.basename(test[0][0]), 0, "abbey"]
    # re-read with no draws, identical
    random.seed(42)
    state = random.getstate()
    ds2 = build_dataset(_cfg("SUN397", root))
    assert random.getstate() == state
    assert [_tuples(x) for x in (ds2.train_x, ds2.val, ds2.test)] == [exp_train, exp_val, test]
    # same seed from scratch -> same split
    os.remove(split_path)
    random.seed(1)
    ds3 = build_dataset(_cfg("SUN397", root))
    assert _tuples(ds3.val) == exp_val


def test_sun397_fewshot_and_subsample(copy):
    root = copy("sun")
    ddir = os.path.join(root, "sun397")
    full = [
        _tuples(x)
        for x in read_split(
            os.path.join(ddir, "split_zhou_SUN397.json"), os.path.join(ddir, "SUN397")
        )
    ]
    random.seed(3)
    exp_train, exp_val = _ref_fewshot(full[0], 8), _ref_fewshot(full[1], 4)
    random.seed(3)
    ds = build_dataset(_cfg("SUN397", root, shots=8, seed=3, subsample="base"))
    exp = _ref_subsample([exp_train, exp_val, full[2]], "base")
    assert [_tuples(x) for x in (ds.train_x, ds.val, ds.test)] == exp
    assert ds.classnames == SUN_NAMES[:2]
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (16, 4, 8)  # val: 2 per class
    assert os.path.isfile(os.path.join(ddir, "split_fewshot", "shot_8-seed_3.json"))


# ------------------------------------------------------------------------------ UCF101


def _ucf_ref_lists(root):
    ddir = os.path.join(root, "ucf101")
    lists = os.path.join(ddir, "ucfTrainTestlist")
    ids = {}
    for line in _read_lines(os.path.join(lists, "classInd.txt")):
        i, action = line.split()
        ids[action] = int(i) - 1
    names = dict(zip(UCF_ACTIONS, UCF_NAMES))

    def read(name):
        out = []
        for line in _read_lines(os.path.join(lists, name)):
            action, video = line.split()[0].split("/")
            frame = video[: -len(".avi")] + ".jpg"
            out.append(
                (
                    os.path.join(ddir, "UCF-101-midframes", names[action], frame),
                    ids[action],
                    names[action],
                )
            )
        return out

    return read("trainlist01.txt"), read("testlist01.txt")


def test_ucf101_lists_are_real_format(src):
    lists = os.path.join(src["ucf_nojson"], "ucf101", "ucfTrainTestlist")
    raw = open(os.path.join(lists, "trainlist01.txt"), "rb").read()
    assert raw.startswith(b"ApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi 1\r\n")
    raw = open(os.path.join(lists, "classInd.txt"), "rb").read()
    assert raw == b"1 ApplyEyeMakeup\r\n2 Archery\r\n3 TaiChi\r\n4 YoYo\r\n"


def test_ucf101_with_json(copy):
    root = copy("ucf")
    random.seed(5)
    state = random.getstate()
    ds = build_dataset(_cfg("UCF101", root))
    assert random.getstate() == state
    assert ds.classnames == UCF_NAMES
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (32, 8, 16)
    _trainval, test = _ucf_ref_lists(root)
    assert _tuples(ds.test) == test
    assert all(it.impath.endswith(".jpg") for it in ds.train_x)


def test_ucf101_without_json_generates_saves_and_rereads(copy):
    root = copy("ucf_nojson")
    split_path = os.path.join(root, "ucf101", "split_zhou_UCF101.json")
    trainval, test = _ucf_ref_lists(root)
    random.seed(2)
    exp_train, exp_val = _ref_split_trainval(list(trainval))
    random.seed(2)
    ds = build_dataset(_cfg("UCF101", root))
    assert (_tuples(ds.train_x), _tuples(ds.val), _tuples(ds.test)) == (exp_train, exp_val, test)
    assert ds.classnames == UCF_NAMES
    with open(split_path, encoding="utf-8") as f:
        obj = json.load(f)
    assert obj["test"][0] == [
        "Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg",
        0,
        "Apply_Eye_Makeup",
    ]
    random.seed(42)
    state = random.getstate()
    ds2 = build_dataset(_cfg("UCF101", root))
    assert random.getstate() == state
    assert [_tuples(x) for x in (ds2.train_x, ds2.val, ds2.test)] == [exp_train, exp_val, test]
    os.remove(split_path)
    random.seed(2)
    assert _tuples(build_dataset(_cfg("UCF101", root)).train_x) == exp_train


def test_ucf101_fewshot_and_subsample(copy):
    root = copy("ucf")
    ddir = os.path.join(root, "ucf101")
    full = [
        _tuples(x)
        for x in read_split(
            os.path.join(ddir, "split_zhou_UCF101.json"), os.path.join(ddir, "UCF-101-midframes")
        )
    ]
    random.seed(1)
    exp_train, exp_val = _ref_fewshot(full[0], 1), _ref_fewshot(full[1], 1)
    random.seed(1)
    ds = build_dataset(_cfg("UCF101", root, shots=1, subsample="new"))
    exp = _ref_subsample([exp_train, exp_val, full[2]], "new")
    assert [_tuples(x) for x in (ds.train_x, ds.val, ds.test)] == exp
    assert ds.classnames == ["Tai_Chi", "Yo_Yo"] and len(ds.test) == 8


def test_rename_action():
    from coop.datasets.ucf101 import rename_action

    assert rename_action("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert rename_action("YoYo") == "Yo_Yo"
    assert rename_action("Archery") == "Archery"
    assert rename_action("HandstandPushups") == "Handstand_Pushups"


# ---------------------------------------------------------------------------- ImageNet


def _in_ref(root, split):
    """Sorted wnid folders -> label; sorted images (hidden files dropped)."""
    d = os.path.join(root, "imagenet", "images", split)
    out = []
    for label, wnid in enumerate(sorted(os.listdir(d))):
        for name in sorted(os.listdir(os.path.join(d, wnid))):
            if not name.startswith("."):
                out.append((os.path.join(d, wnid, name), label, IN_NAMES[label]))
    return out


def _cache(root):
    return os.path.join(root, "imagenet", "preprocessed.json")


def test_imagenet_lists_and_cache_is_json(copy, caplog):
    caplog.set_level(logging.INFO)
    root = copy("imagenet")
    random.seed(1)
    state = random.getstate()
    ds = build_dataset(_cfg("ImageNet", root))
    assert random.getstate() == state
    assert ds.classnames == IN_NAMES and ds.num_classes == 5
    assert _tuples(ds.train_x) == _in_ref(root, "train")
    assert _tuples(ds.test) == _in_ref(root, "val")
    assert ds.val is ds.test
    assert (len(ds.train_x), len(ds.test)) == (40, 20)
    assert not any(os.path.basename(it.impath).startswith(".") for it in ds.train_x)

    path = _cache(root)
    raw = open(path, "rb").read()
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)
    obj = json.loads(raw)
    assert obj["dataset_dir"] == os.path.join(root, "imagenet")
    assert len(obj["fingerprint"]) == 64 and obj["num_images"] == {"train": 40, "test": 20}
    assert obj["classnames"] == IN_NAMES
    assert obj["train"][0] == [
        f"images/train/{IN_WNIDS[0]}/{os.path.basename(ds.train_x[0].impath)}",
        0,
    ]
    assert not os.path.exists(os.path.join(root, "imagenet", "preprocessed.pkl"))
    assert not os.path.exists(os.path.join(root, "imagenet", "split_fewshot"))
    assert "Saved preprocessed ImageNet lists" in caplog.text

    # reused: a cache whose fingerprint matches is what gets served (proved by tampering
    # with its order while keeping the fingerprint)
    obj["test"] = obj["test"][::-1]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    caplog.clear()
    ds2 = build_dataset(_cfg("ImageNet", root))
    assert "Loading preprocessed ImageNet lists" in caplog.text
    assert _tuples(ds2.test) == _in_ref(root, "val")[::-1]


def test_imagenet_cache_rebuilt_when_images_change(copy, caplog):
    caplog.set_level(logging.INFO)
    root = copy("imagenet")
    build_dataset(_cfg("ImageNet", root))
    wdir = os.path.join(root, "imagenet", "images", "train", IN_WNIDS[2])
    first = sorted(os.listdir(wdir))[0]
    added = os.path.join(wdir, "n01484850_99999.JPEG")
    shutil.copy(os.path.join(wdir, first), added)
    caplog.clear()
    ds = build_dataset(_cfg("ImageNet", root))
    assert "changed since the cache" in caplog.text and "rebuilding" in caplog.text
    assert added in [it.impath for it in ds.train_x] and len(ds.train_x) == 41
    assert _tuples(ds.train_x) == _in_ref(root, "train")
    with open(_cache(root), encoding="utf-8") as f:
        assert json.load(f)["num_images"]["train"] == 41

    removed = ds.test[0].impath
    os.remove(removed)
    caplog.clear()
    ds = build_dataset(_cfg("ImageNet", root))
    assert "changed since the cache" in caplog.text
    assert removed not in [it.impath for it in ds.test] and len(ds.test) == 19
    caplog.clear()
    build_dataset(_cfg("ImageNet", root))
    assert "Loading preprocessed ImageNet lists" in caplog.text

    # new class names (classnames.txt edited) also rebuild
    cn = os.path.join(root, "imagenet", "classnames.txt")
    text = open(cn, encoding="utf-8").read().replace(" tench", " tinca tinca")
    open(cn, "w", encoding="utf-8").write(text)
    caplog.clear()
    ds = build_dataset(_cfg("ImageNet", root))
    assert "rebuilding" in caplog.text and ds.classnames[0] == "tinca tinca"


def test_imagenet_cache_rebuilt_when_root_moves(copy, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = copy("imagenet")
    build_dataset(_cfg("ImageNet", root))
    moved = str(tmp_path / "elsewhere")
    shutil.move(root, moved)
    caplog.clear()
    ds = build_dataset(_cfg("ImageNet", moved))
    assert "was made for" in caplog.text and "rebuilding" in caplog.text
    assert all(it.impath.startswith(moved + os.sep) for it in ds.train_x + ds.test)
    with open(_cache(moved), encoding="utf-8") as f:
        assert json.load(f)["dataset_dir"] == os.path.join(moved, "imagenet")


def test_imagenet_cache_dir_and_read_only(copy, tmp_path, monkeypatch, caplog):
    import coop.datasets.imagenet as imagenet_mod

    root = copy("imagenet")
    cache = str(tmp_path / "cache")
    build_dataset(_cfg("ImageNet", root, cache_dir=cache))
    assert os.path.isfile(os.path.join(cache, "imagenet", "preprocessed.json"))
    assert not os.path.exists(_cache(root))

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(imagenet_mod, "dir_is_writable", lambda path: False)
    ds = build_dataset(_cfg("ImageNet", root))
    assert "continuing without it" in caplog.text and not os.path.exists(_cache(root))
    assert len(ds.train_x) == 40


def test_imagenet_errors(copy):
    root = copy("imagenet")
    extra = os.path.join(root, "imagenet", "images", "val", "n09999999")
    os.makedirs(extra)
    shutil.copy(_in_ref(root, "val")[0][0], extra)
    with pytest.raises(ValueError, match="same wnid folders"):
        build_dataset(_cfg("ImageNet", root))
    shutil.rmtree(extra)
    # a flat val folder (the raw ILSVRC layout) is refused with a hint
    vdir = os.path.join(root, "imagenet", "images", "val")
    for wnid in IN_WNIDS:
        for name in os.listdir(os.path.join(vdir, wnid)):
            shutil.move(os.path.join(vdir, wnid, name), os.path.join(vdir, name))
        os.rmdir(os.path.join(vdir, wnid))
    with pytest.raises(ValueError, match="one folder per wnid"):
        build_dataset(_cfg("ImageNet", root))


def test_imagenet_fewshot_train_only_and_subsample(copy):
    root = copy("imagenet")
    train, test = _in_ref(root, "train"), _in_ref(root, "val")
    random.seed(1)
    exp_train = _ref_fewshot(train, 4)
    random.seed(1)
    ds = build_dataset(_cfg("ImageNet", root, shots=4))
    assert _tuples(ds.train_x) == exp_train and len(ds.train_x) == 20
    assert _tuples(ds.test) == test and ds.val is ds.test
    path = os.path.join(root, "imagenet", "split_fewshot", "shot_4-seed_1.json")
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    assert obj["val"] is None and len(obj["train"]) == 20

    random.seed(77)
    base = build_dataset(_cfg("ImageNet", root, shots=4, subsample="base"))
    exp = _ref_subsample([exp_train, test], "base")
    assert [_tuples(base.train_x), _tuples(base.test)] == exp
    assert base.val is base.test and base.classnames == IN_NAMES[:3]
    new = build_dataset(_cfg("ImageNet", root, subsample="new"))
    assert new.classnames == IN_NAMES[3:] and len(new.test) == 8 and len(new.train_x) == 16
    assert {it.label for it in new.test} == {0, 1}


# ------------------------------------------------------------------- ImageNet variants


@pytest.mark.parametrize(
    "name, folder, wnid_labels",
    [
        ("ImageNetV2", "imagenetv2", [0, 1, 2, 3, 4]),
        ("ImageNetSketch", "imagenet-sketch", [0, 1, 2, 3, 4]),
        ("ImageNetA", "imagenet-adversarial", [1, 2, 4]),
        ("ImageNetR", "imagenet-rendition", [0, 2, 3, 4]),
    ],
)
def test_variants(copy, caplog, name, folder, wnid_labels):
    caplog.set_level(logging.INFO)
    root = copy("variants")
    random.seed(1)
    state = random.getstate()
    ds = build_dataset(_cfg(name, root))
    assert random.getstate() == state
    names = [IN_NAMES[i] for i in wnid_labels]
    assert ds.classnames == names and ds.num_classes == len(names)
    assert ds.val is None and ds.train_x is ds.test
    assert len(ds.test) == 3 * len(names)
    assert [it.label for it in ds.test] == [y for y in range(len(names)) for _ in range(3)]
    assert not any("README" in it.impath for it in ds.test)
    assert [it.impath for it in ds.test] == sorted(it.impath for it in ds.test)
    # test-only: NUM_SHOTS and SUBSAMPLE_CLASSES are ignored, nothing is written
    ds2 = build_dataset(_cfg(name, root, shots=2, subsample="base"))
    assert _tuples(ds2.test) == _tuples(ds.test) and ds2.classnames == names
    assert "is ignored" in caplog.text
    assert not os.path.exists(os.path.join(root, folder, "split_fewshot"))
    assert random.getstate() == state


def test_imagenetv2_labels_follow_classnames_line_order(copy):
    root = copy("variants")
    cn = os.path.join(root, "imagenetv2", "classnames.txt")
    lines = open(cn, encoding="utf-8").read().splitlines()
    shuffled = [lines[i] for i in (3, 0, 4, 1, 2)]
    open(cn, "w", encoding="utf-8").write("\n".join(shuffled) + "\n")
    ds = build_dataset(_cfg("ImageNetV2", root))
    assert ds.classnames == [line.split(" ", 1)[1] for line in shuffled]
    assert all(f"/{it.label}/" in it.impath for it in ds.test)
    shutil.rmtree(os.path.join(root, "imagenetv2", "imagenetv2-matched-frequency-format-val", "3"))
    with pytest.raises(ValueError, match=r"missing: \['3'\]"):
        build_dataset(_cfg("ImageNetV2", root))


def test_imagenet_a_r_200_of_1000_classes(tmp_path):
    classes = imagenet_classes(1000)
    a_idx = sorted(random.Random(0).sample(range(1000), 200))
    r_idx = list(range(0, 1000, 5))
    root = make_imagenet_variants(
        str(tmp_path),
        n_classes=1000,
        n_per_class=1,
        a_classes=a_idx,
        r_classes=r_idx,
        variants=("a", "r", "v2"),
        image_size=8,
    )
    for name, idx in (("ImageNetA", a_idx), ("ImageNetR", r_idx)):
        ds = build_dataset(_cfg(name, root))
        assert ds.num_classes == 200 and len(ds.test) == 200
        assert [it.label for it in ds.test] == list(range(200))
        wnids = sorted(classes[i][0] for i in idx)
        assert ds.classnames == [dict(classes)[w] for w in wnids]
        assert [os.path.basename(os.path.dirname(it.impath)) for it in ds.test] == wnids
    v2 = build_dataset(_cfg("ImageNetV2", root))
    assert v2.num_classes == 1000 and v2.classnames == [n for _, n in classes]
    assert v2.classnames[:2] == ["tench", "goldfish"] and v2.classnames[999] == "class 999"


def test_variant_unknown_wnid_folder(copy):
    root = copy("variants")
    os.makedirs(os.path.join(root, "imagenet-adversarial", "imagenet-a", "n09999999"))
    with pytest.raises(ValueError, match="n09999999"):
        build_dataset(_cfg("ImageNetA", root))


# ------------------------------------------------------------------------ end to end


def _argv(trainer, dataset_yaml, root, out, ckpt, *extra):
    argv = [
        "--root", root,
        "--seed", "1",
        "--trainer", trainer,
        "--dataset-config-file", str(REPO / "configs" / "datasets" / dataset_yaml),
        "--config-file", str(REPO / "configs" / "trainers" / "CoOp" / "rn50.yaml"),
        "--output-dir", out,
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0",
        *extra,
    ]  # fmt: skip
    if trainer == "ZeroshotCLIP":
        argv.insert(0, "--eval-only")
    else:
        argv += ["DATASET.NUM_SHOTS", "2", "TRAINER.COOP.PREC", "fp32", "OPTIM.MAX_EPOCH", "1"]
    return argv


@pytest.mark.parametrize(
    "key, yaml_name, n_test", [("ucf", "ucf101.yaml", 16), ("imagenet", "imagenet.yaml", 20)]
)
def test_e2e_coop_and_zeroshot(copy, tiny_vit, tmp_path, key, yaml_name, n_test):
    root = copy(key)
    out = str(tmp_path / "coop")
    assert main(_argv("CoOp", yaml_name, root, out, tiny_vit)) == 0
    res = read_results(out)
    assert res["trainer"] == "CoOp" and res["total"] == n_test and res["num_shots"] == 2
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-1"))

    zs = str(tmp_path / "zs")
    assert main(_argv("ZeroshotCLIP", yaml_name, root, zs, tiny_vit)) == 0
    res = read_results(zs)
    assert res["trainer"] == "ZeroshotCLIP" and res["total"] == n_test

    if key == "imagenet":
        # the generic context learned on ImageNet evaluates on ImageNet-A (3 of 5 classes)
        vroot = copy("variants", "variants")
        ev = str(tmp_path / "eval_a")
        argv = _argv("CoOp", "imagenet_a.yaml", vroot, ev, tiny_vit)
        assert main(["--eval-only", "--model-dir", out, "--load-epoch", "1", *argv]) == 0
        assert read_results(ev)["total"] == 9


def test_e2e_zeroshot_imagenet_a(copy, tiny_vit, tmp_path):
    root = copy("variants")
    out = str(tmp_path / "zs_a")
    assert main(_argv("ZeroshotCLIP", "imagenet_a.yaml", root, out, tiny_vit)) == 0
    res = read_results(out)
    assert res["trainer"] == "ZeroshotCLIP" and res["total"] == 9
    assert not os.path.exists(os.path.join(root, "imagenet-adversarial", "split_fewshot"))
