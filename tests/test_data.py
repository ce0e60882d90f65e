"""Dassl's data API: Datum, DatasetBase sampling/subsampling, transforms, wrapper, loaders."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from coop.config import get_cfg_default
from coop.data import (
    DatasetBase,
    DatasetWrapper,
    Datum,
    EmptyLoaderError,
    MissingImageError,
    UnreadableImageError,
    build_data_loader,
    build_transform,
    read_image,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _touch(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb"):
        pass
    return path


def _items(tmp_path, labels, prefix="img"):
    """Datum objects over empty files, one per label (file name = position)."""
    return [
        Datum(_touch(str(tmp_path / f"{prefix}_{i:03d}.jpg")), label=lab, classname=f"c{lab}")
        for i, lab in enumerate(labels)
    ]


def _coop_cfg():
    cfg = get_cfg_default()
    cfg.INPUT.SIZE = (224, 224)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.PIXEL_MEAN = CLIP_MEAN
    cfg.INPUT.PIXEL_STD = CLIP_STD
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _rgb_image(path, height=40, width=52, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG")
    return str(path)


# ------------------------------------------------------------------------------- Datum


def test_datum_properties_and_repr(tmp_path):
    p = _touch(str(tmp_path / "a.jpg"))
    d = Datum(p, label=3, domain=1, classname="cat")
    assert (d.impath, d.label, d.domain, d.classname) == (p, 3, 1, "cat")
    assert d._impath == p and d._label == 3 and d._classname == "cat"
    assert "cat" in repr(d) and p in repr(d)
    assert Datum(p).label == 0 and Datum(p).domain == 0 and Datum(p).classname == ""


def test_datum_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="Image file not found: .*nope.jpg"):
        Datum(missing)
    with pytest.raises(MissingImageError):
        Datum(missing)


# ----------------------------------------------------------------------- DatasetBase


def test_datasetbase_properties(tmp_path):
    train = _items(tmp_path, [2, 0, 2, 5])
    ds = DatasetBase(train_x=train, val=train[:1], test=train)
    assert ds.num_classes == 6  # max label + 1
    assert ds.lab2cname == {0: "c0", 2: "c2", 5: "c5"}
    assert list(ds.lab2cname) == [0, 2, 5]
    assert ds.classnames == ["c0", "c2", "c5"]
    assert ds.train_x is train and ds.train_u is None and len(ds.val) == 1


def _ref_fewshot(items, k):
    """Independent re-derivation: group by first appearance, random.sample when len >= k."""
    groups = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    out = []
    for _lab, g in groups.items():
        out.extend(random.sample(g, k) if len(g) >= k else list(g))
    return [(it.impath, it.label) for it in out]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_generate_fewshot_matches_reference(tmp_path, seed, k):
    # labels in a non-sorted first-appearance order; label 7 has 3 items (< 4, 8),
    # label 1 has exactly 4 items (== k for k=4), label 3 has 10
    train_labels = [3, 1, 3, 7, 1, 3, 3, 7, 1, 3, 3, 1, 3, 7, 3, 3, 3]
    val_labels = [1, 3, 7, 3, 1, 3, 1, 3, 1, 7, 3]
    train = _items(tmp_path, train_labels, "tr")
    val = _items(tmp_path, val_labels, "va")
    ds = DatasetBase(train_x=train)

    random.seed(seed)
    exp_train = _ref_fewshot(train, k)
    exp_val = _ref_fewshot(val, min(k, 4))
    exp_state = random.getstate()

    random.seed(seed)
    got_train = ds.generate_fewshot_dataset(train, num_shots=k)
    got_val = ds.generate_fewshot_dataset(val, num_shots=min(k, 4))
    assert [(it.impath, it.label) for it in got_train] == exp_train
    assert [(it.impath, it.label) for it in got_val] == exp_val
    assert random.getstate() == exp_state


def test_generate_fewshot_small_class_kept_in_order_and_exact_k_shuffled(tmp_path):
    labels = [0] * 3 + [1] * 4
    items = _items(tmp_path, labels)
    ds = DatasetBase(train_x=items)
    # class 0 (3 < 4): kept in order and no random numbers are drawn for it
    random.seed(0)
    state = random.getstate()
    out = ds.generate_fewshot_dataset(items[:3], num_shots=4)
    assert out == items[:3]
    assert random.getstate() == state
    # class 1 (len == K): random.sample is still called, so the order is shuffled
    shuffled_somewhere = False
    for seed in range(10):
        random.seed(seed)
        out = ds.generate_fewshot_dataset(items[3:], num_shots=4)
        assert sorted(it.impath for it in out) == sorted(it.impath for it in items[3:])
        random.seed(seed)
        assert [it.impath for it in out] == [it.impath for it in random.sample(items[3:], 4)]
        shuffled_somewhere |= out != items[3:]
    assert shuffled_somewhere


def test_generate_fewshot_multiple_sources_repeat_and_noop(tmp_path, caplog):
    items = _items(tmp_path, [0, 0, 1])
    ds = DatasetBase(train_x=items)
    assert ds.generate_fewshot_dataset(items, num_shots=-1) is items
    assert ds.generate_fewshot_dataset(items, items, num_shots=0) == (items, items)
    caplog.set_level(logging.INFO, logger="coop.data")
    random.seed(0)
    a, b = ds.generate_fewshot_dataset(items, items, num_shots=1)
    assert len(a) == 2 and len(b) == 2
    assert "Creating a 1-shot dataset" in caplog.text
    random.seed(0)
    rep = ds.generate_fewshot_dataset(items, num_shots=3, repeat=True)
    assert len(rep) == 6 and {it.label for it in rep[3:]} == {1}


def test_subsample_classes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="coop.data")
    train = _items(tmp_path, [4, 0, 2, 6, 8, 2, 0], "tr")  # labels {0,2,4,6,8}: n=5, m=3
    test = _items(tmp_path, [8, 6, 4, 2, 0, 4], "te")
    base_tr, base_te = DatasetBase.subsample_classes(train, test, subsample="base")
    assert [it.label for it in base_tr] == [2, 0, 1, 1, 0]  # 4->2, 0->0, 2->1 kept in order
    assert [it.classname for it in base_tr] == ["c4", "c0", "c2", "c2", "c0"]
    assert [it.label for it in base_te] == [2, 1, 0, 2]
    assert "SUBSAMPLE BASE CLASSES!" in caplog.text
    new_tr, new_te, none = DatasetBase.subsample_classes(train, test, None, subsample="new")
    assert [it.label for it in new_tr] == [0, 1]  # 6->0, 8->1
    assert [it.label for it in new_te] == [1, 0] and none is None
    assert "SUBSAMPLE NEW CLASSES!" in caplog.text
    assert isinstance(new_tr[0], Datum) and new_tr[0] is not train[3]
    allx = DatasetBase.subsample_classes(train, test, subsample="all")
    assert allx[0] is train and allx[1] is test
    with pytest.raises(ValueError, match="all, base, new"):
        DatasetBase.subsample_classes(train, subsample="Base")


def test_subsample_counts_odd(tmp_path):
    train = _items(tmp_path, list(range(37)))
    (b,) = DatasetBase.subsample_classes(train, subsample="base")
    (n,) = DatasetBase.subsample_classes(train, subsample="new")
    assert (len(b), len(n)) == (19, 18)
    assert [it.classname for it in n][:2] == ["c19", "c20"]


# ----------------------------------------------------------------------- transforms


def test_build_transform_logs_and_structure(caplog):
    caplog.set_level(logging.INFO, logger="coop.data")
    cfg = _coop_cfg()
    tr = build_transform(cfg, is_train=True)
    te = build_transform(cfg, is_train=False)
    assert [type(t).__name__ for t in tr.transforms] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    assert [type(t).__name__ for t in te.transforms] == [
        "Resize",
        "CenterCrop",
        "ToTensor",
        "Normalize",
    ]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "Building transform_train",
        "+ random resized crop (size=(224, 224), scale=(0.08, 1.0))",
        "+ random flip",
        "+ to torch tensor of range [0, 1]",
        f"+ normalization (mean={CLIP_MEAN}, std={CLIP_STD})",
        "Building transform_test",
        "+ resize the smaller edge to 224",
        "+ 224x224 center crop",
        "+ to torch tensor of range [0, 1]",
        f"+ normalization (mean={CLIP_MEAN}, std={CLIP_STD})",
    ]


def test_transform_options_and_errors():
    cfg = _coop_cfg()
    cfg.INPUT.TRANSFORMS = ("random_flip",)
    tr = build_transform(cfg, is_train=True)
    assert [type(t).__name__ for t in tr.transforms] == [
        "Resize",
        "RandomHorizontalFlip",
        "ToTensor",
    ]
    te = build_transform(cfg, is_train=False)
    assert [type(t).__name__ for t in te.transforms] == ["Resize", "CenterCrop", "ToTensor"]
    cfg.INPUT.NO_TRANSFORM = True
    assert build_transform(cfg, is_train=True) is None
    cfg.INPUT.NO_TRANSFORM = False
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "gaussian_noize")
    with pytest.raises(ValueError, match="gaussian_noize.*random_resized_crop"):
        build_transform(cfg)
    cfg.INPUT.TRANSFORMS = ()
    cfg.INPUT.INTERPOLATION = "lanczos"
    with pytest.raises(ValueError, match="lanczos.*bilinear, bicubic, nearest"):
        build_transform(cfg)


def test_train_transform_draws_equal_torchvision(tmp_path):
    cfg = _coop_cfg()
    img = read_image(_rgb_image(tmp_path / "x.png"))
    ours = build_transform(cfg, is_train=True)
    ref = T.Compose(
        [
            T.RandomResizedCrop(
                (224, 224), scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    torch.manual_seed(5)
    a = [ours(img) for _ in range(6)]
    state_a = torch.get_rng_state()
    torch.manual_seed(5)
    b = [ref(img) for _ in range(6)]
    assert torch.equal(state_a, torch.get_rng_state())
    for x, y in zip(a, b):
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert torch.equal(x, y)
    assert not torch.equal(a[0], a[1])


def test_test_transform_is_deterministic_and_draws_nothing(tmp_path):
    cfg = _coop_cfg()
    img = read_image(_rgb_image(tmp_path / "x.png", height=40, width=52))
    te = build_transform(cfg, is_train=False)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    x1, x2 = te(img), te(img)
    assert torch.equal(torch.get_rng_state(), state)
    assert x1.shape == (3, 224, 224) and torch.equal(x1, x2)
    # shorter edge to 224 (52 -> int(224*52/40) = 291), then a centre crop
    resized = T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(img)
    assert resized.size == (291, 224)
    ref = T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(T.CenterCrop(224)(resized)))
    assert torch.equal(x1, ref)


# --------------------------------------------------------------------- reading, wrapper


def test_read_image_rgb_and_error(tmp_path):
    arr = np.full((5, 7), 100, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "g.png")
    img = read_image(str(tmp_path / "g.png"))
    assert img.mode == "RGB" and img.size == (7, 5)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(UnreadableImageError, match=r"Cannot read image .*bad\.jpg: "):
        read_image(str(bad))
    with pytest.raises(OSError):
        read_image(str(bad))


def test_dataset_wrapper_items(tmp_path):
    cfg = _coop_cfg()
    cfg.INPUT.SIZE = (32, 32)
    paths = [_rgb_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    data = [Datum(p, label=i, domain=0, classname=f"c{i}") for i, p in enumerate(paths)]
    w = DatasetWrapper(cfg, data, transform=build_transform(cfg, is_train=False))
    item = w[1]
    assert set(item) == {"img", "label", "domain", "impath", "index"}
    assert item["label"] == 1 and item["impath"] == paths[1] and item["index"] == 1
    assert item["img"].shape == (3, 32, 32)

    cfg.DATALOADER.RETURN_IMG0 = True
    cfg.DATALOADER.K_TRANSFORMS = 2
    w = DatasetWrapper(cfg, data, transform=build_transform(cfg, is_train=True), is_train=True)
    item = w[0]
    assert isinstance(item["img"], list) and len(item["img"]) == 2
    assert item["img0"].shape == (3, 32, 32)
    # K_TRANSFORMS applies to training only
    w = DatasetWrapper(cfg, data, transform=build_transform(cfg, is_train=False), is_train=False)
    assert torch.is_tensor(w[0]["img"])
    with pytest.raises(ValueError, match="K_TRANSFORMS"):
        DatasetWrapper(cfg, data, transform=None, is_train=True)


# ---------------------------------------------------------------------------- loaders


def _loader_data(tmp_path, n):
    return [Datum(_rgb_image(tmp_path / f"{i}.png", 8, 8, seed=i), label=i % 3) for i in range(n)]


def test_build_data_loader_drop_last_rule(tmp_path):
    cfg = _coop_cfg()
    cfg.INPUT.SIZE = (8, 8)
    cfg.INPUT.TRANSFORMS = ()
    data = _loader_data(tmp_path, 10)
    tfm = build_transform(cfg, is_train=False)
    dl = build_data_loader(cfg, "RandomSampler", data, batch_size=4, tfm=tfm, is_train=True)
    assert len(dl) == 2 and dl.drop_last  # N >= bs: floor(10/4)
    dl = build_data_loader(cfg, "RandomSampler", data[:3], batch_size=4, tfm=tfm, is_train=True)
    assert len(dl) == 1 and not dl.drop_last  # N < bs: one batch with everything
    assert next(iter(dl))["img"].shape == (3, 3, 8, 8)
    dl = build_data_loader(cfg, "SequentialSampler", data, batch_size=4, tfm=tfm, is_train=False)
    assert len(dl) == 3 and not dl.drop_last
    assert [int(i) for b in dl for i in b["index"]] == list(range(10))
    with pytest.raises(ValueError, match="Unknown sampler 'RandomDomainSampler'"):
        build_data_loader(cfg, "RandomDomainSampler", data, batch_size=4, tfm=tfm)
    with pytest.raises(EmptyLoaderError, match="empty"):
        build_data_loader(cfg, "SequentialSampler", [], batch_size=4, tfm=tfm)


def test_random_sampler_draw_order(tmp_path):
    """One int64 at iter() (worker base seed), one at the first batch (sampler seed)."""
    cfg = _coop_cfg()
    cfg.INPUT.SIZE = (8, 8)
    cfg.INPUT.TRANSFORMS = ()
    data = _loader_data(tmp_path, 10)
    tfm = build_transform(cfg, is_train=False)  # draws nothing
    dl = build_data_loader(cfg, "RandomSampler", data, batch_size=4, tfm=tfm, is_train=True)
    torch.manual_seed(7)
    idx = [int(i) for b in dl for i in b["index"]]
    state_after = torch.get_rng_state()

    torch.manual_seed(7)
    torch.empty((), dtype=torch.int64).random_()  # base seed
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(10, generator=g).tolist()
    assert idx == perm[:8]
    assert torch.equal(state_after, torch.get_rng_state())
