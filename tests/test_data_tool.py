"""``coop-data`` (coop.data_tool) and the dataset table (coop.dataset_info), offline."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest

import coop.data_tool as data_tool
from coop.data_tool import main
from coop.dataset_info import DATASETS, resolve_name
from coop.registry import DATASET_REGISTRY
from coop.testing.fixtures import class_image, make_caltech101
from coop.testing.fixtures_imagenet import (
    FGVC_VARIANTS,
    make_imagenet,
    make_imagenet_variants,
)
from coop.testing.fixtures_more import make_eurosat, make_oxford_pets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESENT = ["ImageNet", "Caltech101", "OxfordPets", "FGVCAircraft", "EuroSAT", "ImageNetA"]


def run(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def listing(root):
    """Every path under ``root`` with its size and mtime (to prove nothing was written)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _jpeg(path, label, n_classes, rng, size=8):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(class_image(label, n_classes, rng, size, size)).save(path, format="JPEG")


def make_fgvc_full(root, n_classes=100):
    """An FGVCAircraft miniature with all 100 variants, one image per class and split (the
    fixture builder has only 12 real names)."""
    rng = np.random.default_rng(0)
    ddir = os.path.join(root, "fgvc_aircraft")
    names = list(FGVC_VARIANTS) + [f"Variant {i:03d}" for i in range(len(FGVC_VARIANTS), 100)]
    names = names[:n_classes]
    os.makedirs(os.path.join(ddir, "images"), exist_ok=True)
    with open(os.path.join(ddir, "variants.txt"), "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))
    image_id = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for label, name in enumerate(names):
            image_id += 1
            _jpeg(os.path.join(ddir, "images", f"{image_id:07d}.jpg"), label, n_classes, rng)
            lines.append(f"{image_id:07d} {name}\n")
        with open(os.path.join(ddir, f"images_variant_{split}.txt"), "w") as f:
            f.write("".join(lines))
    return root


@pytest.fixture(scope="module")
def good_root(tmp_path_factory):
    """Miniatures with the published class counts (few images each): six datasets."""
    root = str(tmp_path_factory.mktemp("good") / "data")
    make_caltech101(root, n_classes=100, n_per_class=4, image_size=12)
    make_oxford_pets(root, n_classes=37, n_per_class=6, image_size=12)
    make_eurosat(root, n_classes=10, n_per_class=4, image_size=12)
    make_fgvc_full(root)
    make_imagenet(root, n_classes=1000, n_train=1, n_val=1, image_size=8)
    make_imagenet_variants(
        root,
        n_classes=1000,
        n_per_class=1,
        a_classes=range(0, 1000, 5),
        variants=("a",),
        image_size=8,
    )
    return root


@pytest.fixture
def root_with(good_root, tmp_path):
    """A private copy of some datasets of the good tree: ``root_with("caltech-101", ...)``."""

    def copy(*folders):
        root = str(tmp_path / "data")
        os.makedirs(root, exist_ok=True)
        for folder in folders:
            shutil.copytree(os.path.join(good_root, folder), os.path.join(root, folder))
        return root

    return copy


def split_entries(root, folder, split_file):
    with open(os.path.join(root, folder, split_file), encoding="utf-8") as f:
        return json.load(f)


# ======================================================================================
# the table and `list`
# ======================================================================================


def test_table_covers_the_registry_and_the_configs():
    assert set(DATASETS) == set(DATASET_REGISTRY.registered_names())
    assert len(DATASETS) == 15
    for name, info in DATASETS.items():
        cls = DATASET_REGISTRY.get(name)
        assert info.folder == cls.dataset_dir  # read from the class, not duplicated
        with open(os.path.join(REPO, "configs", "datasets", f"{info.config}.yaml")) as f:
            assert re.search(rf'NAME:\s*"?{name}"?\s*$', f.read(), re.M), info.config
        assert info.num_classes > 0 and info.sizes[2] > 0
    assert DATASETS["Caltech101"].split_file == "split_zhou_Caltech101.json"
    assert DATASETS["FGVCAircraft"].split_file == ""
    assert DATASETS["StanfordCars"].required_dirs == ("cars_train", "cars_test")


def test_download_facts_come_from_torchvision():
    import torchvision.datasets as tvd

    url, md5 = DATASETS["Food101"].downloads[0].resolve()
    assert (url, md5) == (tvd.Food101._URL, tvd.Food101._MD5)
    for info in DATASETS.values():
        for d in info.downloads:
            url, md5 = d.resolve()
            assert url.startswith(("https://", "http://")), (info.name, url)
            assert md5 is None or re.fullmatch(r"[0-9a-f]{32}", md5), (info.name, md5)


@pytest.mark.parametrize(
    "raw, name",
    [
        ("caltech101", "Caltech101"),
        ("CALTECH101", "Caltech101"),
        ("oxford_pets", "OxfordPets"),
        ("imagenet_a.yaml", "ImageNetA"),
        ("imageneta", "ImageNetA"),
        ("dtd", "DescribableTextures"),
        ("nope", None),
    ],
)
def test_resolve_name(raw, name):
    assert resolve_name(raw) == name


def test_list_prints_one_line_per_dataset(capsys):
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("DATASET.NAME")
    rows = {re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line) for line in lines[1:]}
    assert len(lines) == 16 and len(rows) == 15
    assert rows["Caltech101"][:6] == [
        "Caltech101",
        "caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        "100",
    ]
    assert rows["Caltech101"][-1] == "train 4128 / val 1649 / test 2465"
    assert rows["FGVCAircraft"][4].startswith("official lists")
    assert "split_zhou" not in " ".join(rows["FGVCAircraft"])
    assert rows["ImageNet"][2] == "imagenet" and rows["ImageNet"][5] == "1000"
    assert rows["ImageNetA"][2:6] == [
        "imagenet-adversarial",
        "imagenet-a",
        "none (test only)",
        "200",
    ]
    assert rows["OxfordFlowers"][1:3] == ["oxford_flowers", "oxford_flowers"]
    assert rows["StanfordCars"][6] == "manual"


