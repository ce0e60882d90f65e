"""Linear-probe CLIP (trainers/linear_probe.py): lpclip's C search, its sampling option, and
the method as a coop-train trainer (results, checkpoint, --eval-only, the feature cache)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers_train import read_results
from sklearn.linear_model import LogisticRegression

from coop.train import main
from coop.trainers import linear_probe as lp

COARSE = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]


# ---------------------------------------------------------------------- the C search
def reference_search(train, val, steps):
    """The C search of lpclip's linear_probe.py, re-derived: the first best of the coarse
    list, then ``steps`` bisections of [peak/10, 10*peak] in log10, keeping the better end
    (the left one on a tie)."""

    def fit(c):
        clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(*train)
        return clf, float((clf.predict(val[0]) == val[1]).mean())

    accs = [fit(c)[1] for c in COARSE]
    peak = COARSE[accs.index(max(accs))]
    ends = [peak / 10, peak * 10]
    history = []
    for _ in range(steps):
        (cl, al), (cr, ar) = fit(ends[0]), fit(ends[1])
        right = ar > al
        chosen = (cr, ends[1]) if right else (cl, ends[0])
        history.append((ends[0], ends[1], al, ar, chosen[1]))
        lo, hi = np.log10(ends[0]), np.log10(ends[1])
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if right else (lo, mid)
        ends = [10.0**lo, 10.0**hi]
    return chosen[0], chosen[1], accs, history


def _blobs(n_per_class, centers, spread, seed):
    rng = np.random.RandomState(seed)
    x = np.concatenate([c + spread * rng.randn(n_per_class, len(c)) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per_class)
    return x, y


CENTERS = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])


def test_separable_features_choose_a_tenth_of_the_first_peak():
    # every C separates the classes: the first (largest) C is the peak, and every step is a
    # tie, which goes left: C stays at 1e6 / 10
    train = _blobs(6, CENTERS * 20, 0.1, 0)
    val = _blobs(3, CENTERS * 20, 0.1, 1)
    seen = []
    clf, c = lp.search_c(train, val, num_step=8, on_step=lambda *a: seen.append(a))
    assert c == pytest.approx(1e5, rel=1e-12)
    assert seen[0][3] == [1.0] * 7  # the coarse search's val accuracies
    assert [s[0] for s in seen[1:]] == list(range(8))
    assert all(s[6] == pytest.approx(1e5, rel=1e-12) for s in seen[1:])  # every step: left
    assert list(clf.predict(val[0])) == list(val[1])


def test_overlapping_features_follow_the_reference_search():
    train = _blobs(12, CENTERS, 0.9, 2)
    val = _blobs(8, CENTERS, 0.9, 3)
    test_x, _ = _blobs(30, CENTERS, 0.9, 4)
    seen = []
    clf, c = lp.search_c(train, val, num_step=8, on_step=lambda *a: seen.append(a))
    ref_clf, ref_c, ref_accs, history = reference_search(train, val, 8)
    assert len(set(ref_accs)) > 2  # a search with a real peak, not a plateau
    assert seen[0][3] == ref_accs
    for got, want in zip(seen[1:], history):
        assert got[1:5] == pytest.approx(want[:4], rel=1e-12)
        assert got[6] == pytest.approx(want[4], rel=1e-12)
    assert c == pytest.approx(ref_c, rel=1e-12)
    assert np.array_equal(clf.predict(test_x), ref_clf.predict(test_x))


def test_the_search_needs_a_step():
    with pytest.raises(ValueError, match="at least one bisection step"):
        lp.search_c(_blobs(3, CENTERS, 1, 0), _blobs(2, CENTERS, 1, 1), num_step=0)


# ---------------------------------------------------------------------- the classifier
@pytest.mark.parametrize("n_cls", [2, 4])
def test_the_stored_classifier_predicts_what_scikit_learn_predicts(n_cls):
    centers = np.eye(5)[:n_cls] * 1.5
    x, y = _blobs(10, centers, 1.0, 5)
    clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=1.0).fit(x, y + 1)  # labels 1..
    model = lp.LinearClassifier(5, [f"class {i}" for i in range(n_cls + 2)])
    assert not model.fitted
    model.set_from(clf, 1.0)
    assert model.fitted and float(model.c) == 1.0
    probe, _ = _blobs(50, centers, 1.5, 6)
    logits = model(torch.from_numpy(probe).float())
    assert logits.dtype == torch.float64
    assert logits.argmax(1).tolist() == clf.predict(probe).tolist()
    # classes never seen in training (0 and the last) are never predicted
    assert torch.isinf(model.bias[[0, n_cls + 1]]).all()


# ---------------------------------------------------------------------- lpclip's sampling
def _numpy_lpclip(train_labels, val_labels, k, seed):
    np.random.seed(seed)
    train_idx, val_idx = [], []
    for label in np.unique(train_labels):
        train_idx.extend(np.random.choice(np.where(train_labels == label)[0], k, replace=False))
    val_k = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}[k]
    for label in np.unique(train_labels):
        val_idx.extend(np.random.choice(np.where(val_labels == label)[0], val_k, replace=False))
    return [int(i) for i in train_idx], [int(i) for i in val_idx]


@pytest.mark.parametrize("k,seed", [(1, 1), (4, 2), (8, 3), (16, 1)])
def test_lpclip_sampling_is_numpys_draw(k, seed):
    rng = np.random.RandomState(0)
    train_labels = rng.permutation(np.repeat(np.arange(5), 20))
    val_labels = rng.permutation(np.repeat(np.arange(5), 6))
    state = np.random.get_state()
    got = lp.lpclip_sample(train_labels, val_labels, k, seed)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the global state is kept
    assert got == _numpy_lpclip(train_labels, val_labels, k, seed)
    assert len(got[0]) == 5 * k and len(set(got[0])) == 5 * k


def test_lpclip_sampling_names_a_class_that_is_too_small():
    labels = np.array([0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="class 0 has 2 there"):
        lp.lpclip_sample(labels, labels, 3, 1)


# ---------------------------------------------------------------------- as a trainer
def lp_argv(root, out, ckpt, *extra, seed=1, shots=4, flags=()):
    return [
        *flags,
        "--root", root,
        "--seed", str(seed),
        "--trainer", "LinearProbeCLIP",
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", "configs/trainers/LinearProbeCLIP/rn50.yaml",
        "--output-dir", out,
        "DATASET.NUM_SHOTS", str(shots),
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "TRAINER.LINEARPROBECLIP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        *extra,
    ]  # fmt: skip


def _features_by_hand(ckpt, impaths):
    """CLIP's raw image features under the test transform, computed without the package's
    data or feature code."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from coop.clip_adapter import load_clip

    model = load_clip(ckpt).float()
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    imgs = []
    for p in impaths:
        img = TF.resize(Image.open(p).convert("RGB"), 32, TF.InterpolationMode.BICUBIC)
        imgs.append(TF.normalize(TF.to_tensor(TF.center_crop(img, [32, 32])), mean, std))
    with torch.no_grad():
        return model.visual(torch.stack(imgs)).double().numpy()


