"""Checks run on the merged config before any model or image is loaded."""

from __future__ import annotations

from typing import Any, Sequence

from coop.config import ConfigError

_CHOICES = {
    "TEST.FINAL_MODEL": ("last_step", "best_val"),
    "TEST.SPLIT": ("val", "test"),
    "OPTIM.WARMUP_TYPE": ("linear", "constant"),
    "INPUT.INTERPOLATION": ("bilinear", "bicubic", "nearest"),
    "DATASET.SUBSAMPLE_CLASSES": ("all", "base", "new"),
    "DATALOADER.TRAIN_X.SAMPLER": ("RandomSampler", "SequentialSampler"),
    "DATALOADER.TEST.SAMPLER": ("RandomSampler", "SequentialSampler"),
}


def _choices() -> dict:
    """The allowed values of each checked key; lists owned by a module are taken from it."""
    from coop.optim import AVAI_OPTIMS, AVAI_SCHEDS

    return {**_CHOICES, "OPTIM.NAME": tuple(AVAI_OPTIMS), "OPTIM.LR_SCHEDULER": tuple(AVAI_SCHEDS)}


# Input resolution and text width (the context vectors' dimension) of OpenAI's CLIP models.
BACKBONE_RESOLUTION = {
    "RN50": 224,
    "RN101": 224,
    "RN50x4": 288,
    "RN50x16": 384,
    "RN50x64": 448,
    "ViT-B/32": 224,
    "ViT-B/16": 224,
    "ViT-L/14": 224,
    "ViT-L/14@336px": 336,
}
BACKBONE_CTX_DIM = {
    "RN50": 512,
    "RN101": 512,
    "RN50x4": 640,
    "RN50x16": 768,
    "RN50x64": 1024,
    "ViT-B/32": 512,
    "ViT-B/16": 512,
    "ViT-L/14": 768,
    "ViT-L/14@336px": 768,
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


# what a real Dassl decides for itself (it has more choices, and its users register more)
_DASSL_DECIDES = ("SAMPLER", "OPTIM.NAME", "OPTIM.LR_SCHEDULER")


def validate_cfg(cfg: Any, dassl: bool = False) -> None:
    """Refuse values and combinations that cannot work, naming the key and the allowed set.
    ``dassl``: the run is on a real Dassl, whose own choices (transforms, samplers,
    optimizers, schedulers) it checks itself."""
    from coop.registry import DATASET_REGISTRY, TRAINER_REGISTRY

    for key, choices in _choices().items():
        if not (dassl and any(part in key for part in _DASSL_DECIDES)):
            _check_choice(cfg, key, choices)

    if not cfg.TRAINER.NAME:
        raise ConfigError("No trainer given: pass --trainer (e.g. CoOp or ZeroshotCLIP)")
    trainer = TRAINER_REGISTRY.get(cfg.TRAINER.NAME)  # raises with a "did you mean"
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
    # a named backbone's resolution is known before anything is downloaded; for a checkpoint
    # file the model checks it when it is built
    res = BACKBONE_RESOLUTION.get(cfg.MODEL.BACKBONE.NAME)
    if res is not None and size != (res, res):
        raise ConfigError(
            f"INPUT.SIZE {size} does not match the input resolution {res} of the CLIP "
            f"backbone '{cfg.MODEL.BACKBONE.NAME}'; set INPUT.SIZE ({res}, {res})"
        )
    for name in [] if dassl else cfg.INPUT.TRANSFORMS:
        if name not in _TRANSFORMS:
            raise ConfigError(
                f"Unknown transform {name!r} in INPUT.TRANSFORMS; choose from {list(_TRANSFORMS)}"
            )
    for key in ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"):
        if len(_get(cfg, key)) != 3:
            raise ConfigError(f"{key} must have 3 values (RGB), got {_get(cfg, key)!r}")
    if cfg.DATALOADER.TRAIN_X.BATCH_SIZE < 1 or cfg.DATALOADER.TEST.BATCH_SIZE < 1:
        raise ConfigError("DATALOADER.*.BATCH_SIZE must be at least 1")
    if cfg.DATALOADER.NUM_WORKERS < -1:
        raise ConfigError(
            "DATALOADER.NUM_WORKERS must be >= 0, or -1 for one worker per CPU core (at most 8)"
        )
    if cfg.OPTIM.MAX_EPOCH < 1:
        raise ConfigError(f"OPTIM.MAX_EPOCH must be at least 1, got {cfg.OPTIM.MAX_EPOCH}")
    if cfg.OPTIM.LR <= 0:
        raise ConfigError(f"OPTIM.LR must be positive, got {cfg.OPTIM.LR}")
    if cfg.FAST.TRAIN_FEATURE_CACHE and cfg.DATALOADER.SKIP_UNREADABLE:
        raise ConfigError(
            "FAST.TRAIN_FEATURE_CACHE cannot be combined with DATALOADER.SKIP_UNREADABLE "
            "(the cached views need every training image); turn one of them off"
        )
    text_modes = ["auto", "shared_prefix", "truncate", "plain"]
    if cfg.FAST.TEXT not in text_modes:
        raise ConfigError(f"FAST.TEXT must be one of {text_modes}, got {cfg.FAST.TEXT!r}")
    if cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES < 0:
        raise ConfigError(
            "FAST.GPU_SHARED_PREFIX_MIN_CLASSES must be >= 0, got "
            f"{cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES}"
        )
    if cfg.FAST.TRAIN_CACHE_VIEWS < 1:
        raise ConfigError(
            f"FAST.TRAIN_CACHE_VIEWS must be at least 1, got {cfg.FAST.TRAIN_CACHE_VIEWS}"
        )
    if cfg.FAST.CLASS_CHUNK < 0:
        raise ConfigError(f"FAST.CLASS_CHUNK must be >= 0, got {cfg.FAST.CLASS_CHUNK}")
    if cfg.TRAIN.PRINT_FREQ < 1:
        raise ConfigError("TRAIN.PRINT_FREQ must be at least 1")
    import inspect

    # the method's own keys (trainers on the base check them without an instance)
    if isinstance(inspect.getattr_static(trainer, "check_cfg", None), classmethod):
        trainer.check_cfg(cfg)


def _names_config_key(message: str) -> bool:
    """Whether ``message`` names a config key (e.g. ``INPUT.SIZE``): such an error tells the
    user which setting to change."""
    import re

    from coop.config import all_keys, get_cfg_default

    keys = set(all_keys(get_cfg_default()))
    return any(k in keys for k in re.findall(r"\b[A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)+\b", message))


def is_user_error(exc: BaseException) -> bool:
    """True for errors caused by the user's input (reported in one line, no traceback):
    this package's own error classes, missing files and permissions, and plain
    ``ValueError``s whose message names the config key to change."""
    from coop.io import CheckpointError, WriteError
    from coop.registry import RegistryError

    if isinstance(exc, (ConfigError, RegistryError, CheckpointError, WriteError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return True
    mod = type(exc).__module__ or ""
    if mod.startswith("coop"):
        return True
    return type(exc) is ValueError and _names_config_key(str(exc))


def user_message(exc: BaseException) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries
    the worker's traceback: only its last line (the original message) is kept."""
    text = str(exc)
    if "Original Traceback" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        last = lines[-1] if lines else text
        head, sep, rest = last.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum():
            last = rest  # drop "package.module.ErrorClass: "
        return last
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
