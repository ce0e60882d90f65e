"""The training feature cache shares seeded per-image views across runs through the disk."""

from __future__ import annotations

import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Set, Tuple

import pytest
import torch
from helpers_train import coop_argv, read_results

from coop.config import get_cfg_default
from coop.fast.feature_cache import (
    SeededViews,
    TrainViewCache,
    decode_views,
    encode_views,
    read_views,
    view_seed,
)
from coop.train import main

LINE = re.compile(
    r"Training feature cache \(opt-in deviation\): (\d+) augmented views of (\d+) images; "
    r"computed (\d+) new views, reused (\d+) from (\S+)"
)


def _run(
    root: str,
    ckpt: str,
    out: str,
    cache: str,
    seed: int = 1,
    shots: int = 2,
    views: int = 2,
    workers: int = 0,
    *extra: str,
) -> Tuple[int, int, str]:
    """One CoOp run with the training feature cache; returns (computed, reused, entry)."""
    argv = coop_argv(
        root, out, ckpt, seed, shots, "OPTIM.MAX_EPOCH", "2", "FAST.CACHE_DIR", cache,
        "FAST.TRAIN_FEATURE_CACHE", "True", "FAST.TRAIN_CACHE_VIEWS", str(views), *extra,
    )  # fmt: skip
    argv[argv.index("DATALOADER.NUM_WORKERS") + 1] = str(workers)
    assert main(argv) == 0
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        (match,) = [m for m in map(LINE.search, f) if m]
    assert int(match.group(1)) == views
    assert match.group(5).startswith(os.path.join(cache, "train_views"))
    return int(match.group(3)), int(match.group(4)), match.group(5)


def _stored(entry: str) -> Dict[str, torch.Tensor]:
    """The per-image files of an entry, by file name."""
    return {
        name: read_views(os.path.join(entry, name))
        for name in os.listdir(entry)
        if name.endswith(".views") and not name.startswith(".")
    }


def _subset_files(root: str, shots: int, seed: int) -> Set[str]:
    """The cache file names of the images of a few-shot subset."""
    ddir = os.path.join(root, "caltech-101")
    path = os.path.join(ddir, "split_fewshot", f"shot_{shots}-seed_{seed}.json")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)["train"]
    names = TrainViewCache("", "", {})
    return {os.path.basename(names.image_file(os.path.join(ddir, rec[0]))) for rec in records}


def _ckpt(out: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(out, "prompt_learner", "model.pth.tar-2")
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_rn"])
def test_warm_rerun_is_bit_identical_and_computes_nothing(data_root, backbone, tmp_path, request):
    ckpt = request.getfixturevalue(backbone)
    cache = str(tmp_path / "cache")
    cold, warm = str(tmp_path / "cold"), str(tmp_path / "warm")
    computed, reused, entry = _run(data_root, ckpt, cold, cache)
    n_images = len(_subset_files(data_root, 2, 1))
    assert (computed, reused) == (2 * n_images, 0)
    assert len(_stored(entry)) == n_images
    assert _run(data_root, ckpt, warm, cache) == (0, 2 * n_images, entry)
    assert read_results(warm)["metrics"] == read_results(cold)["metrics"]
    a, b = _ckpt(cold), _ckpt(warm)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_share_the_views_of_common_images(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    _run(data_root, tiny_vit, str(tmp_path / "a"), cache, 1, 2)
    first = _subset_files(data_root, 2, 1)
    computed, reused, entry = _run(data_root, tiny_vit, str(tmp_path / "b"), cache, 2, 4)
    second = _subset_files(data_root, 4, 2)
    common = first & second
    assert common and second - first  # the subsets overlap, and not entirely
    assert computed == 2 * len(second - first)
    assert reused == 2 * len(common)
    assert set(_stored(entry)) == first | second


def test_stored_views_do_not_depend_on_the_run_that_computed_them(data_root, tiny_vit, tmp_path):
    """Cache A is filled by one run; cache B by two runs of other seeds and shot counts, so
    the images are computed in other batches, positions and batch fillings."""
    # several batches, the last one small (its rows would round differently unpadded)
    small = ("DATALOADER.TRAIN_X.BATCH_SIZE", "17")

    def run(name: str, cache: str, seed: int, shots: int) -> Tuple[int, int, str]:
        return _run(data_root, tiny_vit, str(tmp_path / name), cache, seed, shots, 2, 0, *small)

    computed_a, _, entry_a = run("a", str(tmp_path / "ca"), 1, 2)
    run("b1", str(tmp_path / "cb"), 2, 1)
    computed_b, reused_b, entry_b = run("b2", str(tmp_path / "cb"), 1, 2)
    assert computed_a % 17 and computed_b % 17 and reused_b  # partial batches, shared views
    assert os.path.basename(entry_a) == os.path.basename(entry_b)  # the same key
    a, b = _stored(entry_a), _stored(entry_b)
    assert set(a) <= set(b)
    for name in a:
        assert a[name].shape == (2, 64)
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name][0], a[name][1])  # two different augmentations


