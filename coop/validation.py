"""Checks run on the merged config before any model or image is loaded."""

from __future__ import annotations

from typing import Any, Sequence

from coop.config import ConfigError

_CHOICES = {
    "TEST.FINAL_MODEL": ("last_step", "best_val"),
    "TEST.SPLIT": ("val", "test"),
    "OPTIM.NAME": ("adam", "amsgrad", "sgd", "rmsprop", "radam", "adamw"),
    "OPTIM.LR_SCHEDULER": ("single_step", "multi_step", "cosine"),
    "OPTIM.WARMUP_TYPE": ("linear", "constant"),
    "INPUT.INTERPOLATION": ("bilinear", "bicubic", "nearest"),
    "DATASET.SUBSAMPLE_CLASSES": ("all", "base", "new"),
    "TRAINER.COOP.PREC": ("fp16", "fp32", "amp"),
    "TRAINER.COOP.CLASS_TOKEN_POSITION": ("end", "middle", "front"),
    "TRAINER.COCOOP.PREC": ("fp16", "fp32", "amp"),
    "DATALOADER.TRAIN_X.SAMPLER": ("RandomSampler", "SequentialSampler"),
    "DATALOADER.TEST.SAMPLER": ("RandomSampler", "SequentialSampler"),
}

_TRANSFORMS = (
    "random_resized_crop",
    "random_crop",
    "random_flip",
    "center_crop",
    "normalize",
)


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_choice(cfg: Any, key: str, choices: Sequence[str]) -> None:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def validate_cfg(cfg: Any) -> None:
    """Refuse values and combinations that cannot work, naming the key and the allowed set."""
    from coop.registry import DATASET_REGISTRY, TRAINER_REGISTRY

    for key, choices in _CHOICES.items():
        _check_choice(cfg, key, choices)

    if not cfg.TRAINER.NAME:
        raise ConfigError("No trainer given: pass --trainer (e.g. CoOp or ZeroshotCLIP)")
    TRAINER_REGISTRY.get(cfg.TRAINER.NAME)  # raises with a "did you mean"
    if not cfg.DATASET.NAME:
        raise ConfigError(
            "No dataset given: pass --dataset-config-file (e.g. configs/datasets/caltech101.yaml)"
        )
    DATASET_REGISTRY.get(cfg.DATASET.NAME)
    if not cfg.MODEL.BACKBONE.NAME:
        raise ConfigError("No backbone given: set MODEL.BACKBONE.NAME (e.g. RN50 or ViT-B/16)")

    size = tuple(cfg.INPUT.SIZE)
    if len(size) != 2 or any((not isinstance(s, int)) or s <= 0 for s in size):
        raise ConfigError(f"INPUT.SIZE must be two positive integers, got {cfg.INPUT.SIZE!r}")
    for name in cfg.INPUT.TRANSFORMS:
        if name not in _TRANSFORMS:
            raise ConfigError(
                f"Unknown transform {name!r} in INPUT.TRANSFORMS; choose from {list(_TRANSFORMS)}"
            )
    for key in ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"):
        if len(_get(cfg, key)) != 3:
            raise ConfigError(f"{key} must have 3 values (RGB), got {_get(cfg, key)!r}")
    if cfg.DATALOADER.TRAIN_X.BATCH_SIZE < 1 or cfg.DATALOADER.TEST.BATCH_SIZE < 1:
        raise ConfigError("DATALOADER.*.BATCH_SIZE must be at least 1")
    if cfg.DATALOADER.NUM_WORKERS < 0:
        raise ConfigError("DATALOADER.NUM_WORKERS must be >= 0")
    if cfg.OPTIM.MAX_EPOCH < 1:
        raise ConfigError(f"OPTIM.MAX_EPOCH must be at least 1, got {cfg.OPTIM.MAX_EPOCH}")
    if cfg.OPTIM.LR <= 0:
        raise ConfigError(f"OPTIM.LR must be positive, got {cfg.OPTIM.LR}")
    if cfg.TRAINER.COOP.N_CTX < 1 and not cfg.TRAINER.COOP.CTX_INIT:
        raise ConfigError(f"TRAINER.COOP.N_CTX must be at least 1, got {cfg.TRAINER.COOP.N_CTX}")
    if cfg.TRAIN.PRINT_FREQ < 1:
        raise ConfigError("TRAIN.PRINT_FREQ must be at least 1")


def is_user_error(exc: BaseException) -> bool:
    """True for errors caused by the user's input (reported in one line, no traceback)."""
    from coop.io import CheckpointError, WriteError
    from coop.registry import RegistryError

    if isinstance(exc, (ConfigError, RegistryError, CheckpointError, WriteError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return True
    mod = type(exc).__module__ or ""
    return mod.startswith("coop")