# ======================================================================================
# check: good trees
# ======================================================================================


def test_check_good_tree(good_root, capsys):
    before = listing(good_root)
    rc, out, _ = run(capsys, "check", "--root", good_root)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 15
    expected = {
        "ImageNet": "WARN  ImageNet: 1000 classes, train 1000 / val 1000 / test 1000; differs "
        "from the published split (expected train 1281167 / val 50000 / test 50000)",
        "Caltech101": "WARN  Caltech101: 100 classes, train 200 / val 100 / test 100; differs "
        "from the published split (expected train 4128 / val 1649 / test 2465)",
        "OxfordPets": "WARN  OxfordPets: 37 classes, train 74 / val 37 / test 111; differs "
        "from the published split (expected train 2944 / val 736 / test 3669)",
        "FGVCAircraft": "WARN  FGVCAircraft: 100 classes, train 100 / val 100 / test 100; "
        "differs from the published split (expected train 3334 / val 3333 / test 3333)",
        "EuroSAT": "WARN  EuroSAT: 10 classes, train 20 / val 10 / test 10; differs from the "
        "published split (expected train 13500 / val 5400 / test 8100)",
        "ImageNetA": "WARN  ImageNetA: 200 classes, train 200 / val none / test 200; differs "
        "from the published split (expected train 7500 / val none / test 7500)",
    }
    for line in expected.values():
        assert line in lines
    for name, info in DATASETS.items():
        if name not in expected:
            path = os.path.join(good_root, info.folder)
            assert f"SKIP  {name}: not found ({path})" in lines
    assert listing(good_root) == before  # no split_fewshot/, no ImageNet cache, nothing