def test_damaged_files_are_recomputed_with_a_warning(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    first = str(tmp_path / "a")
    *_, entry = _run(data_root, tiny_vit, first, cache)
    before = _stored(entry)
    garbage, wrong_shape = sorted(before)[:2]
    with open(os.path.join(entry, garbage), "wb") as f:
        f.write(b"not a tensor file")
    with open(os.path.join(entry, wrong_shape), "wb") as f:
        f.write(encode_views(torch.zeros(2, 3)))
    second = str(tmp_path / "b")
    computed, reused, _ = _run(data_root, tiny_vit, second, cache)
    with open(os.path.join(second, "log.txt"), encoding="utf-8") as f:
        warnings = [line for line in f if line.startswith("Recomputing the training views")]
    assert len(warnings) == 2
    assert any(garbage in w and "not a training-view file" in w for w in warnings)
    assert any(wrong_shape in w and "shape (2, 3), expected (views, 64)" in w for w in warnings)
    assert (computed, reused) == (4, 2 * (len(before) - 2))
    after = _stored(entry)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert read_results(second)["metrics"] == read_results(first)["metrics"]


def test_more_views_adds_only_the_missing_ones(data_root, tiny_vit, tmp_path):
    cache = str(tmp_path / "cache")
    computed, _, entry = _run(data_root, tiny_vit, str(tmp_path / "v1"), cache, views=1)
    one = _stored(entry)
    assert computed == len(one) and all(t.shape == (1, 64) for t in one.values())
    computed, reused, _ = _run(data_root, tiny_vit, str(tmp_path / "v2"), cache, views=2)
    assert (computed, reused) == (len(one), len(one))
    two = _stored(entry)
    assert two.keys() == one.keys()
    assert all(two[k].shape == (2, 64) and torch.equal(two[k][:1], one[k]) for k in two)
    # the same as two views computed at once in an empty cache
    *_, fresh = _run(data_root, tiny_vit, str(tmp_path / "f"), str(tmp_path / "c2"), views=2)
    cold = _stored(fresh)
    assert all(torch.equal(cold[k], two[k]) for k in two)


def test_loader_workers_store_the_same_views(data_root, tiny_vit, tmp_path):
    res = {}
    for workers in (0, 1):
        out = str(tmp_path / f"w{workers}")
        *_, entry = _run(data_root, tiny_vit, out, str(tmp_path / f"c{workers}"), workers=workers)
        res[workers] = (_stored(entry), read_results(out)["metrics"])
    (a, metrics_a), (b, metrics_b) = res[0], res[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_a == metrics_b


class _Recorder:
    """A stand-in DatasetWrapper whose "image" is a few draws from both random streams."""

    def __init__(self, paths: List[str]) -> None:
        self.data_source = [type("D", (), {"impath": p})() for p in paths]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return {"img": torch.cat([torch.rand(3), torch.tensor([random.random()])])}


def test_view_seeding_is_per_image_and_leaves_the_run_streams_alone(tmp_path):
    paths = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    views = SeededViews(_Recorder(paths), [(0, 0), (0, 1), (1, 0), (0, 0)])
    torch.manual_seed(5)
    random.seed(5)
    state, py_state = torch.get_rng_state(), random.getstate()
    items = [views[j]["img"] for j in range(len(views))]
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
    assert torch.equal(items[0], items[3])  # the same (image, view) gives the same draws
    assert not torch.equal(items[0], items[1]) and not torch.equal(items[0], items[2])
    torch.manual_seed(6)
    assert torch.equal(views[1]["img"], items[1])  # whatever the run's stream
    assert view_seed(paths[0], 1) == view_seed(os.path.relpath(paths[0]), 1)


def test_views_already_on_disk_win_over_another_writers(tmp_path):
    cache = TrainViewCache(str(tmp_path), "key", {"kind": "test"})
    path = os.path.join(cache.folder, "img.views")
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    assert torch.equal(cache.store({path: a})[path], a)
    merged = torch.cat([a, b[2:]])
    assert torch.equal(cache.store({path: b})[path], merged)
    assert torch.equal(cache.store({path: b[:1]})[path], merged)  # fewer views: kept
    assert torch.equal(read_views(path), merged)
    assert cache.read_meta() == (4, "torch.float32")
    assert cache.load(path, (5, "torch.float32"), warn=False) is None
    assert cache.load(path, (4, "torch.float16"), warn=False) is None


def test_entry_key_covers_the_training_transform(monkeypatch):
    from coop.clip_trainer import CLIPTrainer
    from coop.fast import trainer_caches

    cfg = get_cfg_default()
    assert {"SIZE", "INTERPOLATION", "TRANSFORMS", "RRCROP_SCALE"} <= set(cfg.INPUT)
    trainer = CLIPTrainer.__new__(CLIPTrainer)
    trainer.cfg = cfg
    trainer.device = torch.device("cpu")
    trainer.model = torch.nn.Module()  # a plain image encoder
    trainer.tfm_train = None
    monkeypatch.setattr(trainer_caches, "weights_hash", lambda trainer, root: "w")
    trainer.clip_dtype = lambda: torch.float32
    key, parts = trainer_caches.train_views_key(trainer, "")
    assert parts["input"]["RRCROP_SCALE"] == cfg.INPUT.RRCROP_SCALE
    cfg.INPUT.RRCROP_SCALE = (0.5, 1.0)
    assert trainer_caches.train_views_key(trainer, "")[0] != key
    cfg.INPUT.RRCROP_SCALE = get_cfg_default().INPUT.RRCROP_SCALE
    assert trainer_caches.train_views_key(trainer, "")[0] == key
    cfg.DATALOADER.TEST.BATCH_SIZE += 1
    assert trainer_caches.train_views_key(trainer, "")[0] == key  # views use the training batch
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE += 1
    assert trainer_caches.train_views_key(trainer, "")[0] != key


def test_zero_views_is_rejected_before_training(data_root, tiny_vit, tmp_path):
    argv = coop_argv(
        data_root, str(tmp_path / "o"), tiny_vit, 1, 1, "FAST.TRAIN_FEATURE_CACHE", "True",
        "FAST.TRAIN_CACHE_VIEWS", "0", "FAST.CACHE_DIR", str(tmp_path / "c"),
    )  # fmt: skip
    assert main(argv) != 0
    assert not os.path.isdir(str(tmp_path / "c" / "train_views"))


def test_concurrent_writers_of_one_image_agree(tmp_path):
    cache = TrainViewCache(str(tmp_path), "key", {"kind": "test"})
    path = os.path.join(cache.folder, "img.views")
    mine = [torch.randn(3, 4) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: cache.store({path: t})[path], mine))
    on_disk = read_views(path)
    assert any(torch.equal(on_disk, t) for t in mine)  # one writer's views, whole
    assert all(torch.equal(g, on_disk) for g in got)  # and every writer uses those


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16, torch.float64])
def test_view_files_round_trip_every_feature_dtype(dtype):
    feats = torch.randn(3, 5).to(dtype)
    back = decode_views(encode_views(feats))
    assert back.dtype == dtype and back.shape == (3, 5)
    assert torch.equal(back, feats)
    assert torch.equal(decode_views(encode_views(feats[:, 1:3])), feats[:, 1:3])  # a view


