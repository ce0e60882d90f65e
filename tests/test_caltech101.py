"""Split machinery (coop.splits), the Caltech101 loader and the DataManager on a miniature."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pytest

import coop.splits as splits
from coop.config import get_cfg_default
from coop.data import DataManager, Datum, MissingImageError
from coop.registry import DATASET_REGISTRY, build_dataset
from coop.splits import (
    DatasetNotFoundError,
    NotWritableError,
    SplitFileError,
    listdir_nohidden,
    read_and_split_data,
    read_split,
    save_split,
    split_trainval,
)
from coop.testing.fixtures import make_caltech101

IGNORED = ["BACKGROUND_Google", "Faces_easy"]
RENAMES = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}
EXPECTED_CLASSNAMES = [
    "face",
    "leopard",
    "motorbike",
    "accordion",
    "airplane",
    "anchor",
    "ant",
    "barrel",
    "bass",
    "beaver",
]


@pytest.fixture(scope="module")
def caltech_src(tmp_path_factory):
    """A pristine miniature (with and without split JSON), copied per test when mutated."""
    base = tmp_path_factory.mktemp("caltech_src")
    with_json = make_caltech101(str(base / "with"), with_split=True, seed=0)
    no_json = make_caltech101(str(base / "without"), with_split=False, seed=0)
    return with_json, no_json


@pytest.fixture
def root_json(caltech_src, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(caltech_src[0], dst)
    return dst


@pytest.fixture
def root_nojson(caltech_src, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(caltech_src[1], dst)
    return dst


def _cfg(root, shots=-1, seed=1, subsample="all", cache_dir=""):
    cfg = get_cfg_default()
    cfg.DATASET.NAME = "Caltech101"
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.DATASET.CACHE_DIR = cache_dir
    cfg.SEED = seed
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.SIZE = (32, 32)
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    return cfg


def _tuples(items):
    return [(it.impath, it.label, it.classname) for it in items]


def _image_dir(root):
    return os.path.join(root, "caltech-101", "101_ObjectCategories")


def _split_path(root):
    return os.path.join(root, "caltech-101", "split_zhou_Caltech101.json")


# ----------------------------------------------------------------------- split helpers


def test_listdir_nohidden(tmp_path):
    for name in ["b", "a", ".hidden", "C"]:
        (tmp_path / name).write_text("")
    assert sorted(listdir_nohidden(str(tmp_path))) == ["C", "a", "b"]
    assert listdir_nohidden(str(tmp_path), sort=True) == ["C", "a", "b"]


def _ref_read_and_split(image_dir, seed):
    """Independent re-derivation of the 50/20/30 rule (sorted images, one shuffle each)."""
    random.seed(seed)
    cats = sorted(c for c in os.listdir(image_dir) if not c.startswith(".") and c not in IGNORED)
    out = ([], [], [])
    for label, cat in enumerate(cats):
        d = os.path.join(image_dir, cat)
        ims = [os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.startswith(".")]
        random.shuffle(ims)
        n = len(ims)
        nt, nv = round(n * 0.5), round(n * 0.2)
        cname = RENAMES.get(cat, cat)
        for part, chunk in zip(out, (ims[:nt], ims[nt : nt + nv], ims[nt + nv :])):
            part.extend((p, label, cname) for p in chunk)
    return out


def test_read_and_split_data_caltech(root_nojson, caplog):
    caplog.set_level(logging.INFO, logger="coop.splits")
    image_dir = _image_dir(root_nojson)
    random.seed(3)
    train, val, test = read_and_split_data(image_dir, ignored=IGNORED, new_cnames=RENAMES)
    assert "Splitting into 50% train, 20% val, and 30% test" in caplog.text
    assert (len(train), len(val), len(test)) == (100, 40, 60)  # 10 classes x 10/4/6
    lab2name = {it.label: it.classname for it in train}
    assert [lab2name[i] for i in range(10)] == EXPECTED_CLASSNAMES
    assert all(it.domain == 0 for it in train)
    assert not any("BACKGROUND" in it.impath or "Faces_easy" in it.impath for it in test)
    assert not any(os.path.basename(it.impath).startswith(".") for it in train + val + test)
    exp = _ref_read_and_split(image_dir, 3)
    assert (_tuples(train), _tuples(val), _tuples(test)) == exp
    # disjoint and complete
    paths = [it.impath for it in train + val + test]
    assert len(set(paths)) == 200


def test_read_and_split_data_ignores_listdir_order(root_nojson, monkeypatch):
    image_dir = _image_dir(root_nojson)
    random.seed(0)
    a = read_and_split_data(image_dir, ignored=IGNORED, new_cnames=RENAMES)
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: list(reversed(real(p))))
    random.seed(0)
    b = read_and_split_data(image_dir, ignored=IGNORED, new_cnames=RENAMES)
    assert [_tuples(x) for x in a] == [_tuples(x) for x in b]


def _touch_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"{i:03d}.jpg"), "wb"):
            pass


def test_read_and_split_data_rounding_and_errors(tmp_path):
    _touch_images(str(tmp_path / "five"), 5)
    _touch_images(str(tmp_path / "seven"), 7)
    train, val, test = read_and_split_data(str(tmp_path))
    count = {
        name: [sum(it.classname == name for it in part) for part in (train, val, test)]
        for name in ("five", "seven")
    }
    # round(2.5) = 2 and round(3.5) = 4 (halves to even); round(1.0) = 1, round(1.4) = 1
    assert count == {"five": [2, 1, 2], "seven": [4, 1, 2]}
    _touch_images(str(tmp_path / "three"), 3)
    with pytest.raises(ValueError, match=r"three has 3 image\(s\)"):
        read_and_split_data(str(tmp_path))


def test_split_trainval_reference(tmp_path):
    labels = [2, 0, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0, 1, 1, 0]
    items = []
    for i, lab in enumerate(labels):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(b"")
        items.append(Datum(str(p), label=lab, classname=f"c{lab}"))
    random.seed(4)
    train, val = split_trainval(items, p_val=0.2)
    # reference
    random.seed(4)
    groups = {}
    for idx, it in enumerate(items):
        groups.setdefault(it.label, []).append(idx)
    exp_tr, exp_va = [], []
    for _lab, idxs in groups.items():
        nv = round(len(idxs) * 0.2)
        random.shuffle(idxs)
        for n, idx in enumerate(idxs):
            (exp_va if n < nv else exp_tr).append(items[idx].impath)
    assert [it.impath for it in train] == exp_tr
    assert [it.impath for it in val] == exp_va
    with pytest.raises(ValueError, match="too few"):
        split_trainval(items[:3])


def test_save_and_read_split_round_trip(root_json, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coop.splits")
    image_dir = _image_dir(root_json)
    train, val, test = read_split(_split_path(root_json), image_dir)
    assert f"Reading split from {_split_path(root_json)}" in caplog.text
    out = str(tmp_path / "copy.json")
    save_split(train, val, test, out, image_dir)
    assert f"Saved split to {out}" in caplog.text
    with open(out, encoding="utf-8") as f:
        text = f.read()
    obj = json.loads(text)
    assert text == json.dumps(obj, indent=4, separators=(",", ": "))
    assert obj["train"][0][0].startswith("Faces/")
    assert not any(e[0].startswith("/") for e in obj["train"] + obj["val"] + obj["test"])
    # the fixture's own file is byte-identical (same writer)
    with open(_split_path(root_json), encoding="utf-8") as f:
        assert f.read() == text
    again = read_split(out, image_dir)
    assert [_tuples(x) for x in again] == [_tuples(x) for x in (train, val, test)]
    assert all(isinstance(it.label, int) for it in again[0])


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold an object"),
        ('{"train": [], "val": []}', "lacks the key"),
        ('{"train": [["a.jpg", 0]], "val": [], "test": []}', r"train\[0\] must be"),
        ('{"train": {}, "val": [], "test": []}', "'train' must be a list"),
        ('{"train": [], "val": [["a.jpg", "x", "c"]], "test": []}', "not an integer"),
    ],
)
def test_malformed_split_file(tmp_path, content, match):
    p = tmp_path / "split.json"
    p.write_text(content)
    with pytest.raises(SplitFileError, match=match) as ei:
        read_split(str(p), str(tmp_path))
    assert str(p) in str(ei.value)


def test_split_lists_missing_image(tmp_path):
    p = tmp_path / "split.json"
    p.write_text('{"train": [["gone.jpg", 0, "c"]], "val": [], "test": []}')
    with pytest.raises(MissingImageError, match=r"gone\.jpg.*split\.json"):
        read_split(str(p), str(tmp_path))


# ------------------------------------------------------------------------- Caltech101


def test_registered():
    assert "Caltech101" in DATASET_REGISTRY


def test_caltech101_with_json_draws_nothing(root_json, caplog):
    caplog.set_level(logging.INFO)
    random.seed(123)
    state = random.getstate()
    ds = build_dataset(_cfg(root_json))
    assert random.getstate() == state
    assert "Reading split from" in caplog.text
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (100, 40, 60)
    assert ds.num_classes == 10 and ds.classnames == EXPECTED_CLASSNAMES
    assert ds.lab2cname[0] == "face" and ds.lab2cname[4] == "airplane"
    assert ds.dataset_dir == os.path.join(root_json, "caltech-101")
    # NUM_SHOTS < 1: split_fewshot/ is not created (read-only roots work)
    assert not os.path.exists(os.path.join(root_json, "caltech-101", "split_fewshot"))
    exp = read_split(_split_path(root_json), _image_dir(root_json))
    assert _tuples(ds.test) == _tuples(exp[2])


def test_caltech101_without_json_generates_and_saves(root_nojson, caltech_src):
    split_path = _split_path(root_nojson)
    assert not os.path.exists(split_path)
    random.seed(1)
    ds = build_dataset(_cfg(root_nojson))
    assert os.path.isfile(split_path)
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (100, 40, 60)
    assert ds.classnames == EXPECTED_CLASSNAMES
    exp = _ref_read_and_split(_image_dir(root_nojson), 1)
    assert (_tuples(ds.train_x), _tuples(ds.val), _tuples(ds.test)) == exp
    # the written file is then read back with no draws, giving the same lists
    random.seed(99)
    state = random.getstate()
    ds2 = build_dataset(_cfg(root_nojson))
    assert random.getstate() == state
    assert _tuples(ds2.train_x) == _tuples(ds.train_x)
    # same seed, regenerated from scratch -> the same split
    os.remove(split_path)
    random.seed(1)
    ds3 = build_dataset(_cfg(root_nojson))
    assert _tuples(ds3.test) == _tuples(ds.test)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"caltech-101") as ei:
        build_dataset(_cfg(str(tmp_path)))
    assert isinstance(ei.value, FileNotFoundError)
    assert str(tmp_path) in str(ei.value)


def test_subsample_base_new(root_json):
    base = build_dataset(_cfg(root_json, subsample="base"))
    new = build_dataset(_cfg(root_json, subsample="new"))
    assert base.classnames == EXPECTED_CLASSNAMES[:5]
    assert new.classnames == EXPECTED_CLASSNAMES[5:]
    assert base.num_classes == new.num_classes == 5
    assert (len(new.train_x), len(new.val), len(new.test)) == (50, 20, 30)
    assert {it.label for it in new.test} == set(range(5))


# --------------------------------------------------------------------- few-shot cache


def _ref_fewshot(items, k):
    groups = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    out = []
    for g in groups.values():
        out.extend(random.sample(g, k) if len(g) >= k else g)
    return _tuples(out)


@pytest.mark.parametrize("shots", [1, 8])
def test_fewshot_cache_written_and_reused(root_json, caplog, shots):
    caplog.set_level(logging.INFO)
    full_train, full_val, _ = read_split(_split_path(root_json), _image_dir(root_json))
    random.seed(1)
    exp_train = _ref_fewshot(full_train, shots)
    exp_val = _ref_fewshot(full_val, min(shots, 4))

    random.seed(1)
    ds = build_dataset(_cfg(root_json, shots=shots, seed=1))
    path = os.path.join(root_json, "caltech-101", "split_fewshot", f"shot_{shots}-seed_1.json")
    assert os.path.isfile(path)
    assert f"Saving preprocessed few-shot data to {path}" in caplog.text
    assert f"Creating a {shots}-shot dataset" in caplog.text
    assert f"Creating a {min(shots, 4)}-shot dataset" in caplog.text
    assert caplog.text.count("Creating a") == 2  # train, then val
    assert _tuples(ds.train_x) == exp_train and _tuples(ds.val) == exp_val
    assert (len(ds.train_x), len(ds.val)) == (10 * shots, 10 * min(shots, 4))
    assert len(ds.test) == 60
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    assert obj["num_shots"] == shots and obj["seed"] == 1 and len(obj["source"]) == 64
    assert obj["train"][0][0].startswith("101_ObjectCategories/")

    caplog.clear()
    random.seed(555)
    state = random.getstate()
    ds2 = build_dataset(_cfg(root_json, shots=shots, seed=1))
    assert random.getstate() == state
    assert f"Loading preprocessed few-shot data from {path}" in caplog.text
    assert "Creating a" not in caplog.text
    assert _tuples(ds2.train_x) == exp_train and _tuples(ds2.val) == exp_val


def test_fewshot_cache_rebuilt_when_split_changes(root_json, caplog):
    caplog.set_level(logging.INFO)
    build_dataset(_cfg(root_json, shots=2))
    # move every train item of class 0 into test and the test items into train
    with open(_split_path(root_json), encoding="utf-8") as f:
        obj = json.load(f)
    tr0 = [e for e in obj["train"] if e[1] == 0]
    te0 = [e for e in obj["test"] if e[1] == 0]
    obj["train"] = [e for e in obj["train"] if e[1] != 0] + te0
    obj["test"] = [e for e in obj["test"] if e[1] != 0] + tr0
    with open(_split_path(root_json), "w", encoding="utf-8") as f:
        json.dump(obj, f)
    caplog.clear()
    random.seed(1)
    ds = build_dataset(_cfg(root_json, shots=2))
    assert "The split changed" in caplog.text and "rebuilding" in caplog.text
    assert "Saving preprocessed few-shot data" in caplog.text
    train_paths = {it.impath for it in ds.train_x}
    test_paths = {it.impath for it in ds.test}
    assert not train_paths & test_paths  # no train/test leakage
    # and the rebuilt cache is then reused
    caplog.clear()
    ds2 = build_dataset(_cfg(root_json, shots=2))
    assert "Loading preprocessed few-shot data" in caplog.text
    assert _tuples(ds2.train_x) == _tuples(ds.train_x)


def test_fewshot_cache_corrupt_is_rebuilt(root_json, caplog):
    caplog.set_level(logging.INFO)
    path = os.path.join(root_json, "caltech-101", "split_fewshot", "shot_2-seed_1.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{truncated")
    build_dataset(_cfg(root_json, shots=2))
    assert "Ignoring the few-shot cache" in caplog.text
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["num_shots"] == 2


def _read_only(monkeypatch, folder):
    """Pretend ``folder`` (and everything under it) is not writable (tests run as root)."""
    real = splits.dir_is_writable
    folder = os.path.abspath(folder)

    def fake(path):
        path = os.path.abspath(path)
        if path == folder or path.startswith(folder + os.sep):
            return False
        return real(path)

    monkeypatch.setattr(splits, "dir_is_writable", fake)


def test_read_only_dataset_folder_needs_cache_dir(root_json, tmp_path, monkeypatch):
    dataset_dir = os.path.join(root_json, "caltech-101")
    _read_only(monkeypatch, dataset_dir)
    build_dataset(_cfg(root_json))  # NUM_SHOTS -1: nothing to write, works
    with pytest.raises(NotWritableError, match="DATASET.CACHE_DIR"):
        build_dataset(_cfg(root_json, shots=2))
    assert not os.path.exists(os.path.join(dataset_dir, "split_fewshot"))

    cache = str(tmp_path / "cache")
    random.seed(1)
    ds = build_dataset(_cfg(root_json, shots=2, cache_dir=cache))
    path = os.path.join(cache, "caltech-101", "split_fewshot", "shot_2-seed_1.json")
    assert os.path.isfile(path)
    assert not os.path.exists(os.path.join(dataset_dir, "split_fewshot"))
    assert len(ds.train_x) == 20
    state = random.getstate()
    ds2 = build_dataset(_cfg(root_json, shots=2, cache_dir=cache))
    assert random.getstate() == state
    assert _tuples(ds2.train_x) == _tuples(ds.train_x)


def test_read_only_without_json_saves_split_to_cache(root_nojson, tmp_path, monkeypatch):
    dataset_dir = os.path.join(root_nojson, "caltech-101")
    _read_only(monkeypatch, dataset_dir)
    with pytest.raises(NotWritableError, match="DATASET.CACHE_DIR"):
        build_dataset(_cfg(root_nojson))
    cache = str(tmp_path / "cache")
    random.seed(1)
    ds = build_dataset(_cfg(root_nojson, cache_dir=cache))
    cached_split = os.path.join(cache, "caltech-101", "split_zhou_Caltech101.json")
    assert os.path.isfile(cached_split) and not os.path.exists(_split_path(root_nojson))
    random.seed(2)
    state = random.getstate()
    ds2 = build_dataset(_cfg(root_nojson, cache_dir=cache))
    assert random.getstate() == state  # read back from the cache root
    assert _tuples(ds2.test) == _tuples(ds.test)


# ------------------------------------------------------------------------ DataManager


@pytest.mark.parametrize("shots, n_train, n_batches", [(-1, 100, 3), (1, 10, 1)])
def test_datamanager(root_json, caplog, shots, n_train, n_batches):
    caplog.set_level(logging.INFO)
    cfg = _cfg(root_json, shots=shots)
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 32
    cfg.DATALOADER.TEST.BATCH_SIZE = 25
    dm = DataManager(cfg)
    assert dm.num_classes == 10 and dm.num_source_domains == 0
    assert dm.lab2cname == dict(enumerate(EXPECTED_CLASSNAMES))
    assert len(dm.dataset.train_x) == n_train
    assert len(dm.train_loader_x) == n_batches  # floor(N/bs) if N >= bs, else 1
    assert dm.train_loader_u is None
    assert len(dm.test_loader) == 3 and dm.val_loader is not None
    batches = list(dm.train_loader_x)
    assert sum(len(b["label"]) for b in batches) == (96 if shots == -1 else 10)
    assert batches[0]["img"].shape[1:] == (3, 32, 32)
    assert "Building transform_train" in caplog.text and "Building transform_test" in caplog.text
    text = caplog.text
    for key in ("Dataset", "Caltech101", "# classes", "# train_x", "# val", "# test"):
        assert key in text
    assert f"# train_x  {n_train}" in text


# ---------------------------------------------------------------------------- fixture


def test_fixture_is_deterministic_and_learnable(tmp_path):
    import numpy as np
    from PIL import Image

    a = make_caltech101(str(tmp_path / "a"), n_classes=6, n_per_class=10, seed=3)
    b = make_caltech101(str(tmp_path / "b"), n_classes=6, n_per_class=10, seed=3)
    for rel in (
        "caltech-101/split_zhou_Caltech101.json",
        "caltech-101/101_ObjectCategories/accordion/image_0007.jpg",
    ):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read()
    # nearest class-mean on raw pixel colour statistics separates the classes
    train, _val, test = read_split(_split_path(a), _image_dir(a))

    def feat(it):
        x = np.asarray(Image.open(it.impath).convert("RGB"), dtype=np.float64)
        return np.concatenate([x.mean((0, 1)), x.std((0, 1))])

    labels = sorted({it.label for it in train})
    centres = {y: np.mean([feat(it) for it in train if it.label == y], 0) for y in labels}
    correct = sum(
        min(labels, key=lambda y: np.linalg.norm(feat(it) - centres[y])) == it.label for it in test
    )
    assert correct == len(test)