def test_check_ok_when_sizes_match_the_published_ones(root_with, capsys, monkeypatch):
    root = root_with("eurosat")
    info = DATASETS["EuroSAT"]
    monkeypatch.setitem(DATASETS, "EuroSAT", dataclasses.replace(info, sizes=(20, 10, 10)))
    rc, out, _ = run(capsys, "check", "--root", root, "eurosat")
    assert rc == 0
    assert out.splitlines() == ["OK    EuroSAT: 10 classes, train 20 / val 10 / test 10"]


def test_check_names_and_strict(good_root, capsys):
    rc, out, _ = run(capsys, "check", "--root", good_root, "CALTECH101", "imagenet_a")
    assert rc == 0
    assert [line[:16] for line in out.splitlines()] == ["WARN  Caltech101", "WARN  ImageNetA:"]
    rc, out, _ = run(capsys, "check", "--root", good_root, "--strict", "Caltech101")
    assert rc == 1
    rc, _, err = run(capsys, "check", "--root", good_root, "nope")
    assert rc == 2 and "unknown dataset 'nope'" in err


def test_check_empty_and_missing_root(tmp_path, capsys):
    rc, out, err = run(capsys, "check", "--root", str(tmp_path))
    assert rc == 1 and out.count("SKIP  ") == 15
    assert f"no dataset found under {tmp_path}" in err
    rc, out, err = run(capsys, "check", "--root", str(tmp_path / "nowhere"))
    assert rc == 1 and out == ""
    assert err.strip() == f"coop-data: error: the data root {tmp_path / 'nowhere'} does not exist"


# ======================================================================================
# check: broken trees (one exact FAIL line each, exit 1, nothing written)
# ======================================================================================


def check_fails(capsys, root, name, *extra):
    before = listing(root)
    rc, out, err = run(capsys, "check", "--root", root, name, *extra)
    assert rc == 1, out + err
    assert listing(root) == before
    lines = out.splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_missing_dataset_folder(tmp_path, capsys):
    line = check_fails(capsys, str(tmp_path), "Caltech101")
    assert line == f"FAIL  Caltech101: dataset folder not found ({tmp_path}/caltech-101)"


def test_missing_image_folder(root_with, capsys):
    root = root_with("caltech-101")
    ddir = os.path.join(root, "caltech-101")
    os.rename(os.path.join(ddir, "101_ObjectCategories"), os.path.join(ddir, "images"))
    line = check_fails(capsys, root, "caltech101")
    assert line == (
        f"FAIL  Caltech101: missing image folder 101_ObjectCategories ({ddir}/101_ObjectCategories)"
    )


def test_missing_split_file_is_reported_not_generated(root_with, capsys):
    root = root_with("caltech-101", "eurosat")
    split = os.path.join(root, "caltech-101", "split_zhou_Caltech101.json")
    os.remove(split)
    line = check_fails(capsys, root, "Caltech101")
    assert line == (
        "FAIL  Caltech101: missing split file split_zhou_Caltech101.json; the official one is "
        "linked from CoOp's DATASETS.md (Google Drive), see `coop-data prepare caltech101` "
        f"({split})"
    )
    assert not os.path.exists(split)
    # the other datasets are still checked, one line each
    rc, out, _ = run(capsys, "check", "--root", root)
    assert rc == 1
    assert sum(line.startswith(("FAIL", "WARN", "OK")) for line in out.splitlines()) == 2


def test_split_naming_missing_images(root_with, capsys):
    root = root_with("caltech-101")
    image_dir = os.path.join(root, "caltech-101", "101_ObjectCategories")
    split = split_entries(root, "caltech-101", "split_zhou_Caltech101.json")
    for key in ("test", "val", "train"):
        os.remove(os.path.join(image_dir, split[key][0][0]))
    first = os.path.join(image_dir, split["train"][0][0])
    line = check_fails(capsys, root, "Caltech101")
    assert line == (
        "FAIL  Caltech101: split_zhou_Caltech101.json lists 3 image(s) that do not exist; "
        f"first missing ({first})"
    )


