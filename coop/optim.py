"""Optimizers and learning-rate schedulers with Dassl's names and semantics.

``build_lr_scheduler`` reproduces Dassl's warm-up wrappers: the wrapped ("successor")
scheduler is PyTorch's own (``CosineAnnealingLR`` etc., so the recursive cosine values match
bit for bit), and the wrapper hands over to it after ``WARMUP_EPOCH`` epochs. Unlike Dassl,
the wrappers' state dicts hold only plain values (the successor's state is nested as a
dict), so checkpoints load with ``weights_only=True`` and a resumed run continues the
schedule instead of freezing it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Iterable, List, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger(__name__)

AVAI_OPTIMS = ["adam", "amsgrad", "sgd", "rmsprop", "radam", "adamw"]
AVAI_SCHEDS = ["single_step", "multi_step", "cosine"]


def build_optimizer(
    model: Union[nn.Module, Iterable[Any]], optim_cfg: Any, param_groups: Any = None
) -> torch.optim.Optimizer:
    """Dassl's ``build_optimizer`` (STAGED_LR included)."""
    name = optim_cfg.NAME
    lr = optim_cfg.LR
    wd = optim_cfg.WEIGHT_DECAY
    if name not in AVAI_OPTIMS:
        raise ValueError(f"OPTIM.NAME must be one of {AVAI_OPTIMS}, but got '{name}'")

    if param_groups is not None and optim_cfg.STAGED_LR:
        raise ValueError("STAGED_LR cannot be used together with explicit param_groups")

    if param_groups is None:
        if optim_cfg.STAGED_LR:
            if not isinstance(model, nn.Module):
                raise TypeError("STAGED_LR needs an nn.Module")
            if isinstance(model, nn.DataParallel):
                model = model.module
            new_layers = optim_cfg.NEW_LAYERS
            if isinstance(new_layers, str):
                new_layers = [new_layers]
            base_params, new_params = [], []
            for mname, module in model.named_children():
                target = new_params if mname in new_layers else base_params
                target.extend(p for p in module.parameters())
            param_groups = [
                {"params": base_params, "lr": lr * optim_cfg.BASE_LR_MULT},
                {"params": new_params},
            ]
        elif isinstance(model, nn.Module):
            param_groups = model.parameters()
        else:
            param_groups = model

    if name == "adam":
        return torch.optim.Adam(
            param_groups, lr=lr, weight_decay=wd, betas=(optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
        )
    if name == "amsgrad":
        return torch.optim.Adam(
            param_groups,
            lr=lr,
            weight_decay=wd,
            betas=(optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2),
            amsgrad=True,
        )
    if name == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=lr,
            momentum=optim_cfg.MOMENTUM,
            weight_decay=wd,
            dampening=optim_cfg.SGD_DAMPNING,
            nesterov=optim_cfg.SGD_NESTEROV,
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(
            param_groups,
            lr=lr,
            momentum=optim_cfg.MOMENTUM,
            weight_decay=wd,
            alpha=optim_cfg.RMSPROP_ALPHA,
        )
    if name == "radam":
        return torch.optim.RAdam(
            param_groups, lr=lr, weight_decay=wd, betas=(optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
        )
    return torch.optim.AdamW(
        param_groups, lr=lr, weight_decay=wd, betas=(optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
    )


class _BaseWarmupScheduler(LRScheduler):
    """Runs its own warm-up rule for ``warmup_epoch`` steps, then delegates to ``successor``."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int
    ) -> None:
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch=-1)

    def get_lr(self) -> List[float]:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def step(self, epoch: Any = None) -> None:
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()

    def state_dict(self) -> Dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the wrapper and its successor; a state without the successor's state
        dict (Dassl pickles the successor object, which a safe reader does not load) raises
        ``ValueError`` and changes nothing: loading only the wrapper would leave the
        successor at its first epoch and give other learning rates than the saved run."""
        state = dict(state_dict)
        successor_state = state.pop("successor", None)
        if not isinstance(successor_state, dict):
            raise ValueError(
                "the scheduler state holds no state of the successor scheduler (a Dassl "
                "checkpoint pickles the successor object, which is not loaded)"
            )
        self.successor.load_state_dict(successor_state)
        # never an unpickled optimizer or successor: keep our live ones
        state.pop("optimizer", None)
        self.__dict__.update(state)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    def __init__(self, optimizer, successor, warmup_epoch: int, cons_lr: float) -> None:
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch)

    def get_lr(self) -> List[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


class LinearWarmupScheduler(_BaseWarmupScheduler):
    def __init__(self, optimizer, successor, warmup_epoch: int, min_lr: float) -> None:
        self.min_lr = min_lr
        super().__init__(optimizer, successor, warmup_epoch)

    def get_lr(self) -> List[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        if self.last_epoch == 0:
            return [self.min_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any) -> LRScheduler:
    """Dassl's ``build_lr_scheduler``: single_step / multi_step / cosine, optional warm-up."""
    sched = optim_cfg.LR_SCHEDULER
    stepsize = optim_cfg.STEPSIZE
    gamma = optim_cfg.GAMMA
    max_epoch = optim_cfg.MAX_EPOCH
    if sched not in AVAI_SCHEDS:
        raise ValueError(f"OPTIM.LR_SCHEDULER must be one of {AVAI_SCHEDS}, but got '{sched}'")

    if sched == "single_step":
        if isinstance(stepsize, (list, tuple)):
            stepsize = stepsize[-1]
        if not isinstance(stepsize, int):
            raise TypeError(f"For single_step, OPTIM.STEPSIZE must be an integer, got {stepsize}")
        if stepsize <= 0:
            stepsize = max_epoch
        scheduler: LRScheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=stepsize, gamma=gamma
        )
    elif sched == "multi_step":
        if not isinstance(stepsize, (list, tuple)):
            raise TypeError(f"For multi_step, OPTIM.STEPSIZE must be a list, got {stepsize}")
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(stepsize), gamma=gamma
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))

    if optim_cfg.WARMUP_EPOCH > 0:
        if not optim_cfg.WARMUP_RECOUNT:
            scheduler.last_epoch = optim_cfg.WARMUP_EPOCH
        if optim_cfg.WARMUP_TYPE == "constant":
            scheduler = ConstantWarmupScheduler(
                optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_CONS_LR
            )
        elif optim_cfg.WARMUP_TYPE == "linear":
            scheduler = LinearWarmupScheduler(
                optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_MIN_LR
            )
        else:
            raise ValueError(
                f"OPTIM.WARMUP_TYPE must be 'constant' or 'linear', got '{optim_cfg.WARMUP_TYPE}'"
            )
    return scheduler


def resume_scheduler(sched: Any, state: Any, epoch: int, fresh_lrs: List[float]) -> None:
    """Load ``state`` into ``sched``. A state that does not fit (a Dassl checkpoint's
    warm-up scheduler, whose successor was pickled as an object and is not loaded; no
    state at all) is skipped with a warning, and a scheduler that has not stepped yet
    replays ``epoch`` steps from ``fresh_lrs`` instead: the schedule is deterministic,
    so this gives the learning rates of the saved run."""
    reason = "the checkpoint holds no scheduler state"
    if isinstance(state, dict):
        try:
            sched.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e)
        else:
            logger.info("Loaded scheduler")
            return
    if getattr(sched, "_step_count", None) != 1:  # stepped already: nothing to replay
        logger.warning(f"Scheduler state not loaded: {reason}")
        return
    logger.warning(
        f"Scheduler state not loaded: {reason}; the schedule is replayed for "
        f"{epoch} epoch(s) instead"
    )
    for group, lr in zip(sched.optimizer.param_groups, fresh_lrs):
        group["lr"] = lr
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(int(epoch)):
            sched.step()
