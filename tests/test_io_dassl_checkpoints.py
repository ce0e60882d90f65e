"""Checkpoints written by Dassl's ``save_checkpoint`` (every CoOp checkpoint in the wild,
the released ones included) through the safe reader ``coop.io.load_checkpoint``.

Dassl's warm-up scheduler keeps the wrapped ("successor") scheduler as an attribute, so its
state dict pickles that scheduler object and, through it, the SGD instance with its
momentum buffers. The reader keeps the weights, the epoch and the optimizer's state dict,
turns the pickled objects into ``None`` and never runs or imports anything from the file.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import shutil
import sys
import warnings
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import pytest
import torch
from helpers_train import coop_argv, read_results
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from coop.config import get_cfg_default
from coop.engine import TrainerBase
from coop.io import load_checkpoint
from coop.optim import build_lr_scheduler, build_optimizer
from coop.train import main

N_CLS, N_CTX, DIM, CONTEXT_LENGTH = 10, 16, 64, 77  # the tiny CLIP on the miniature
LR, CONS_LR, MAX_EPOCH = 0.002, 1e-5, 5  # CoOp's rn50.yaml schedule, shortened


class _WarmupScheduler(LRScheduler):
    """Dassl's constant warm-up wrapper, as far as its checkpoint goes: the successor is an
    attribute, so torch's ``state_dict()`` (everything but the optimizer) holds the
    successor object."""

    def __init__(self, optimizer, successor, warmup_epoch: int, cons_lr: float) -> None:
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch: Any = None) -> None:
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


class _PromptLearner(nn.Module):
    """The keys and shapes of the original CoOp prompt learner's state dict."""

    def __init__(self, ctx: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(N_CTX, DIM) * 0.02 if ctx is None else ctx.clone())
        self.register_buffer("token_prefix", torch.randn(N_CLS, 1, DIM))
        self.register_buffer("token_suffix", torch.randn(N_CLS, CONTEXT_LENGTH - 1 - N_CTX, DIM))


def _train_epochs(model: nn.Module, optim: Any, sched: Any, epochs: int) -> List[float]:
    """``epochs`` epochs of one step each (the schedule steps once per epoch); returns the
    learning rate each epoch trained with."""
    lrs = []
    for _ in range(epochs):
        lrs.append(optim.param_groups[0]["lr"])
        optim.zero_grad()
        (model.ctx**2).sum().backward()
        optim.step()
        sched.step()
    return lrs


def _dassl_run(epochs: int, max_epoch: int = MAX_EPOCH) -> Tuple[Dict[str, Any], List[float]]:
    """Dassl's checkpoint dict after ``epochs`` epochs of SGD with momentum and warm-up +
    cosine (as ``TrainerBase.save_model`` builds it), and the learning rates of those epochs."""
    torch.manual_seed(0)
    model = _PromptLearner()
    optim = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    sched = _WarmupScheduler(optim, CosineAnnealingLR(optim, float(max_epoch)), 1, CONS_LR)
    lrs = _train_epochs(model, optim, sched, epochs)
    state = {
        "state_dict": OrderedDict(model.state_dict()),
        "epoch": epochs,
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "val_result": None,
    }
    return state, lrs


def _save_like_dassl(state: Dict[str, Any], fdir: str, model_name: str) -> str:
    """What ``dassl.utils.save_checkpoint`` writes: the pickled dict and the pointer file."""
    os.makedirs(fdir, exist_ok=True)
    path = os.path.join(fdir, model_name)
    torch.save(state, path)
    with open(os.path.join(fdir, "checkpoint"), "w") as f:
        f.write(model_name + "\n")
    return path