def test_corrupt_sampled_image(root_with, capsys):
    root = root_with("caltech-101")
    image_dir = os.path.join(root, "caltech-101", "101_ObjectCategories")
    split = split_entries(root, "caltech-101", "split_zhou_Caltech101.json")
    bad = os.path.join(image_dir, split["train"][0][0])  # the first item is always sampled
    with open(bad, "wb") as f:
        f.write(b"this is not a JPEG" * 10)
    line = check_fails(capsys, root, "Caltech101")
    assert line == f"FAIL  Caltech101: 1 of 60 sampled images cannot be decoded ({bad})"
    line = check_fails(capsys, root, "Caltech101", "--sample", "3")
    assert line == f"FAIL  Caltech101: 1 of 9 sampled images cannot be decoded ({bad})"
    # without decoding the file is only listed, which is fine
    rc, out, _ = run(capsys, "check", "--root", root, "Caltech101", "--sample", "0")
    assert rc == 0 and out.startswith("WARN  Caltech101: 100 classes")


def test_invalid_split_json(root_with, capsys):
    root = root_with("oxford_pets")
    split = os.path.join(root, "oxford_pets", "split_zhou_OxfordPets.json")
    with open(split, "w") as f:
        f.write('{"train": [], "val": []}')
    line = check_fails(capsys, root, "OxfordPets")
    assert line == (
        f"FAIL  OxfordPets: Split file {split} lacks the key(s) test "
        f"({os.path.join(root, 'oxford_pets')})"
    )


def test_empty_class_folder(root_with, capsys):
    root = root_with("imagenet")
    val_dir = os.path.join(root, "imagenet", "images", "val")
    wnid = sorted(os.listdir(val_dir))[1]
    for name in os.listdir(os.path.join(val_dir, wnid)):
        os.remove(os.path.join(val_dir, wnid, name))
    line = check_fails(capsys, root, "imagenet")
    assert line == (
        f"FAIL  ImageNet: the class folder(s) ['{wnid}'] in {val_dir} hold no images "
        f"({os.path.join(root, 'imagenet')})"
    )


def test_class_count_mismatch(root_with, capsys):
    root = root_with("imagenet-adversarial")
    image_dir = os.path.join(root, "imagenet-adversarial", "imagenet-a")
    wnid = [d for d in sorted(os.listdir(image_dir)) if d.startswith("n")][0]  # not README.txt
    shutil.rmtree(os.path.join(image_dir, wnid))
    line = check_fails(capsys, root, "ImageNetA")
    assert line == f"FAIL  ImageNetA: 199 classes, but the published dataset has 200 ({image_dir})"


def test_missing_list_and_classnames_files(root_with, capsys):
    root = root_with("fgvc_aircraft", "imagenet")
    os.remove(os.path.join(root, "fgvc_aircraft", "images_variant_val.txt"))
    os.remove(os.path.join(root, "imagenet", "classnames.txt"))
    line = check_fails(capsys, root, "FGVCAircraft")
    assert line == (
        "FAIL  FGVCAircraft: missing images_variant_val.txt; it is in the data/ folder of "
        f"fgvc-aircraft-2013b.tar.gz ({root}/fgvc_aircraft/images_variant_val.txt)"
    )
    line = check_fails(capsys, root, "ImageNet")
    assert line == (
        "FAIL  ImageNet: missing classnames.txt; CoOp's DATASETS.md links it "
        f"({root}/imagenet/classnames.txt)"
    )


def test_sample_evenly():
    items = list(range(100))
    assert data_tool.sample_evenly(items, 4) == [0, 25, 50, 75]
    assert data_tool.sample_evenly(items[:3], 20) == [0, 1, 2]
    assert data_tool.sample_evenly(items, 0) == []


# ======================================================================================
# prepare
# ======================================================================================


