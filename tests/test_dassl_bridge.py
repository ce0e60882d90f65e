"""The bridge into a real Dassl: registration and config extension.

Dassl is not on PyPI, so the test installs a stand-in ``dassl`` package (just its registry
and config modules, with Dassl's import paths and registry behaviour) on ``sys.path``."""

from __future__ import annotations

import sys
import textwrap

import pytest
from yacs.config import CfgNode as CN

FAKE = {
    "dassl/__init__.py": "",
    "dassl/utils.py": """
        class Registry:
            def __init__(self, name):
                self._name, self._obj_map = name, {}
            def register(self, obj=None):
                if obj is None:
                    def deco(o):
                        self.register(o)
                        return o
                    return deco
                if obj.__name__ in self._obj_map:
                    raise KeyError(obj.__name__)
                self._obj_map[obj.__name__] = obj
                return obj
            def get(self, name):
                if name not in self._obj_map:
                    raise KeyError(name)
                return self._obj_map[name]
    """,
    "dassl/engine/__init__.py": "from dassl.utils import Registry\nTRAINER_REGISTRY = Registry('TRAINER')\n",
    "dassl/data/__init__.py": "",
    "dassl/data/datasets/__init__.py": "from dassl.utils import Registry\nDATASET_REGISTRY = Registry('DATASET')\n",
}


@pytest.fixture
def fake_dassl(tmp_path, monkeypatch):
    for rel, src in FAKE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "dassl" or m.startswith("dassl.")]:
        monkeypatch.delitem(sys.modules, mod)
    yield
    for mod in [m for m in sys.modules if m == "dassl" or m.startswith("dassl.")]:
        del sys.modules[mod]


def test_register_into_dassl(fake_dassl):
    from dassl.data.datasets import DATASET_REGISTRY
    from dassl.engine import TRAINER_REGISTRY

    from coop.dassl_bridge import register_into_dassl
    from coop.trainers.coop import CoOp

    class ImageNet:  # Dassl ships its own ImageNet: it is kept
        pass

    DATASET_REGISTRY.register(ImageNet)
    added = register_into_dassl()
    assert TRAINER_REGISTRY.get("CoOp") is CoOp
    assert TRAINER_REGISTRY.get("ZeroshotCLIP").__name__ == "ZeroshotCLIP"
    assert DATASET_REGISTRY.get("Caltech101").__module__ == "coop.datasets.caltech101"
    assert DATASET_REGISTRY.get("ImageNet") is ImageNet
    assert "ImageNet" not in added and "CoOp" in added and "EuroSAT" in added
    assert register_into_dassl() == []  # idempotent


def test_extend_dassl_cfg_adds_our_keys_and_keeps_dassl_values():
    from coop.dassl_bridge import extend_dassl_cfg

    dassl_cfg = CN()
    dassl_cfg.OPTIM = CN()
    dassl_cfg.OPTIM.LR = 0.123
    dassl_cfg.TRAINER = CN()
    dassl_cfg.TRAINER.NAME = "CoOp"
    extend_dassl_cfg(dassl_cfg)
    assert dassl_cfg.OPTIM.LR == 0.123
    assert dassl_cfg.TRAINER.NAME == "CoOp"
    assert dassl_cfg.TRAINER.COOP.N_CTX == 16
    assert dassl_cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    assert dassl_cfg.FAST.ENABLED is True
    assert dassl_cfg.OPTIM.WARMUP_CONS_LR == 1e-5


def test_missing_dassl_is_a_clear_error(monkeypatch):
    from coop.dassl_bridge import DasslNotInstalledError, register_into_dassl

    monkeypatch.setitem(sys.modules, "dassl", None)
    with pytest.raises(DasslNotInstalledError, match="Dassl is not installed"):
        register_into_dassl()