def _split(root, name):
    ddir = os.path.join(root, "caltech-101")
    if name == "test":  # paths relative to the image folder
        with open(os.path.join(ddir, "split_zhou_Caltech101.json"), encoding="utf-8") as f:
            items = json.load(f)["test"]
        paths = [os.path.join(ddir, "101_ObjectCategories", it[0]) for it in items]
    else:  # the few-shot subset the run drew (paths relative to the dataset folder)
        path = os.path.join(ddir, "split_fewshot", "shot_4-seed_1.json")
        with open(path, encoding="utf-8") as f:
            items = json.load(f)[name]
        paths = [os.path.join(ddir, it[0]) for it in items]
    return paths, np.array([it[1] for it in items])


def _log(out):
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        return f.read()


def test_a_run_fits_saves_and_evaluates_like_a_refit_by_hand(data_root, tiny_vit, tmp_path):
    out = str(tmp_path / "run")
    assert main(lp_argv(data_root, out, tiny_vit)) == 0
    res = read_results(out)
    log = _log(out)

    # the same search by hand on features computed by hand
    xy = {}
    for split in ("train", "val", "test"):
        paths, labels = _split(data_root, split)
        xy[split] = (_features_by_hand(tiny_vit, paths), labels)
    ref_clf, ref_c, _, _ = reference_search(xy["train"], xy["val"], 8)
    ref_acc = 100 * float((ref_clf.predict(xy["test"][0]) == xy["test"][1]).mean())
    assert res["metrics"]["accuracy"] == pytest.approx(ref_acc)
    assert res["total"] == 60 and res["trainer"] == "LinearProbeCLIP"
    chosen = float(log.split("Chosen C: ")[1].split()[0])
    assert chosen == pytest.approx(ref_c, rel=1e-9)
    assert log.count("Caltech101, 4 Shot, Round ") == 8
    assert log.count("Val accuracy (Left): ") == 8 and log.count("Test Accuracy: ") == 8
    assert f"Caltech101, seed 1, 4 shot, weight {chosen}, test_acc" in log
    assert "40 training and 40 validation images (dassl sampling), 60 test images" in log
    assert "epoch [" not in log  # no SGD batches

    # the checkpoint: tensors only, with the chosen C
    ckpt = torch.load(
        os.path.join(out, "classifier", "model.pth.tar-1"), map_location="cpu", weights_only=True
    )
    sd = ckpt["state_dict"]
    assert sorted(sd) == ["bias", "c", "classnames", "weight"]
    with open(os.path.join(data_root, "caltech-101", "split_zhou_Caltech101.json")) as f:
        by_label = {it[1]: it[2] for it in json.load(f)["test"]}
    assert lp.decode_names(sd["classnames"]) == [by_label[i] for i in range(10)]
    assert sd["weight"].shape == (10, 64) and float(sd["c"]) == pytest.approx(chosen)
    assert np.allclose(sd["weight"].numpy(), ref_clf.coef_, rtol=1e-4, atol=1e-6)

    # --eval-only reloads it and gives the same accuracy
    ev = str(tmp_path / "eval")
    flags = ["--eval-only", "--model-dir", out, "--load-epoch", "1"]
    assert main(lp_argv(data_root, ev, tiny_vit, flags=flags)) == 0
    assert read_results(ev)["metrics"] == res["metrics"]