def test_damaged_view_files_are_recognised():
    data = encode_views(torch.randn(2, 4))
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    bad_code = bytearray(data)
    bad_code[16] = 9  # the dtype code
    cases = {
        b"": "no COOPVW02 header",
        data[:20]: "no COOPVW02 header",
        b"X" + data[1:]: "no COOPVW02 header",
        data[:-4]: "28 bytes of features, expected 32 (a truncated file)",
        bytes(flipped): "checksum does not match",
        bytes(bad_code): "unknown dtype code 9",
    }
    for blob, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            decode_views(blob)
    with pytest.raises(ValueError, match="float tensor"):
        encode_views(torch.zeros(2, 3, dtype=torch.int64))


def test_view_files_are_written_without_fsync_and_a_torn_one_is_recomputed(tmp_path, monkeypatch):
    import coop.io

    calls = []
    monkeypatch.setattr(coop.io.os, "fsync", lambda fd: calls.append(fd))
    cache = TrainViewCache(str(tmp_path), "key", {"kind": "test"})
    path = os.path.join(cache.folder, "img.views")
    feats = torch.randn(2, 4)
    cache.store({path: feats})
    assert len(calls) == 2  # meta.json's file and folder, not the view file's
    cache.store({os.path.join(cache.folder, "other.views"): feats})
    assert len(calls) == 2  # meta.json unchanged: nothing synced at all
    with open(path, "r+b") as f:  # what a power loss may leave: the right size, zeros
        f.seek(-8, os.SEEK_END)
        f.write(bytes(8))
    assert cache.load(path, (4, "torch.float32"), warn=False) is None
    assert torch.equal(cache.store({path: feats})[path], feats)  # rewritten
    assert torch.equal(read_views(path), feats)