def _assert_loaded_like(ckpt: Dict[str, Any], state: Dict[str, Any], path: str) -> None:
    with pytest.raises(pickle.UnpicklingError):  # so the restricted reader was the one used
        torch.load(path, weights_only=True)
    assert list(ckpt["state_dict"]) == ["ctx", "token_prefix", "token_suffix"]
    for key, value in state["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    assert ckpt["epoch"] == state["epoch"] and ckpt["val_result"] is None
    optim, saved = ckpt["optimizer"], state["optimizer"]
    assert optim["param_groups"] == saved["param_groups"]
    assert list(optim["state"]) == [0]
    assert torch.equal(optim["state"][0]["momentum_buffer"], saved["state"][0]["momentum_buffer"])
    sched = ckpt["scheduler"]
    assert "successor" in sched and sched["successor"] is None
    assert {k: v for k, v in sched.items() if k != "successor"} == {
        k: v for k, v in state["scheduler"].items() if k != "successor"
    }


# --------------------------------------------------------------------------- the reader
def test_dassl_shaped_checkpoint_loads(tmp_path):
    state, _ = _dassl_run(epochs=MAX_EPOCH)
    assert isinstance(state["scheduler"]["successor"], CosineAnnealingLR)
    assert state["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0
    path = _save_like_dassl(state, str(tmp_path / "prompt_learner"), "model.pth.tar-5")
    _assert_loaded_like(load_checkpoint(path), state, path)


def test_checkpoint_written_by_the_real_dassl_loads(tmp_path, capsys):
    pytest.importorskip("dassl", reason="the real Dassl is not installed")
    from dassl.config import get_cfg_default as dassl_cfg_default
    from dassl.optim import build_lr_scheduler as dassl_build_lr_scheduler
    from dassl.optim import build_optimizer as dassl_build_optimizer
    from dassl.optim.lr_scheduler import ConstantWarmupScheduler
    from dassl.utils import save_checkpoint

    cfg = dassl_cfg_default()
    cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH = "sgd", LR, MAX_EPOCH
    cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.WARMUP_EPOCH = "cosine", 1
    cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR = "constant", CONS_LR
    torch.manual_seed(0)
    model = _PromptLearner()
    optim = dassl_build_optimizer(model, cfg.OPTIM)
    try:
        sched = dassl_build_lr_scheduler(optim, cfg.OPTIM)
    except TypeError:
        # Dassl's warm-up wrapper passes verbose= to torch's LRScheduler, which this torch
        # refuses (the plugin's compatibility fix is not this test's business): the same
        # class, its attributes set as Dassl's __init__ sets them
        class Warmup(ConstantWarmupScheduler):
            def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
                self.successor = successor
                self.warmup_epoch = warmup_epoch
                self.cons_lr = cons_lr
                LRScheduler.__init__(self, optimizer)

        successor = CosineAnnealingLR(optim, float(MAX_EPOCH))
        sched = Warmup(optim, successor, cfg.OPTIM.WARMUP_EPOCH, CONS_LR)
    assert isinstance(sched, ConstantWarmupScheduler)
    _train_epochs(model, optim, sched, MAX_EPOCH)
    state = {
        "state_dict": model.state_dict(),
        "epoch": MAX_EPOCH,
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "val_result": None,
    }
    fdir = str(tmp_path / "prompt_learner")
    save_checkpoint(state, fdir, model_name=f"model.pth.tar-{MAX_EPOCH}")
    capsys.readouterr()  # Dassl prints "Checkpoint saved to ..."
    assert open(os.path.join(fdir, "checkpoint")).read() == f"model.pth.tar-{MAX_EPOCH}\n"
    path = os.path.join(fdir, f"model.pth.tar-{MAX_EPOCH}")
    _assert_loaded_like(load_checkpoint(path), state, path)


class _RunsCommand:
    """Unpickling this would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Calls:
    """Unpickling this would import ``fn``'s module and call ``fn``."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __reduce__(self):
        return (self.fn, ())


def test_malicious_objects_in_a_dassl_checkpoint_are_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCommand(f"touch {marker}")
    state, _ = _dassl_run(epochs=2)
    state["scheduler"]["successor"] = evil
    state["extra"] = {"list": [evil, 1], evil: "keyed by the object", "set": {evil, 2}}
    path = _save_like_dassl(state, str(tmp_path / "prompt_learner"), "model.pth.tar-2")

    ckpt = load_checkpoint(path)
    assert not marker.exists()
    assert torch.equal(ckpt["state_dict"]["ctx"], state["state_dict"]["ctx"])
    assert ckpt["scheduler"]["successor"] is None
    assert ckpt["extra"] == {"list": [None, 1], "set": {2}}


def test_a_module_named_in_the_file_is_not_imported(tmp_path, monkeypatch):
    imported, called = tmp_path / "imported", tmp_path / "called"
    name = "coop_test_module_with_side_effects"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(imported)!r}).touch()\n\n\n"
        f"def run():\n    pathlib.Path({str(called)!r}).touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)  # pickling a reference to run() imports it here
    state, _ = _dassl_run(epochs=2)
    state["scheduler"]["successor"] = _Calls(module.run)
    path = _save_like_dassl(state, str(tmp_path / "prompt_learner"), "model.pth.tar-2")
    imported.unlink()
    monkeypatch.delitem(sys.modules, name)

    ckpt = load_checkpoint(path)
    assert name not in sys.modules
    assert not imported.exists() and not called.exists()
    assert ckpt["scheduler"]["successor"] is None