def _zip_dir(src_root, members, dest):
    """Zip the paths ``members`` (relative to ``src_root``) into ``dest``."""
    with zipfile.ZipFile(dest, "w") as zf:
        for member in members:
            base = os.path.join(src_root, member)
            for dirpath, _dirs, files in os.walk(base):
                for name in sorted(files):
                    path = os.path.join(dirpath, name)
                    zf.write(path, os.path.relpath(path, src_root))
    return dest


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="module")
def eurosat_zip(tmp_path_factory):
    """A fake EuroSAT.zip with the real layout (``2750/<Class>/<Class>_<n>.jpg``)."""
    base = tmp_path_factory.mktemp("eurosat_src")
    make_eurosat(str(base), n_classes=3, n_per_class=4, image_size=8, with_split=False)
    src = os.path.join(str(base), "eurosat")
    return _zip_dir(src, ["2750"], str(base / "EuroSAT.zip"))


class FakeNet:
    """Replaces ``coop.data_tool.fetch``: serves local files, continuing a partial ``dest``."""

    def __init__(self, files):
        self.files = files  # url -> local path
        self.calls = []  # (url, offset)

    def __call__(self, url, dest):
        offset = os.path.getsize(dest) if os.path.exists(dest) else 0
        self.calls.append((url, offset))
        with open(self.files[url], "rb") as src, open(dest, "ab") as out:
            src.seek(offset)
            out.write(src.read())


@pytest.fixture
def eurosat_net(eurosat_zip, monkeypatch):
    """EuroSAT's table entry pointed at the fake archive (its md5), and a fake network."""
    url = "https://example.invalid/EuroSAT.zip"
    info = DATASETS["EuroSAT"]
    d = dataclasses.replace(info.downloads[0], url=url, md5=_md5(eurosat_zip))
    monkeypatch.setitem(DATASETS, "EuroSAT", dataclasses.replace(info, downloads=(d,)))
    net = FakeNet({url: eurosat_zip})
    monkeypatch.setattr(data_tool, "fetch", net)
    return net


def test_prepare_downloads_and_lays_out(tmp_path, capsys, eurosat_net, eurosat_zip):
    root = str(tmp_path / "data")
    rc, out, err = run(capsys, "prepare", "--root", root, "eurosat")
    assert rc == 0, err
    ddir = os.path.join(root, "eurosat")
    archive = os.path.join(root, "downloads", "eurosat", "EuroSAT.zip")
    # the plan comes first, with the archive, the layout and the manual split-file step
    assert out.index("Automatic steps:") < out.index("Manual steps:") < out.index("downloading")
    assert f"save as {archive}, extract, then move" in out
    assert f"2750 -> {ddir}/2750" in out
    assert f"place at: {ddir}/split_zhou_EuroSAT.json" in out
    assert "CoOp's DATASETS.md" in out
    assert "1 manual step(s) remain" in out
    assert eurosat_net.calls == [("https://example.invalid/EuroSAT.zip", 0)]
    assert os.path.isfile(os.path.join(ddir, "2750", "Forest", "Forest_4.jpg"))
    assert _md5(archive) == _md5(eurosat_zip)
    assert sorted(os.listdir(os.path.dirname(archive))) == ["EuroSAT.zip"]  # no .part/staging
    # run again: already in place, nothing fetched
    rc, out, _ = run(capsys, "prepare", "--root", root, "EuroSAT")
    assert rc == 0 and "already in place: skipped" in out
    assert len(eurosat_net.calls) == 1
    # the laid-out miniature (3 classes, no split file) is what `check` reports as missing
    rc, out, _ = run(capsys, "check", "--root", root, "eurosat")
    assert rc == 1 and out.startswith("FAIL  EuroSAT: missing split file")