def test_features_are_read_from_the_cache_by_later_runs(data_root, tiny_vit, tmp_path, monkeypatch):
    cache = ["FAST.CACHE_DIR", str(tmp_path / "cache")]
    # 16 shots take every training and validation image of the miniature
    assert main(lp_argv(data_root, str(tmp_path / "a"), tiny_vit, *cache, shots=16)) == 0
    calls = []
    real = lp.LinearProbeCLIP.image_features
    monkeypatch.setattr(
        lp.LinearProbeCLIP, "image_features", lambda s, x: calls.append(1) or real(s, x)
    )
    # other seeds and shot counts use subsets of those images: nothing is encoded again
    for seed, shots in ((2, 1), (3, 4)):
        out = str(tmp_path / f"s{seed}")
        assert main(lp_argv(data_root, out, tiny_vit, *cache, seed=seed, shots=shots)) == 0
        assert "computed 0, read" in _log(out)
    assert calls == []
    # the plain path (no cache) encodes, and gives the same result
    plain = str(tmp_path / "plain")
    argv = lp_argv(data_root, plain, tiny_vit, "FAST.ENABLED", "False", seed=3, shots=4)
    assert main(argv) == 0
    assert calls
    assert read_results(plain)["metrics"] == read_results(str(tmp_path / "s3"))["metrics"]
    c = [_log(o).split("Chosen C: ")[1].split()[0] for o in (plain, str(tmp_path / "s3"))]
    assert c[0] == c[1]


def test_lpclip_sampling_draws_from_the_full_splits(data_root, tiny_vit, tmp_path):
    out = str(tmp_path / "o")
    opts = ["TRAINER.LINEARPROBECLIP.SAMPLING", "lpclip"]
    assert main(lp_argv(data_root, out, tiny_vit, *opts, shots=8)) == 0
    # 8 training and 4 validation images of each of the 10 classes
    assert "80 training and 40 validation images (lpclip sampling)" in _log(out)


def test_a_finished_run_started_again_only_repeats_the_test(data_root, tiny_vit, tmp_path):
    out = str(tmp_path / "o")
    assert main(lp_argv(data_root, out, tiny_vit, "OPTIM.MAX_EPOCH", "2")) == 0
    first = read_results(out)["metrics"]
    assert os.path.isfile(os.path.join(out, "classifier", "model.pth.tar-2"))
    assert main(lp_argv(data_root, out, tiny_vit, "OPTIM.MAX_EPOCH", "2")) == 0
    assert read_results(out)["metrics"] == first
    assert _log(out).count("Chosen C: ") == 1  # one fit across both starts


@pytest.mark.parametrize(
    "opts,message",
    [
        (["TRAINER.LINEARPROBECLIP.SAMPLING", "numpy"], "SAMPLING must be one of"),
        (["TRAINER.LINEARPROBECLIP.NUM_STEP", "0"], "NUM_STEP and MAX_ITER must be at least 1"),
    ],
)
def test_bad_options_are_one_clear_error(data_root, tiny_vit, tmp_path, capsys, opts, message):
    assert main(lp_argv(data_root, str(tmp_path / "o"), tiny_vit, *opts)) == 2
    assert message in capsys.readouterr().err


