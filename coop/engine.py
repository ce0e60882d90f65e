"""The training engine: Dassl's ``TrainerBase`` / ``SimpleTrainer`` / ``TrainerX``, written fresh.

Same public API and semantics as Dassl (epochs, iterations per epoch, one scheduler step per
epoch after the last batch, evaluator, checkpoints with Dassl's file names, resume from
``OUTPUT_DIR``), so trainer classes written against it also run on a real Dassl. Differences
that users asked for: checkpoints are written atomically and hold only tensors and plain
values (they load with ``weights_only=True``), resume restores the RNG states and the LR
schedule, log lines go through :mod:`logging`, and every run writes ``results.json``.

Exact resume. Besides Dassl's checkpoints (``model.pth.tar-N`` at CHECKPOINT_FREQ and the
last epoch, ``model-best.pth.tar``, the ``checkpoint`` pointer), every epoch ends by
atomically overwriting ``<OUTPUT_DIR>/<model name>/resume.pth.tar`` (same content as a
checkpoint: weights, optimizer, scheduler, RNG states, best result, GradScaler).
``resume_model_if_exist`` continues from the newer of the pointer's target and
``resume.pth.tar`` (by stored epoch), so a run killed at any point and started again with the
same command ends exactly as an uninterrupted run (bit for bit on the CPU with the same
worker count). ``resume.pth.tar`` is deleted once the run has finished (after the
``finished`` marker is written); rerunning a finished OUTPUT_DIR resumes from the last
official checkpoint and only repeats the final test, as in Dassl.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import os.path as osp
import random
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from coop.io import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
)
from coop.optim import resume_scheduler
from coop.registry import build_evaluator
from coop.utils import AverageMeter, MetricMeter, format_eta

logger = logging.getLogger(__name__)

FINISHED_MARKER = "finished"
RESUME_FILE = "resume.pth.tar"
_MAX_LISTED_SKIPS = 3


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; nothing is saved after it."""