# --------------------------------------------------------------------------- the engine
def _our_trainer(max_epoch: int = MAX_EPOCH) -> Tuple[TrainerBase, nn.Module, Any, Any]:
    """Our engine with a prompt learner, CoOp's SGD and warm-up + cosine schedule."""
    cfg = get_cfg_default()
    cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH = "sgd", LR, max_epoch
    cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.WARMUP_EPOCH = "cosine", 1
    cfg.OPTIM.WARMUP_TYPE, cfg.OPTIM.WARMUP_CONS_LR = "constant", CONS_LR
    model = _PromptLearner()
    optim = build_optimizer(model, cfg.OPTIM)
    sched = build_lr_scheduler(optim, cfg.OPTIM)
    trainer = TrainerBase()
    trainer.register_model("prompt_learner", model, optim, sched)
    return trainer, model, optim, sched


def test_our_warmup_scheduler_refuses_a_state_without_its_successor():
    """Loading only the wrapper would leave the successor at its first epoch."""
    _, _, _, sched = _our_trainer()
    before = sched.state_dict()
    state, _ = _dassl_run(epochs=3)
    with pytest.raises(ValueError, match="successor"):
        sched.load_state_dict({**state["scheduler"], "successor": None})
    assert sched.state_dict() == before


def test_engine_resumes_a_dassl_checkpoint_with_the_same_schedule(tmp_path, caplog):
    """Momentum buffers load; the scheduler state (its successor was pickled) is replaced by
    a replay of the schedule, so the remaining epochs get the learning rates of a run that
    was never interrupted."""
    _, model, optim, sched = _our_trainer()
    uninterrupted = _train_epochs(model, optim, sched, MAX_EPOCH)
    state, dassl_lrs = _dassl_run(epochs=3)
    assert dassl_lrs == uninterrupted[:3]  # Dassl's schedule is ours
    _save_like_dassl(state, str(tmp_path / "prompt_learner"), "model.pth.tar-3")

    trainer, model, optim, sched = _our_trainer()
    with caplog.at_level(logging.INFO, logger="coop.engine"):
        assert trainer.resume_model_if_exist(str(tmp_path)) == 3
    assert "Loaded optimizer" in caplog.text and "Loaded scheduler" not in caplog.text
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "replayed for 3 epoch(s)" in warning[0].getMessage()
    assert "successor" in warning[0].getMessage()
    assert torch.equal(model.ctx.detach(), state["state_dict"]["ctx"])
    saved_buffer = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(optim.state_dict()["state"][0]["momentum_buffer"], saved_buffer)
    assert _train_epochs(model, optim, sched, MAX_EPOCH - 3) == uninterrupted[3:]


def test_engine_does_not_replay_a_scheduler_that_has_stepped(tmp_path, caplog):
    state, _ = _dassl_run(epochs=3)
    _save_like_dassl(state, str(tmp_path / "prompt_learner"), "model.pth.tar-3")
    trainer, model, optim, sched = _our_trainer()
    _train_epochs(model, optim, sched, 1)
    after_one = sched.state_dict()
    with caplog.at_level(logging.WARNING, logger="coop.engine"):
        assert trainer.resume_model_if_exist(str(tmp_path)) == 3
    assert "Scheduler state not loaded" in caplog.text and "replayed" not in caplog.text
    assert sched.state_dict() == after_one


# --------------------------------------------------------------------------- coop-train
E2E_EPOCHS = 3
E2E_OPTS = ("OPTIM.MAX_EPOCH", str(E2E_EPOCHS), "TRAIN.CHECKPOINT_FREQ", "1")


@pytest.fixture(scope="module")
def ours(caltech_root, learnable_clip, tmp_path_factory):
    """Our engine's CoOp run on the Caltech101 miniature (2 shots, a checkpoint each epoch)."""
    base = tmp_path_factory.mktemp("dassl_e2e")
    data = str(base / "data")
    shutil.copytree(caltech_root, data)
    out = str(base / "ours")
    assert main(coop_argv(data, out, learnable_clip, 1, 2, *E2E_OPTS)) == 0
    return SimpleNamespace(data=data, out=out, clip=learnable_clip)


