"""One suite over the trainer registry: a method is tested by being registered.

Every registered trainer runs from its own shipped YAML (the few-shot protocol's, else its
folder's first) on the tiny learnable CLIP and the Caltech101 miniature, in fp32 on the CPU:
it trains, saves, resumes exactly after an interruption, evaluates its checkpoint with
``--eval-only`` to the same numbers, and gives the same losses and accuracy on a real Dassl as
on the bundled engine. A method with nothing to learn (``trains = False``) only evaluates."""

from __future__ import annotations

import glob
import os
from typing import Dict, List

import pytest
import torch
from helpers_train import loss_lines, read_results

from coop.config import get_cfg_default, iter_yaml_files
from coop.registry import TRAINER_REGISTRY, register_builtins
from coop.train import main

register_builtins()
NAMES = sorted(name for name, _ in TRAINER_REGISTRY.items())
EPOCHS = 2


def _yaml(cls) -> str:
    folder = f"{os.sep}trainers{os.sep}{cls.config_folder()}{os.sep}"
    shipped = {os.path.basename(p)[:-5]: p for p in iter_yaml_files() if folder in p}
    assert shipped, f"{cls.__name__} ships no YAML in configs/trainers/{cls.config_folder()}"
    stem = cls.protocol_configs.get("fewshot", sorted(shipped)[0])
    assert stem in shipped, f"{cls.__name__}.protocol_configs names a missing YAML {stem}"
    return shipped[stem]


def _argv(name: str, root: str, out: str, ckpt: str, *extra: str) -> List[str]:
    cls = TRAINER_REGISTRY.get(name)
    opts = [
        "DATASET.NUM_SHOTS", "4",
        "MODEL.BACKBONE.NAME", ckpt,
        "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.TRAIN_X.BATCH_SIZE", "8",  # 10 classes x 4 shots: 5 steps an epoch
        "OPTIM.MAX_EPOCH", str(EPOCHS),
        "TRAIN.CHECKPOINT_FREQ", "1",
        "TRAIN.PRINT_FREQ", "1",  # every step's loss is compared
    ]  # fmt: skip
    node = cls.config_node_name()
    if node and "PREC" in get_cfg_default().TRAINER.get(node, {}):
        opts += [f"TRAINER.{node}.PREC", "fp32"]  # fp16 kernels are missing or slow on CPUs
    return [
        "--root", root,
        "--seed", "1",
        "--trainer", name,
        "--dataset-config-file", "configs/datasets/caltech101.yaml",
        "--config-file", _yaml(cls),
        "--output-dir", out,
        *extra,
        *opts,
    ]  # fmt: skip


def _logged_steps(cls) -> int:
    """The loss lines a run logs: one per SGD step, none where the method replaces the
    host's epoch loop (the linear probe's closed-form fit) or trains nothing."""
    if not cls.trains or "run_epoch" in {k for c in cls.__mro__ for k in vars(c)}:
        return 0
    return EPOCHS * 5


def _final_weights(out: str) -> Dict[str, Dict[str, torch.Tensor]]:
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "*", f"model.pth.tar-{EPOCHS}"))):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        found[os.path.basename(os.path.dirname(path))] = ckpt["state_dict"]
    return found


def _accuracy(log: str) -> float:
    lines = [ln for ln in open(log, encoding="utf-8") if ln.startswith("* accuracy:")]
    assert lines, f"no accuracy line in {log}"
    return float(lines[-1].split(":")[1].strip().rstrip("%"))