def test_lpclip_sampling_needs_a_seed(data_root, tiny_vit, tmp_path, capsys):
    argv = lp_argv(data_root, str(tmp_path / "o"), tiny_vit, "TRAINER.LINEARPROBECLIP.SAMPLING")
    argv += ["lpclip"]
    argv[argv.index("--seed") + 1] = "-1"
    assert main(argv) == 2
    assert "np.random.seed(SEED): pass --seed" in capsys.readouterr().err


def test_evaluating_without_a_classifier_or_with_another_one_is_refused(
    data_root, tiny_vit, tmp_path, capsys
):
    assert main(lp_argv(data_root, str(tmp_path / "e"), tiny_vit, flags=["--eval-only"])) == 2
    assert "LinearProbeCLIP has no fitted classifier" in capsys.readouterr().err
    # a CoOp checkpoint in --model-dir is not a classifier
    bad = tmp_path / "coop" / "classifier"
    bad.mkdir(parents=True)
    torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}, "epoch": 1}, bad / "model.pth.tar-1")
    flags = ["--eval-only", "--model-dir", str(tmp_path / "coop"), "--load-epoch", "1"]
    argv = lp_argv(data_root, str(tmp_path / "e2"), tiny_vit, flags=flags)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a linear-probe checkpoint" in err and "['ctx']" in err
    # a classifier for another class count
    torch.save(
        {"state_dict": {"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, "epoch": 1},
        bad / "model.pth.tar-1",
    )
    assert main(argv) == 2
    assert "shape (3, 64), for 10 classes here" in capsys.readouterr().err


def test_an_imagenet_classifier_evaluates_the_variants_with_a_subset_of_its_classes(
    data_root, tiny_vit, tmp_path, capsys
):
    """ImageNet-A/-R hold some of ImageNet's classes: the ImageNet classifier's rows for
    them are picked by name, so its logits there are its ImageNet logits for those
    classes (the same test images give the same predictions among them)."""
    from coop.testing import fixtures_imagenet

    root = fixtures_imagenet.make_imagenet(str(tmp_path / "data"))  # 5 classes
    fixtures_imagenet.make_imagenet_variants(root, a_classes=(1, 2, 4), r_classes=(0, 2, 3, 4))
    src = str(tmp_path / "imagenet")
    argv = lp_argv(root, src, tiny_vit, shots=2)
    argv[argv.index("configs/datasets/caltech101.yaml")] = "configs/datasets/imagenet.yaml"
    assert main(argv) == 0
    saved = torch.load(os.path.join(src, "classifier", "model.pth.tar-1"), weights_only=True)
    weight, bias = saved["state_dict"]["weight"], saved["state_dict"]["bias"]
    assert weight.shape[0] == 5
    names = lp.decode_names(saved["state_dict"]["classnames"])
    for stem, labels in (("imagenet_a", (1, 2, 4)), ("imagenet_r", (0, 2, 3, 4))):
        out = str(tmp_path / stem)
        flags = ["--eval-only", "--model-dir", src, "--load-epoch", "1"]
        argv = lp_argv(root, out, tiny_vit, flags=flags)
        argv[argv.index("configs/datasets/caltech101.yaml")] = f"configs/datasets/{stem}.yaml"
        assert main(argv) == 0
        res = read_results(out)
        assert res["total"] == 3 * len(labels)
        assert f"Using {len(labels)} of the 5 classes" in open(os.path.join(out, "log.txt")).read()
        # the expected accuracy from the saved rows by hand: raw features of the test images
        ds = _variant_items(root, stem)
        rows = [names.index(n) for n in ds["classnames"]]
        feats = torch.from_numpy(_features_by_hand(tiny_vit, ds["impaths"]))
        logits = feats.double() @ weight[rows].t() + bias[rows]
        acc = 100.0 * (logits.argmax(1) == torch.tensor(ds["labels"])).double().mean().item()
        assert res["metrics"]["accuracy"] == pytest.approx(acc)
    # a classifier that lacks one of the classes is refused, naming the shapes
    argv = lp_argv(data_root, str(tmp_path / "cal"), tiny_vit, flags=flags)  # Caltech101
    assert main(argv) == 2
    assert "not all of them among its classes" in capsys.readouterr().err


def _variant_items(root, stem):
    """The test items of an ImageNet variant as the dataset builds them."""
    from coop.config import get_cfg_default, merge_from_file
    from coop.registry import build_dataset

    cfg = get_cfg_default()
    merge_from_file(cfg, f"configs/datasets/{stem}.yaml")
    cfg.DATASET.ROOT = root
    ds = build_dataset(cfg)
    return {
        "classnames": ds.classnames,
        "impaths": [d.impath for d in ds.test],
        "labels": [d.label for d in ds.test],
    }
