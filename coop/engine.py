"""The training engine: Dassl's ``TrainerBase`` / ``SimpleTrainer`` / ``TrainerX``, written fresh.

Same public API and semantics as Dassl (epochs, iterations per epoch, one scheduler step per
epoch after the last batch, evaluator, checkpoints with Dassl's file names, resume from
``OUTPUT_DIR``), so trainer classes written against it also run on a real Dassl. Differences
that users asked for: checkpoints are written atomically and hold only tensors and plain
values (they load with ``weights_only=True``), resume restores the RNG states and the LR
schedule, log lines go through :mod:`logging`, and every run writes ``results.json``.
"""

from __future__ import annotations

import datetime
import logging
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

from coop.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint
from coop.registry import build_evaluator
from coop.utils import AverageMeter, MetricMeter, format_eta

logger = logging.getLogger(__name__)

FINISHED_MARKER = "finished"


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
            fdir = osp.join(directory, name)
            fname = model_name or f"model.pth.tar-{epoch + 1}"
            fpath = osp.join(fdir, fname)
            atomic_torch_save(checkpoint, fpath)
            atomic_write_text(osp.join(fdir, "checkpoint"), fname + "\n")
            logger.info(f"Checkpoint saved to {fpath}")
            if is_best:
                atomic_torch_save(checkpoint, osp.join(fdir, "model-best.pth.tar"))

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume every registered model from ``<directory>/<name>/checkpoint``; return the
        epoch to start from (0 when there is nothing to resume)."""
        names = self.get_model_names()
        if not names:
            return 0
        file_missing = any(
            not osp.exists(osp.join(directory, name, "checkpoint")) for name in names
        )
        if file_missing:
            logger.info("No checkpoint found, train from scratch")
            return 0
        logger.info(f"Found checkpoint at {directory} (will resume training)")
        start_epoch = 0
        rng = None
        for name in names:
            path = osp.join(directory, name)
            with open(osp.join(path, "checkpoint"), encoding="utf-8") as f:
                fname = f.readline().strip()
            fpath = osp.join(path, fname)
            ckpt = load_checkpoint(fpath)
            state_dict = self.prepare_loaded_state_dict(name, ckpt["state_dict"], fpath)
            self._models[name].load_state_dict(state_dict, strict=True)
            logger.info(f"Loaded model weights from {fpath}")
            if self._optims[name] is not None and ckpt.get("optimizer") is not None:
                self._optims[name].load_state_dict(ckpt["optimizer"])
                logger.info("Loaded optimizer")
            if self._scheds[name] is not None and isinstance(ckpt.get("scheduler"), dict):
                self._scheds[name].load_state_dict(ckpt["scheduler"])
                logger.info("Loaded scheduler")
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
        if not torch.isfinite(loss).all():
            raise FloatingPointError("Loss is infinite or NaN!")

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
        if self.cfg.RESUME:
            directory = self.cfg.RESUME
        self.start_epoch = self.resume_model_if_exist(directory)
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
        atomic_write_text(
            osp.join(self.output_dir, FINISHED_MARKER),
            f"finished epoch {self.max_epoch}\n",
        )

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
            input, label = self.parse_batch_test(batch)
            output = self.model_inference(input)
            self.evaluator.process(output, label)

    def evaluation_context(self):
        """Hook: a context manager active during an evaluation pass (e.g. to compute the
        class text features once instead of once per batch)."""
        import contextlib

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
        atomic_write_json(osp.join(self.output_dir, "results.json"), payload, indent=2)

    def parse_batch_train(self, batch: Dict[str, Any]):
        input = batch["img"].to(self.device)
        label = batch["label"].to(self.device)
        return input, label

    def parse_batch_test(self, batch: Dict[str, Any]):
        input = batch["img"].to(self.device)
        label = batch["label"].to(self.device)
        return input, label

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
            loss_summary = self.forward_backward(batch)
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

    def parse_batch_train(self, batch: Dict[str, Any]):
        input = batch["img"].to(self.device)
        label = batch["label"].to(self.device)
        return input, label


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