class TrainerBase:
    """Base class for iterative trainers: a registry of models with optimizers/schedulers."""

    def __init__(self) -> None:
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._optims: OrderedDict[str, Optional[torch.optim.Optimizer]] = OrderedDict()
        self._scheds: OrderedDict[str, Any] = OrderedDict()
        self._writer = None

    def register_model(
        self, name: str = "model", model: Optional[nn.Module] = None, optim=None, sched=None
    ) -> None:
        if self.__dict__.get("_models") is None:
            raise AttributeError("Cannot assign model before super().__init__() call")
        if self.__dict__.get("_optims") is None:
            raise AttributeError("Cannot assign optim before super().__init__() call")
        if self.__dict__.get("_scheds") is None:
            raise AttributeError("Cannot assign sched before super().__init__() call")
        if name in self._models:
            raise KeyError(f"Found duplicate model names: {name}")
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched

    def get_model_names(self, names: Any = None) -> List[str]:
        names_real = list(self._models.keys())
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            for name in names:
                if name not in names_real:
                    raise KeyError(f"Unknown model name '{name}'; registered: {names_real}")
            return names
        return names_real

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> Dict[str, Any]:
        py_state = random.getstate()
        np_state = np.random.get_state()
        state = {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [
                np_state[0],
                torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                int(np_state[2]),
                int(np_state[3]),
                float(np_state[4]),
            ],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    @staticmethod
    def _set_rng_state(state: Dict[str, Any]) -> None:
        if not state:
            return
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = state["numpy"]
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def model_state_dict(self, name: str) -> OrderedDict[str, torch.Tensor]:
        """The state dict stored in a checkpoint (``module.`` prefixes removed)."""
        sd = self._models[name].state_dict()
        return OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())

    def checkpoint_dict(
        self, name: str, epoch: int, val_result: Optional[float] = None
    ) -> Dict[str, Any]:
        """What a checkpoint of model ``name`` after 0-based ``epoch`` holds (tensors and
        plain values only: it loads with ``weights_only=True``)."""
        optim = self._optims[name]
        sched = self._scheds[name]
        checkpoint = {
            "state_dict": self.model_state_dict(name),
            "epoch": epoch + 1,
            "optimizer": optim.state_dict() if optim is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "val_result": val_result,
            "rng_state": self._rng_state(),
            "best_result": float(getattr(self, "best_result", -np.inf)),
        }
        scaler = self.__dict__.get("scaler")
        if scaler is not None and hasattr(scaler, "state_dict"):
            checkpoint["scaler"] = scaler.state_dict()
        return checkpoint

    def save_model(
        self,
        epoch: int,
        directory: str,
        is_best: bool = False,
        val_result: Optional[float] = None,
        model_name: str = "",
    ) -> None:
        """Write ``<directory>/<name>/model.pth.tar-<epoch+1>`` (or ``model_name``) and the
        ``checkpoint`` pointer file for every registered model, atomically."""
        for name in self.get_model_names():
            checkpoint = self.checkpoint_dict(name, epoch, val_result)
            fdir = osp.join(directory, name)
            fname = model_name or f"model.pth.tar-{epoch + 1}"
            fpath = osp.join(fdir, fname)
            atomic_torch_save(checkpoint, fpath)
            atomic_write_text(osp.join(fdir, "checkpoint"), fname + "\n")
            logger.info(f"Checkpoint saved to {fpath}")
            if is_best:
                atomic_torch_save(checkpoint, osp.join(fdir, "model-best.pth.tar"))

    def save_resume_state(self, epoch: int, directory: str) -> None:
        """Overwrite ``<directory>/<name>/resume.pth.tar`` with the state after 0-based
        ``epoch`` (atomically; the ``checkpoint`` pointer is not touched)."""
        for name in self.get_model_names():
            atomic_torch_save(
                self.checkpoint_dict(name, epoch), osp.join(directory, name, RESUME_FILE)
            )

    def remove_resume_state(self, directory: str) -> None:
        """Delete the per-epoch resume files (once the run has finished)."""
        for name in self.get_model_names():
            path = osp.join(directory, name, RESUME_FILE)
            if osp.isfile(path):
                os.unlink(path)

    @staticmethod
    def _resume_candidates(folder: str) -> List[str]:
        """The checkpoint the ``checkpoint`` pointer names (if any), then ``resume.pth.tar``
        (if it exists)."""
        out = []
        pointer = osp.join(folder, "checkpoint")
        if osp.isfile(pointer):
            with open(pointer, encoding="utf-8") as f:
                fname = f.readline().strip()
            if fname:
                out.append(osp.join(folder, fname))
        if osp.isfile(osp.join(folder, RESUME_FILE)):
            out.append(osp.join(folder, RESUME_FILE))
        return out

    @staticmethod
    def _newest_checkpoint(candidates: List[str]) -> Any:
        """``(path, checkpoint)`` of the candidate with the highest stored epoch (the later
        one on a tie); unreadable candidates are skipped while another one is readable."""
        best = None
        errors = []
        for i, fpath in enumerate(candidates):
            try:
                ckpt = load_checkpoint(fpath)
            except (CheckpointError, OSError) as e:
                errors.append(e)
                continue
            key = (int(ckpt.get("epoch") or 0), i)
            if best is None or key > best[0]:
                best = (key, fpath, ckpt)
        if best is None:
            raise errors[0]
        for e in errors:
            logger.warning(f"Ignoring an unusable checkpoint: {e}")
        return best[1], best[2]

    def saved_epoch(self, directory: str) -> int:
        """The epoch ``resume_model_if_exist(directory)`` would resume from (-1: none)."""
        epochs = []
        for name in self.get_model_names():
            candidates = self._resume_candidates(osp.join(directory, name))
            if not candidates:
                return -1
            try:
                epochs.append(int(self._newest_checkpoint(candidates)[1].get("epoch") or 0))
            except (CheckpointError, OSError):
                return -1
        return min(epochs) if epochs else -1

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume every registered model from the newer (by stored epoch) of the checkpoint
        named by ``<directory>/<name>/checkpoint`` and ``<directory>/<name>/resume.pth.tar``;
        return the epoch to start from (0 when there is nothing to resume)."""
        names = self.get_model_names()
        if not names:
            return 0
        candidates = {name: self._resume_candidates(osp.join(directory, name)) for name in names}
        if any(not c for c in candidates.values()):
            logger.info("No checkpoint found, train from scratch")
            return 0
        logger.info(f"Found checkpoint at {directory} (will resume training)")
        start_epoch = 0
        rng = None
        for name in names:
            fpath, ckpt = self._newest_checkpoint(candidates[name])
            state_dict = self.prepare_loaded_state_dict(name, ckpt["state_dict"], fpath)
            self._models[name].load_state_dict(state_dict, strict=True)
            logger.info(f"Loaded model weights from {fpath}")
            sched = self._scheds[name]
            # the learning rates of the fresh schedule, for a replay (the optimizer's state
            # dict holds the saved ones)
            fresh_lrs = [g["lr"] for g in sched.optimizer.param_groups] if sched is not None else []
            if self._optims[name] is not None and ckpt.get("optimizer") is not None:
                self._optims[name].load_state_dict(ckpt["optimizer"])
                logger.info("Loaded optimizer")
            if sched is not None:
                resume_scheduler(sched, ckpt.get("scheduler"), ckpt["epoch"], fresh_lrs)
            scaler = self.__dict__.get("scaler")
            if scaler is not None and isinstance(ckpt.get("scaler"), dict):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch = ckpt["epoch"]
            rng = ckpt.get("rng_state") or rng
            if "best_result" in ckpt:
                self.best_result = ckpt["best_result"]
            logger.info(f"Previous epoch: {start_epoch}")
        if rng:
            self._set_rng_state(rng)
        return start_epoch

    def prepare_loaded_state_dict(
        self, name: str, state_dict: Dict[str, torch.Tensor], path: str
    ) -> Dict[str, torch.Tensor]:
        """Hook: adapt a loaded state dict before ``load_state_dict`` (e.g. drop buffers)."""
        return state_dict

    def load_model(self, directory: str, epoch: Optional[int] = None) -> None:
        """Load weights for evaluation from ``<directory>/<name>/model-best.pth.tar`` or
        ``model.pth.tar-<epoch>``."""
        if not directory:
            logger.info(
                "Note that load_model() is skipped as no pretrained model is given "
                "(ignore this if it's done on purpose)"
            )
            return
        names = self.get_model_names()
        model_file = "model-best.pth.tar"
        if epoch is not None:
            model_file = f"model.pth.tar-{epoch}"
        for name in names:
            model_path = osp.join(directory, name, model_file)
            if not osp.exists(model_path):
                raise FileNotFoundError(f'No model at "{model_path}"')
            ckpt = load_checkpoint(model_path)
            state_dict = self.prepare_loaded_state_dict(name, ckpt["state_dict"], model_path)
            logger.info(
                f'Loading weights to {name} from "{model_path}" (epoch = {ckpt.get("epoch")})'
            )
            self._models[name].load_state_dict(state_dict, strict=False)

    # ------------------------------------------------------------------ modes and updates
    def set_model_mode(self, mode: str = "train", names: Any = None) -> None:
        for name in self.get_model_names(names):
            if mode == "train":
                self._models[name].train()
            elif mode in ("test", "eval"):
                self._models[name].eval()
            else:
                raise KeyError(f"Unknown model mode '{mode}'")

    def update_lr(self, names: Any = None) -> None:
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()

    def detect_anomaly(self, loss: torch.Tensor) -> None:
        """Stop with :class:`NonFiniteLossError` when ``loss`` is NaN or infinite."""
        if not torch.isfinite(torch.as_tensor(loss)).all():
            raise NonFiniteLossError(self.non_finite_loss_message(loss))

    def precision_key(self) -> Any:
        """``(config key, value)`` of the precision setting: the trainer's own node's PREC
        (``TRAINER.<NAME>.PREC``) when it has one."""
        cfg = self.__dict__.get("cfg")
        if cfg is None:
            return "precision", "unknown"
        # the node the method reads (its own, or another method's it shares)
        named = getattr(type(self), "config_node_name", None)
        node_name = (named() if callable(named) else None) or str(cfg.TRAINER.NAME).upper()
        node = cfg.TRAINER.get(node_name)
        if node is not None and hasattr(node, "get") and "PREC" in node:
            return f"TRAINER.{node_name}.PREC", node.PREC
        return "precision", "unknown"

    def non_finite_loss_message(self, loss: Any) -> str:
        value = float(torch.as_tensor(loss).detach().float().reshape(-1)[0])
        epoch = self.__dict__.get("epoch", 0) + 1
        max_epoch = self.__dict__.get("max_epoch", "?")
        batch = self.__dict__.get("batch_idx", 0) + 1
        num_batches = self.__dict__.get("num_batches", "?")
        key, prec = self.precision_key()
        if prec == "fp32":
            advice = f"Use a lower OPTIM.LR ({key} is fp32 already)"
        elif prec == "amp":
            advice = f"Use {key} fp32 (or bf16 where the hardware supports it), or a lower OPTIM.LR"
        else:
            advice = (
                f"Use {key} amp or fp32 (or bf16 where the hardware supports it), or a lower "
                f"OPTIM.LR"
            )
        return (
            f"Loss is infinite or NaN ({value}) at epoch {epoch}/{max_epoch}, batch "
            f"{batch}/{num_batches} with {key} {prec}; training stopped and nothing was saved "
            f"after this batch (the last checkpoint, if any, is kept). {advice}"
        )

    def init_writer(self, log_dir: str) -> None:
        if self.__dict__.get("_writer") is None or self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                logger.info("TensorBoard is not installed; skipping tensorboard logging")
                self._writer = None
                return
            logger.info(f"Initialize tensorboard (log_dir={log_dir})")
            self._writer = SummaryWriter(log_dir=log_dir)

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def write_scalar(self, tag: str, scalar_value: Any, global_step: Any = None) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, scalar_value, global_step)

    # ------------------------------------------------------------------ loop
    def train(self, start_epoch: int, max_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.before_train()
        for epoch in range(self.start_epoch, self.max_epoch):
            self.epoch = epoch
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def run_epoch(self) -> None:
        raise NotImplementedError

    def test(self, split: Optional[str] = None) -> Any:
        raise NotImplementedError

    def parse_batch_train(self, batch: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def parse_batch_test(self, batch: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def forward_backward(self, batch: Dict[str, Any]) -> Dict[str, float]:
        raise NotImplementedError

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_zero_grad(self, names: Any = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].zero_grad()

    def model_backward(self, loss: torch.Tensor) -> None:
        self.detect_anomaly(loss)
        loss.backward()

    def model_update(self, names: Any = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].step()

    def model_backward_and_update(self, loss: torch.Tensor, names: Any = None) -> None:
        self.model_zero_grad(names)
        self.model_backward(loss)
        self.model_update(names)


class SimpleTrainer(TrainerBase):
    """A trainer with a data manager, one model, an evaluator and the standard hooks."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.check_cfg(cfg)
        if torch.cuda.is_available() and cfg.USE_CUDA:
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
        self.start_epoch = self.epoch = 0
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.output_dir = cfg.OUTPUT_DIR
        self.cfg = cfg
        self.build_data_loader()
        self.build_model()
        self.evaluator = build_evaluator(cfg, lab2cname=self.lab2cname)
        self.best_result = -np.inf
        self.final_results: Optional[Dict[str, float]] = None

    def check_cfg(self, cfg: Any) -> None:
        """Hook for trainers to check their config keys (Dassl's ``check_cfg``)."""

    def build_data_loader(self) -> None:
        from coop.data import DataManager

        dm = DataManager(self.cfg)
        self.train_loader_x = dm.train_loader_x
        self.train_loader_u = dm.train_loader_u
        self.val_loader = dm.val_loader
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.num_source_domains = dm.num_source_domains
        self.lab2cname = dm.lab2cname
        self.dm = dm

    def build_model(self) -> None:
        raise NotImplementedError

    def train(self) -> None:  # type: ignore[override]
        super().train(self.start_epoch, self.max_epoch)

    def before_train(self) -> None:
        directory = self.cfg.OUTPUT_DIR
        if self.output_dir:  # temporary files of writes that a kill interrupted
            remove_stale_temp_files(self.output_dir)
            for name in self.get_model_names():
                remove_stale_temp_files(osp.join(self.output_dir, name))
        if self.cfg.RESUME:
            # the same command again after a kill: this run's own progress in OUTPUT_DIR is
            # newer than the RESUME checkpoint it started from
            own = self.saved_epoch(self.output_dir) if self.output_dir else -1
            if own < 0 or own < self.saved_epoch(self.cfg.RESUME):
                directory = self.cfg.RESUME
        self.start_epoch = self.resume_model_if_exist(directory)
        if self.start_epoch > 0:
            self.epoch = self.start_epoch - 1  # the last finished epoch
        finished = osp.join(self.output_dir, FINISHED_MARKER) if self.output_dir else ""
        if finished and osp.exists(finished):
            if self.start_epoch >= self.max_epoch:
                logger.info(
                    f"The run in {self.output_dir} has finished; only the final test is repeated"
                )
            else:  # more epochs than the finished run had: it is unfinished again
                os.unlink(finished)
        writer_dir = osp.join(self.output_dir, "tensorboard")
        os.makedirs(writer_dir, exist_ok=True)
        self.init_writer(writer_dir)
        self.time_start = time.time()

    def after_train(self) -> None:
        logger.info("Finish training")
        do_test = not self.cfg.TEST.NO_TEST
        if do_test:
            if self.cfg.TEST.FINAL_MODEL == "best_val":
                logger.info("Deploy the model with the best val performance")
                self.load_model(self.output_dir)
            else:
                logger.info("Deploy the last-epoch model")
            self.test()
        elapsed = round(time.time() - self.time_start)
        logger.info(f"Elapsed: {datetime.timedelta(seconds=elapsed)}")
        self.close_writer()
        if self.output_dir:
            atomic_write_text(
                osp.join(self.output_dir, FINISHED_MARKER),
                f"finished epoch {self.max_epoch}\n",
            )
            self.remove_resume_state(self.output_dir)

    def after_epoch(self) -> None:
        last_epoch = (self.epoch + 1) == self.max_epoch
        do_test = not self.cfg.TEST.NO_TEST
        meet_checkpoint_freq = (
            (self.epoch + 1) % self.cfg.TRAIN.CHECKPOINT_FREQ == 0
            if self.cfg.TRAIN.CHECKPOINT_FREQ > 0
            else False
        )
        if do_test and self.cfg.TEST.FINAL_MODEL == "best_val":
            curr_result = self.test(split="val")
            is_best = curr_result > self.best_result
            if is_best:
                self.best_result = curr_result
                self.save_model(
                    self.epoch,
                    self.output_dir,
                    val_result=curr_result,
                    model_name="model-best.pth.tar",
                )
        if meet_checkpoint_freq or last_epoch:
            self.save_model(self.epoch, self.output_dir)
        if self.output_dir:
            self.save_resume_state(self.epoch, self.output_dir)

    @torch.no_grad()
    def test(self, split: Optional[str] = None) -> float:
        """Evaluate on ``split`` (TEST.SPLIT by default); returns the first metric."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        if split is None:
            split = self.cfg.TEST.SPLIT
        if split == "val" and self.val_loader is not None:
            data_loader = self.val_loader
        else:
            split = "test"
            data_loader = self.test_loader
        logger.info(f"Evaluate on the *{split}* set")
        with self.evaluation_context():
            self.run_evaluation(split, data_loader)
        self.report_skipped(f"the *{split}* set")
        results = self.evaluator.evaluate()
        for k, v in results.items():
            self.write_scalar(f"{split}/{k}", v, self.epoch)
        if split == self.cfg.TEST.SPLIT or split == "test":
            self.final_results = dict(results)
            self.write_results(split, results)
        return list(results.values())[0]

    def run_evaluation(self, split: str, data_loader: Any) -> None:
        """Feed every batch's outputs to the evaluator (a hook for cached features)."""
        for batch in tqdm(data_loader, desc=f"eval {split}", leave=False):
            batch = self.take_skipped(batch)
            if batch is None:
                continue
            input, label = self.parse_batch_test(batch)
            output = self.model_inference(input)
            self.evaluator.process(output, label)

    def evaluation_context(self):
        """Hook: a context manager active during an evaluation pass (e.g. to compute the
        class text features once instead of once per batch)."""

        return contextlib.nullcontext()

    def write_results(self, split: str, results: Dict[str, float]) -> None:
        """Write ``<OUTPUT_DIR>/results.json`` with the metrics and the resolved config."""
        if not self.output_dir:
            return
        payload = {
            "trainer": self.cfg.TRAINER.NAME,
            "dataset": self.cfg.DATASET.NAME,
            "backbone": self.cfg.MODEL.BACKBONE.NAME,
            "num_shots": self.cfg.DATASET.NUM_SHOTS,
            "subsample_classes": self.cfg.DATASET.SUBSAMPLE_CLASSES,
            "seed": self.cfg.SEED,
            "split": split,
            "epoch": self.epoch + 1 if self.epoch or self.max_epoch else 0,
            "metrics": {k: float(v) for k, v in results.items()},
            "total": int(self.evaluator._total),
            "correct": int(self.evaluator._correct),
            "config": _cfg_to_dict(self.cfg),
        }
        if self.cfg.DATALOADER.get("SKIP_UNREADABLE", False):
            payload["skipped_unreadable"] = self.__dict__.get("last_skipped_count", 0)
        atomic_write_json(osp.join(self.output_dir, "results.json"), payload, indent=2)

    def parse_batch_train(self, batch: Dict[str, Any]):
        return self.batch_to_device(batch)

    def parse_batch_test(self, batch: Dict[str, Any]):
        return self.batch_to_device(batch)

    def batch_to_device(self, batch: Dict[str, Any]):
        """A batch's images and labels on the trainer's device."""
        non_blocking = self.non_blocking_copies()
        input = batch["img"].to(self.device, non_blocking=non_blocking)
        label = batch["label"].to(self.device, non_blocking=non_blocking)
        return input, label

    def non_blocking_copies(self) -> bool:
        """Hook: copy batches to the device without blocking the host (Dassl blocks)."""
        return False

    # ------------------------------------------------------------------ unreadable images
    def take_skipped(self, batch: Any) -> Any:
        """Record the unreadable images a batch skipped (DATALOADER.SKIP_UNREADABLE); returns
        the batch without that record, or ``None`` when none of its images was readable."""
        if not isinstance(batch, dict) or "_skipped" not in batch:
            return batch
        self.__dict__.setdefault("_skipped_paths", []).extend(batch.pop("_skipped"))
        if batch.pop("_empty", False):
            return None
        return batch

    def report_skipped(self, where: str) -> int:
        """Log how many images were skipped since the last report (and the first few)."""
        paths = self.__dict__.pop("_skipped_paths", [])
        self.last_skipped_count = len(paths)
        if paths:
            first = ", ".join(paths[:_MAX_LISTED_SKIPS])
            more = " ..." if len(paths) > _MAX_LISTED_SKIPS else ""
            logger.warning(
                f"Skipped {len(paths)} unreadable image(s) in {where} "
                f"(DATALOADER.SKIP_UNREADABLE): {first}{more}"
            )
        return len(paths)

    def get_current_lr(self, names: Any = None) -> float:
        name = self.get_model_names(names)[0]
        return self._optims[name].param_groups[0]["lr"]

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