def test_prepare_resumes_a_partial_download(tmp_path, capsys, eurosat_net, eurosat_zip):
    root = str(tmp_path / "data")
    dl = os.path.join(root, "downloads", "eurosat")
    os.makedirs(dl)
    with open(eurosat_zip, "rb") as f:
        head = f.read(1000)
    with open(os.path.join(dl, "EuroSAT.zip.part"), "wb") as f:
        f.write(head)
    rc, out, err = run(capsys, "prepare", "--root", root, "eurosat")
    assert rc == 0, err
    assert "resuming https://example.invalid/EuroSAT.zip at byte 1000" in out
    assert eurosat_net.calls == [("https://example.invalid/EuroSAT.zip", 1000)]
    assert _md5(os.path.join(dl, "EuroSAT.zip")) == _md5(eurosat_zip)
    assert os.path.isdir(os.path.join(root, "eurosat", "2750", "AnnualCrop"))


def test_prepare_rejects_a_checksum_mismatch(tmp_path, capsys, eurosat_net, monkeypatch):
    info = DATASETS["EuroSAT"]
    d = dataclasses.replace(info.downloads[0], md5="0" * 32)
    monkeypatch.setitem(DATASETS, "EuroSAT", dataclasses.replace(info, downloads=(d,)))
    root = str(tmp_path / "data")
    rc, out, err = run(capsys, "prepare", "--root", root, "eurosat")
    assert rc == 1
    dl = os.path.join(root, "downloads", "eurosat")
    got = _md5(os.path.join(dl, "EuroSAT.zip.corrupt"))
    assert err.strip() == (
        f"coop-data: error: checksum mismatch for EuroSAT.zip: expected md5 {'0' * 32}, got "
        f"{got}; it was not installed (kept as {dl}/EuroSAT.zip.corrupt)"
    )
    assert "1 automatic step(s) failed" in out
    assert not os.path.exists(os.path.join(dl, "EuroSAT.zip"))
    assert not os.path.exists(os.path.join(root, "eurosat", "2750"))


def test_prepare_never_overwrites_a_different_file(tmp_path, capsys, eurosat_net):
    root = str(tmp_path / "data")
    dl = os.path.join(root, "downloads", "eurosat")
    os.makedirs(dl)
    mine = os.path.join(dl, "EuroSAT.zip")
    with open(mine, "wb") as f:
        f.write(b"my own file")
    rc, _out, err = run(capsys, "prepare", "--root", root, "eurosat")
    assert rc == 1
    assert f"{mine} already exists but its md5 is {_md5(mine)}" in err
    assert "refusing to overwrite it" in err
    with open(mine, "rb") as f:
        assert f.read() == b"my own file"
    assert eurosat_net.calls == []


