"""Shared fixtures: a Caltech101-layout miniature and tiny CLIP checkpoints, built once."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dirs(tmp_path_factory):
    """Keep the image-feature cache out of the user's home folder during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COOP_CACHE_DIR", str(tmp_path_factory.mktemp("coop_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _restore_coop_logger():
    """A test that registers the Dassl plugin attaches a handler to the package's logger
    (as it does in a user's process): take it off again after the test."""
    import logging

    log = logging.getLogger("coop")
    state = (list(log.handlers), log.level, log.propagate)
    yield
    for h in [h for h in log.handlers if h not in state[0]]:
        log.removeHandler(h)
    log.level, log.propagate = state[1], state[2]


@pytest.fixture(scope="session")
def caltech_root(tmp_path_factory):
    """A pristine Caltech101 miniature (10 classes x 20 images, with the split JSON)."""
    from coop.testing.fixtures import make_caltech101

    return make_caltech101(str(tmp_path_factory.mktemp("caltech")), n_classes=10, n_per_class=20)


@pytest.fixture
def data_root(caltech_root, tmp_path):
    """A private copy of the miniature (tests write few-shot caches into it)."""
    dst = tmp_path / "data"
    shutil.copytree(caltech_root, dst)
    return str(dst)


@pytest.fixture(scope="session")
def learnable_clip(caltech_root, tmp_path_factory):
    """A tiny ViT CLIP partly aligned to the miniature: CoOp can beat zero-shot on it."""
    from coop.testing.pretrain import save_learnable_tiny_clip

    ddir = os.path.join(caltech_root, "caltech-101")
    return save_learnable_tiny_clip(
        str(tmp_path_factory.mktemp("clip") / "learnable_vit.pt"),
        os.path.join(ddir, "split_zhou_Caltech101.json"),
        os.path.join(ddir, "101_ObjectCategories"),
    )


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    from coop.testing.tiny_clip import save_tiny_clip

    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny_vit.pt"), arch="vit")


@pytest.fixture(scope="session")
def tiny_vit_jit(tmp_path_factory):
    from coop.testing.tiny_clip import save_tiny_clip

    return save_tiny_clip(
        str(tmp_path_factory.mktemp("clip") / "tiny_vit_jit.pt"), arch="vit", fmt="torchscript"
    )


@pytest.fixture(scope="session")
def tiny_rn(tmp_path_factory):
    from coop.testing.tiny_clip import save_tiny_clip

    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny_rn.pt"), arch="resnet")


@pytest.fixture(scope="session")
def tiny_vit3(tmp_path_factory):
    """A tiny ViT CLIP with 3 blocks per tower (deep prompts at layers 0..2)."""
    from coop.testing.tiny_clip import save_tiny_clip

    path = str(tmp_path_factory.mktemp("clip") / "tiny_vit3.pt")
    return save_tiny_clip(path, "vit", vision_layers=3, text_layers=3)