@pytest.mark.parametrize("name", NAMES)
def test_every_trainer_trains_saves_resumes_and_evaluates(
    name, data_root, learnable_clip, tmp_path, monkeypatch
):
    from coop.hosts import on_host

    cls = TRAINER_REGISTRY.get(name)
    full = str(tmp_path / "full")
    if not cls.trains:
        assert main(_argv(name, data_root, full, learnable_clip, "--eval-only")) == 0
        assert 0.0 <= read_results(full)["metrics"]["accuracy"] <= 100.0
        assert not _final_weights(full)
        return

    # trains and saves every registered model at every epoch
    assert main(_argv(name, data_root, full, learnable_clip)) == 0
    result = read_results(full)
    assert result["trainer"] == name and result["num_shots"] == 4
    weights = _final_weights(full)
    assert weights, f"{name} saved no model.pth.tar-{EPOCHS} under {full}"
    assert os.path.isfile(os.path.join(full, "finished"))

    # interrupted after epoch 1, then the same command: the same end state
    part = str(tmp_path / "part")
    host_cls = on_host(cls)
    original = host_cls.after_epoch

    class Interrupted(Exception):
        pass

    def after_epoch_then_stop(self):
        original(self)
        if self.epoch == 0:
            raise Interrupted

    monkeypatch.setattr(host_cls, "after_epoch", after_epoch_then_stop)
    with pytest.raises(Interrupted):
        main(_argv(name, data_root, part, learnable_clip))
    monkeypatch.setattr(host_cls, "after_epoch", original)
    assert not os.path.exists(os.path.join(part, "finished"))
    assert main(_argv(name, data_root, part, learnable_clip)) == 0
    resumed = [f for f in os.listdir(part) if f.startswith("log.txt-")]
    assert resumed, "the resumed run logs to a time-stamped file"
    full_lines = loss_lines(os.path.join(full, "log.txt"))
    assert len(full_lines) == _logged_steps(cls)
    resumed_lines = loss_lines(os.path.join(part, resumed[0]))
    assert resumed_lines == full_lines[len(full_lines) // EPOCHS :]  # none: no SGD steps
    resumed_weights = _final_weights(part)
    assert resumed_weights.keys() == weights.keys()
    for model_name, state in weights.items():
        assert state.keys() == resumed_weights[model_name].keys()
        for key, value in state.items():
            assert torch.equal(value, resumed_weights[model_name][key]), (model_name, key)
    assert read_results(part)["metrics"] == result["metrics"]

    # the saved model evaluates to the end-of-training numbers
    ev = str(tmp_path / "eval")
    load = ("--eval-only", "--model-dir", full, "--load-epoch", str(EPOCHS))
    assert main(_argv(name, data_root, ev, learnable_clip, *load)) == 0
    assert read_results(ev)["metrics"] == result["metrics"]
    log = open(os.path.join(ev, "log.txt"), encoding="utf-8").read()
    assert f"model.pth.tar-{EPOCHS}" in log
    last = full_lines[-1] if full_lines else "(no SGD steps)"
    print(f"{name}: {last}; accuracy {result['metrics']['accuracy']}%")


@pytest.mark.parametrize("fast", ["True", "False"])
@pytest.mark.parametrize("name", NAMES)
def test_every_trainer_gives_the_same_numbers_on_a_real_dassl(
    name, fast, data_root, learnable_clip, tmp_path
):
    """fp32, 0 workers, the same seed: every logged loss and learning rate and the final
    accuracy are equal on the bundled engine and on Dassl's."""
    pytest.importorskip("dassl.engine", reason="Dassl is not installed (.ci/run installs it)")
    cls = TRAINER_REGISTRY.get(name)
    logs = {}
    for engine in ("bundled", "dassl"):
        out = str(tmp_path / engine)
        extra = () if cls.trains else ("--eval-only",)
        argv = _argv(name, data_root, out, learnable_clip, *extra)
        assert main(["--engine", engine, *argv, "FAST.ENABLED", fast]) == 0
        logs[engine] = os.path.join(out, "log.txt")
    ours, theirs = (loss_lines(logs[e]) for e in ("bundled", "dassl"))
    assert ours == theirs
    assert len(ours) == _logged_steps(cls)
    assert _accuracy(logs["bundled"]) == _accuracy(logs["dassl"])
    last = ours[-1] if ours else "(no batches)"
    print(f"{name} FAST {fast}: {last}; accuracy {_accuracy(logs['dassl'])}% on both engines")