class TrainerX(SimpleTrainer):
    """A trainer over labelled data only (``train_loader_x``)."""

    def run_epoch(self) -> None:
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time = AverageMeter()
        data_time = AverageMeter()
        self.num_batches = len(self.train_loader_x)
        end = time.time()
        for batch_idx, batch in enumerate(self.train_loader_x):
            self.batch_idx = batch_idx
            data_time.update(time.time() - end)
            batch = self.take_skipped(batch)
            if batch is None:  # every image of the batch was unreadable (and skipped)
                if self.batch_idx + 1 == self.num_batches:
                    self.update_lr()  # the trainers step the schedule on the last batch
                end = time.time()
                continue
            loss_summary = self.forward_backward(batch)
            loss_value = (loss_summary or {}).get("loss")
            if isinstance(loss_value, (float, int)) and not math.isfinite(loss_value):
                # trainers whose update path does not call detect_anomaly (e.g. amp)
                raise NonFiniteLossError(self.non_finite_loss_message(loss_value))
            batch_time.update(time.time() - end)
            losses.update(loss_summary)

            meet_freq = (self.batch_idx + 1) % self.cfg.TRAIN.PRINT_FREQ == 0
            only_few_batches = self.num_batches < self.cfg.TRAIN.PRINT_FREQ
            if meet_freq or only_few_batches:
                nb_remain = self.num_batches - self.batch_idx - 1
                nb_remain += (self.max_epoch - self.epoch - 1) * self.num_batches
                eta = format_eta(batch_time.avg * nb_remain)
                info = [
                    f"epoch [{self.epoch + 1}/{self.max_epoch}]",
                    f"batch [{self.batch_idx + 1}/{self.num_batches}]",
                    f"time {batch_time.val:.3f} ({batch_time.avg:.3f})",
                    f"data {data_time.val:.3f} ({data_time.avg:.3f})",
                    f"{losses}",
                    f"lr {self.get_current_lr():.4e}",
                    f"eta {eta}",
                ]
                logger.info(" ".join(info))

            n_iter = self.epoch * self.num_batches + self.batch_idx
            for name, meter in losses.meters.items():
                self.write_scalar("train/" + name, meter.avg, n_iter)
            self.write_scalar("train/lr", self.get_current_lr(), n_iter)
            end = time.time()
        self.report_skipped(f"epoch {self.epoch + 1}/{self.max_epoch}")


def _cfg_to_dict(cfg: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out[k] = _cfg_to_dict(v)
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out
