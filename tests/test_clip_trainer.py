"""The trainer base: a method that changes only its loss, on both hosts; the config-node
contract; the checkpoint check made before the model is built."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers_train import coop_argv

from coop.config import ConfigError
from coop.registry import TRAINER_REGISTRY
from coop.train import build_parser, setup_cfg
from coop.trainers.coop import CoOp


class LabelSmoothedCoOp(CoOp):
    """CoOp with label smoothing: the whole method is its loss."""

    def compute_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, label, label_smoothing=0.5)


@pytest.fixture
def smoothed():
    TRAINER_REGISTRY.register(LabelSmoothedCoOp)
    yield LabelSmoothedCoOp
    del TRAINER_REGISTRY._obj_map["LabelSmoothedCoOp"]
    dassl = sys.modules.get("dassl.engine")
    if dassl is not None:  # registered there too by the Dassl case
        dassl.TRAINER_REGISTRY._obj_map.pop("LabelSmoothedCoOp", None)


def _cfg(root, ckpt, out):
    argv = coop_argv(root, out, ckpt, 1, 4)
    argv[argv.index("--trainer") + 1] = "LabelSmoothedCoOp"
    return setup_cfg(build_parser().parse_args(argv))


@pytest.mark.parametrize("host", ["bundled", "dassl"])
def test_a_method_that_changes_only_the_loss(smoothed, data_root, tiny_vit, tmp_path, host):
    from coop.hosts import on_host

    cfg = _cfg(data_root, tiny_vit, str(tmp_path / "o"))
    if host == "dassl":
        pytest.importorskip("dassl.engine", reason="Dassl is not installed")
        from dassl.engine import TrainerX

        from coop.dassl_bridge import dassl_host, register_into_dassl

        register_into_dassl()
        cls = on_host(smoothed, dassl_host())
        assert issubclass(cls, TrainerX)
    else:
        cls = on_host(smoothed)
    trainer = cls(cfg)
    assert trainer.config_node_name() == "COOP"  # the node of the class it extends
    batch = next(iter(trainer.train_loader_x))
    image, label = trainer.parse_batch_train(batch)
    with torch.no_grad():
        output = trainer.model(image)
    trainer.batch_idx, trainer.num_batches = 0, 1
    ctx = trainer.model.prompt_learner.ctx.detach().clone()
    summary = trainer.forward_backward(batch)
    assert summary["loss"] == pytest.approx(
        F.cross_entropy(output, label, label_smoothing=0.5).item(), rel=1e-6
    )
    assert summary["loss"] != pytest.approx(F.cross_entropy(output, label).item(), rel=1e-3)
    assert not torch.equal(ctx, trainer.model.prompt_learner.ctx.detach())  # it stepped


def test_cfg_node_comes_from_add_config_and_is_checked():
    from coop.config import get_cfg_default

    cfg = get_cfg_default()
    assert cfg.TRAINER.COOP.N_CTX == 16  # CoOp.add_config, not the core's defaults
    assert CoOp.config_node_name() == "COOP"
    from coop.trainers.zsclip import ZeroshotCLIP

    assert ZeroshotCLIP.config_node_name() is None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TRAINER.COOP.PREC", "fp8", "TRAINER.COOP.PREC must be one of"),
        ("TRAINER.COOP.CLASS_TOKEN_POSITION", "left", "CLASS_TOKEN_POSITION must be one of"),
        ("TRAINER.COOP.N_CTX", "0", "TRAINER.COOP.N_CTX must be at least 1"),
    ],
)
def test_method_checks_its_own_config(data_root, tiny_vit, tmp_path, key, value, message):
    from coop.config import get_cfg_default, merge_from_list

    argv = coop_argv(data_root, str(tmp_path / "o"), tiny_vit, 1, 4, key, value)
    with pytest.raises(ConfigError, match=message):  # coop-train, before anything is written
        setup_cfg(build_parser().parse_args(argv))
    assert not (tmp_path / "o").exists()
    cfg = get_cfg_default()
    merge_from_list(cfg, [key, value])
    with pytest.raises(ConfigError, match=message):  # Dassl's constructor hook, on any host
        CoOp.check_cfg(cfg)


def test_a_method_class_built_directly_runs_on_the_bundled_engine(data_root, tiny_vit, tmp_path):
    """Dassl's ``build_trainer`` idiom, ``TRAINER_REGISTRY.get(name)(cfg)``, on ours."""
    from coop.engine import TrainerX
    from coop.hosts import on_host

    argv = coop_argv(data_root, str(tmp_path / "o"), tiny_vit, 1, 4)
    trainer = TRAINER_REGISTRY.get("CoOp")(setup_cfg(build_parser().parse_args(argv)))
    assert type(trainer) is on_host(CoOp) and isinstance(trainer, TrainerX)
    assert isinstance(trainer, CoOp) and trainer.model.prompt_learner.ctx.shape == (16, 64)