def test_prepare_keeps_existing_destinations(tmp_path, capsys, monkeypatch):
    """Food101-style archive (``food-101/*``): parts already present are not replaced."""
    src = tmp_path / "src"
    for rel in ("food-101/images/apple_pie/1.jpg", "food-101/meta/classes.txt"):
        os.makedirs(src / os.path.dirname(rel), exist_ok=True)
        (src / rel).write_bytes(b"from the archive")
    archive = str(tmp_path / "food-101.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(str(src / "food-101"), arcname="food-101")
    url = "https://example.invalid/food-101.tar.gz"
    info = DATASETS["Food101"]
    d = dataclasses.replace(info.downloads[0], from_torchvision=None, url=url, md5=_md5(archive))
    monkeypatch.setitem(DATASETS, "Food101", dataclasses.replace(info, downloads=(d,)))
    monkeypatch.setattr(data_tool, "fetch", FakeNet({url: archive}))
    root = tmp_path / "data"
    (root / "food-101" / "meta").mkdir(parents=True)
    (root / "food-101" / "meta" / "classes.txt").write_bytes(b"mine")
    rc, out, err = run(capsys, "prepare", "--root", str(root), "food101")
    assert rc == 0, err
    assert f"kept the existing {root}/food-101/meta (not overwritten)" in out
    assert (root / "food-101" / "meta" / "classes.txt").read_bytes() == b"mine"
    assert (root / "food-101" / "images" / "apple_pie" / "1.jpg").read_bytes() == (
        b"from the archive"
    )


def test_prepare_nested_archive_and_plain_file(tmp_path, capsys, monkeypatch):
    """Caltech101's zip holds a tar.gz; Flowers' imagelabels.mat is a plain file."""
    src = tmp_path / "src"
    (src / "101_ObjectCategories" / "ant").mkdir(parents=True)
    (src / "101_ObjectCategories" / "ant" / "image_0001.jpg").write_bytes(b"x")
    inner = tmp_path / "101_ObjectCategories.tar.gz"
    with tarfile.open(str(inner), "w:gz") as tar:
        tar.add(str(src / "101_ObjectCategories"), arcname="101_ObjectCategories")
    outer = str(tmp_path / "caltech-101.zip")
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(str(inner), "caltech-101/101_ObjectCategories.tar.gz")
        zf.writestr("caltech-101/show_annotation.m", "% unused")
    labels = tmp_path / "imagelabels.mat"
    labels.write_bytes(b"MATLAB 5.0 fake")
    urls = {"https://example.invalid/c.zip": outer, "https://example.invalid/l.mat": str(labels)}
    for name, url, path in (
        ("Caltech101", "https://example.invalid/c.zip", outer),
        ("OxfordFlowers", "https://example.invalid/l.mat", str(labels)),
    ):
        info = DATASETS[name]
        d = [x for x in info.downloads if x.filename == os.path.basename(path)][0]
        d = dataclasses.replace(d, from_torchvision=None, url=url, md5=_md5(path))
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, downloads=(d,)))
    monkeypatch.setattr(data_tool, "fetch", FakeNet(urls))
    root = tmp_path / "data"
    rc, _, err = run(capsys, "prepare", "--root", str(root), "caltech101")
    assert rc == 0, err
    assert (root / "caltech-101" / "101_ObjectCategories" / "ant" / "image_0001.jpg").exists()
    assert sorted(os.listdir(root / "caltech-101")) == ["101_ObjectCategories"]
    # a plain file: installed in the dataset folder; a different existing one is kept
    rc, out, err = run(capsys, "prepare", "--root", str(root), "oxford_flowers")
    assert rc == 0, err
    assert (root / "oxford_flowers" / "imagelabels.mat").read_bytes() == b"MATLAB 5.0 fake"
    rc, out, err = run(capsys, "prepare", "--root", str(root), "oxford_flowers")
    assert rc == 0 and "already downloaded (md5 ok)" in out
    (root / "oxford_flowers" / "imagelabels.mat").write_bytes(b"edited by me")
    rc, out, err = run(capsys, "prepare", "--root", str(root), "oxford_flowers")
    assert rc == 1 and "refusing to overwrite it" in err
    assert (root / "oxford_flowers" / "imagelabels.mat").read_bytes() == b"edited by me"