def _rewrite_in_dassl_format(src: str, model_dir: str, ctx: torch.Tensor | None = None) -> str:
    """Our checkpoint ``src`` (with ``ctx`` instead of its context when given) as the
    original CoOp saves it through Dassl: the prompt learner's state dict with the
    class-name token buffers, the optimizer's state dict, and the warm-up scheduler's state
    dict holding its successor object, whose optimizer holds the momentum buffers."""
    ours = torch.load(src, weights_only=True)
    epoch = ours["epoch"]
    learner = _PromptLearner(ours["state_dict"]["ctx"] if ctx is None else ctx)
    optim = torch.optim.SGD(learner.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    optim.load_state_dict(ours["optimizer"])
    sched = _WarmupScheduler(optim, CosineAnnealingLR(optim, float(E2E_EPOCHS)), 1, CONS_LR)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epoch):
            sched.step()
    state = {
        "state_dict": OrderedDict(learner.state_dict()),
        "epoch": epoch,
        "optimizer": ours["optimizer"],
        "scheduler": sched.state_dict(),
        "val_result": None,
    }
    assert len(optim.state_dict()["state"]) == 1  # the pickled SGD has momentum buffers
    path = _save_like_dassl(
        state, os.path.join(model_dir, "prompt_learner"), f"model.pth.tar-{epoch}"
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    return path


def _epoch_lrs(log_path: str, epoch: int) -> List[str]:
    """The ``lr`` column of the training lines of ``epoch`` in a log."""
    with open(log_path, encoding="utf-8") as f:
        lines = [ln.split() for ln in f if ln.startswith(f"epoch [{epoch}/")]
    return [parts[parts.index("lr") + 1] for parts in lines]


def test_coop_train_evaluates_a_dassl_checkpoint_like_our_own(ours, tmp_path):
    src = os.path.join(ours.out, "prompt_learner", f"model.pth.tar-{E2E_EPOCHS}")
    model_dir = str(tmp_path / "dassl")
    _rewrite_in_dassl_format(src, model_dir)
    # a control: another context gives other results, so the equality below says something
    other_dir = str(tmp_path / "other")
    _rewrite_in_dassl_format(
        src, other_dir, torch.randn(N_CTX, DIM, generator=torch.Generator().manual_seed(0))
    )
    results = {}
    for name, directory in (("dassl", model_dir), ("ours", ours.out), ("other", other_dir)):
        out = str(tmp_path / f"eval_{name}")
        argv = coop_argv(ours.data, out, ours.clip, 1, 2)
        load = ["--eval-only", "--model-dir", directory, "--load-epoch", str(E2E_EPOCHS)]
        assert main([*load, *argv]) == 0
        results[name] = read_results(out)
    assert results["dassl"]["total"] == 60
    assert results["dassl"]["metrics"] == results["ours"]["metrics"]
    assert results["ours"]["metrics"] == read_results(ours.out)["metrics"]
    assert results["other"]["metrics"] != results["ours"]["metrics"]


def test_coop_train_resumes_a_dassl_checkpoint_with_the_same_schedule(ours, tmp_path):
    """The Dassl checkpoint holds no RNG states, so the batches differ from the
    uninterrupted run; the learning rates do not."""
    resume_dir = str(tmp_path / "dassl")
    _rewrite_in_dassl_format(
        os.path.join(ours.out, "prompt_learner", "model.pth.tar-2"), resume_dir
    )
    out = str(tmp_path / "resumed")
    argv = coop_argv(ours.data, out, ours.clip, 1, 2, *E2E_OPTS)
    assert main(["--resume", resume_dir, *argv]) == 0
    log = os.path.join(out, "log.txt")
    text = open(log, encoding="utf-8").read()
    assert "Loaded optimizer" in text and "replayed for 2 epoch(s)" in text
    assert not _epoch_lrs(log, 1) and not _epoch_lrs(log, 2)  # resumed after epoch 2
    lrs = _epoch_lrs(log, E2E_EPOCHS)
    assert lrs and lrs == _epoch_lrs(os.path.join(ours.out, "log.txt"), E2E_EPOCHS)
    assert read_results(out)["total"] == 60


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still loadable
def test_a_torchscript_archive_is_refused_before_its_code_runs(tmp_path, monkeypatch):
    """torch.load hands a TorchScript zip to torch.jit.load (which compiles and runs the
    file's code) whatever pickle module it is given: the reader refuses it first."""
    import torch

    from coop.io import CheckpointError, load_checkpoint

    path = str(tmp_path / "model.pth.tar-1")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_checkpoint(path)
    assert calls == []
