"""A CoOp run and a zero-shot run through coop-train on the miniature of every dataset."""

from __future__ import annotations

import os

import pytest
from helpers_train import read_results

from coop.testing import fixtures, fixtures_imagenet, fixtures_more
from coop.train import main

# config stem -> (registry name, builder); the builders write the real on-disk layouts
MAIN = {
    "caltech101": ("Caltech101", lambda r: fixtures.make_caltech101(r, n_classes=4, n_per_class=10)),
    "oxford_pets": ("OxfordPets", fixtures_more.make_oxford_pets),
    "stanford_cars": ("StanfordCars", fixtures_more.make_stanford_cars),
    "oxford_flowers": ("OxfordFlowers", fixtures_more.make_oxford_flowers),
    "food101": ("Food101", fixtures_more.make_food101),
    "dtd": ("DescribableTextures", fixtures_more.make_dtd),
    "eurosat": ("EuroSAT", lambda r: fixtures_more.make_eurosat(r, n_classes=4)),
    "fgvc_aircraft": ("FGVCAircraft", fixtures_imagenet.make_fgvc_aircraft),
    "sun397": ("SUN397", fixtures_imagenet.make_sun397),
    "ucf101": ("UCF101", fixtures_imagenet.make_ucf101),
    "imagenet": ("ImageNet", fixtures_imagenet.make_imagenet),
}  # fmt: skip
VARIANTS = {
    "imagenetv2": "ImageNetV2",
    "imagenet_sketch": "ImageNetSketch",
    "imagenet_a": "ImageNetA",
    "imagenet_r": "ImageNetR",
}


def _argv(root, out, ckpt, stem, trainer, *extra):
    return [
        "--root", root,
        "--seed", "1",
        "--trainer", trainer,
        "--dataset-config-file", f"configs/datasets/{stem}.yaml",
        "--config-file", "configs/trainers/CoOp/rn50.yaml",
        "--output-dir", out,
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "TRAINER.COOP.PREC", "fp32",
        "DATALOADER.NUM_WORKERS", "0",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("stem", list(MAIN))
def test_coop_and_zeroshot_on_every_main_dataset(stem, tiny_vit, tmp_path):
    name, build = MAIN[stem]
    root = build(str(tmp_path / "data"))
    co = str(tmp_path / "coop")
    opts = ("DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "1")
    assert main(_argv(root, co, tiny_vit, stem, "CoOp", *opts)) == 0
    res = read_results(co)
    assert res["dataset"] == name and res["total"] > 0
    assert os.path.exists(os.path.join(co, "prompt_learner", "model.pth.tar-1"))
    zs = str(tmp_path / "zs")
    assert main(["--eval-only", *_argv(root, zs, tiny_vit, stem, "ZeroshotCLIP")]) == 0
    assert read_results(zs)["total"] == res["total"]


@pytest.fixture(scope="module")
def imagenet_world(tiny_vit, tmp_path_factory):
    """ImageNet and its four variants side by side, and a CoOp model trained on ImageNet."""
    base = tmp_path_factory.mktemp("inet")
    root = fixtures_imagenet.make_imagenet(str(base / "data"))
    fixtures_imagenet.make_imagenet_variants(root)
    model_dir = str(base / "imagenet_coop")
    opts = ("DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "1")
    assert main(_argv(root, model_dir, tiny_vit, "imagenet", "CoOp", *opts)) == 0
    return root, model_dir


@pytest.mark.parametrize("stem", list(VARIANTS))
def test_imagenet_model_and_zeroshot_on_every_variant(stem, imagenet_world, tiny_vit, tmp_path):
    root, model_dir = imagenet_world
    co = str(tmp_path / "coop")
    argv = _argv(root, co, tiny_vit, stem, "CoOp")
    assert main(["--eval-only", "--model-dir", model_dir, "--load-epoch", "1", *argv]) == 0
    res = read_results(co)
    assert res["dataset"] == VARIANTS[stem] and res["total"] > 0
    zs = str(tmp_path / "zs")
    assert main(["--eval-only", *_argv(root, zs, tiny_vit, stem, "ZeroshotCLIP")]) == 0
    assert read_results(zs)["total"] == res["total"]