def test_prepare_imagenet_a_copies_classnames(good_root, tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(
        os.path.join(good_root, "imagenet-adversarial", "imagenet-a"), str(src / "imagenet-a")
    )
    archive = str(tmp_path / "imagenet-a.tar")
    with tarfile.open(archive, "w") as tar:
        tar.add(str(src / "imagenet-a"), arcname="imagenet-a")
    url = DATASETS["ImageNetA"].downloads[0].resolve()[0]
    monkeypatch.setattr(data_tool, "fetch", FakeNet({url: archive}))
    root = tmp_path / "data"
    (root / "imagenet").mkdir(parents=True)
    shutil.copyfile(
        os.path.join(good_root, "imagenet", "classnames.txt"),
        str(root / "imagenet" / "classnames.txt"),
    )
    rc, out, err = run(capsys, "prepare", "--root", str(root), "imagenet_a")
    assert rc == 0, err
    assert "checksum: none known (not verified)" in out
    assert "everything is in place" in out
    rc, out, _ = run(capsys, "check", "--root", str(root), "ImageNetA")
    assert rc == 0 and out.startswith("WARN  ImageNetA: 200 classes, train 200 / val none")


def test_prepare_imagenet_prints_manual_steps(tmp_path, capsys, monkeypatch):
    def no_network(url, dest):
        raise AssertionError("ImageNet must not be downloaded")

    monkeypatch.setattr(data_tool, "fetch", no_network)
    root = tmp_path / "data"
    root.mkdir()
    rc, out, _ = run(capsys, "prepare", "--root", str(root), "imagenet")
    assert rc == 0
    ddir = root / "imagenet"
    assert "Automatic steps: none" in out
    assert f"place at: {ddir}/images/train/<wnid>/*.JPEG" in out
    assert f"place at: {ddir}/images/val/<wnid>/*.JPEG" in out
    assert f"place at: {ddir}/classnames.txt" in out
    assert "image-net.org" in out and "ILSVRC2012_img_val.tar" in out
    assert "3 manual step(s) remain" in out
    assert os.listdir(root) == []  # nothing created


def test_prepare_dry_run_writes_nothing(tmp_path, capsys, eurosat_net):
    root = tmp_path / "data"
    rc, out, _ = run(capsys, "prepare", "--root", str(root), "eurosat", "--dry-run")
    assert rc == 0 and "Dry run" in out
    assert not root.exists() and eurosat_net.calls == []


# ======================================================================================
# the real fetch (HTTP Range), with a fake urlopen
# ======================================================================================


class FakeResponse(io.BytesIO):
    def __init__(self, data, status, headers):
        super().__init__(data)
        self.status = status
        self.headers = headers


def fake_server(payload, honour_range=True):
    requests = []

    def urlopen(request, timeout=None):
        rng = request.get_header("Range")
        requests.append(rng)
        if rng and honour_range:
            start = int(rng[len("bytes=") : -1])
            if start >= len(payload):
                raise urllib.error.HTTPError(request.full_url, 416, "Range", {}, None)
            body = payload[start:]
            headers = {
                "Content-Length": str(len(body)),
                "Content-Range": f"bytes {start}-{len(payload) - 1}/{len(payload)}",
            }
            return FakeResponse(body, 206, headers)
        return FakeResponse(payload, 200, {"Content-Length": str(len(payload))})

    return urlopen, requests


@pytest.mark.parametrize("honour_range", [True, False])
def test_fetch_continues_a_partial_file(tmp_path, monkeypatch, honour_range):
    payload = bytes(range(256)) * 40
    urlopen, requests = fake_server(payload, honour_range)
    monkeypatch.setattr(data_tool, "_urlopen", urlopen)
    dest = tmp_path / "x.bin.part"
    dest.write_bytes(payload[:3000])
    data_tool.fetch("https://example.invalid/x.bin", str(dest))
    assert requests == ["bytes=3000-"]
    assert dest.read_bytes() == payload  # continued, or restarted when the range is ignored
    # complete already: the server answers 416 and nothing changes
    data_tool.fetch("https://example.invalid/x.bin", str(dest))
    assert dest.read_bytes() == payload


def test_fetch_reports_a_short_download(tmp_path, monkeypatch):
    def urlopen(request, timeout=None):
        return FakeResponse(b"abc", 200, {"Content-Length": "10"})

    monkeypatch.setattr(data_tool, "_urlopen", urlopen)
    with pytest.raises(data_tool.DownloadError, match="stopped at 3 of 10 bytes"):
        data_tool.fetch("https://example.invalid/y", str(tmp_path / "y.part"))


# ======================================================================================
# the console script
# ======================================================================================


def test_no_subcommand_prints_help(capsys):
    rc, out, err = run(capsys)
    assert rc == 2 and "usage: coop-data" in err and "check" in err


def test_console_script_and_module():
    script = os.path.join(os.path.dirname(sys.executable), "coop-data")
    if not os.path.exists(script):
        pytest.skip("coop-data console script not installed")
    proc = subprocess.run([script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: coop-data" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "coop.data_tool", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 16
