"""Configuration: Dassl's defaults (same key names and values), CoOp's additions, merging.

Merge order (as the original ``train.py``): defaults -> dataset YAML -> method YAML ->
command-line arguments -> trailing opts -> freeze. Unknown keys are refused with the closest
valid key named.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Iterable, List, Sequence

from yacs.config import CfgNode as CN

__all__ = [
    "CN",
    "ConfigError",
    "get_cfg_default",
    "extend_cfg",
    "merge_from_file",
    "merge_from_list",
    "resolve_config_path",
    "all_keys",
]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


def _dassl_defaults() -> CN:
    """Dassl's ``get_cfg_default()`` for every key a CoOp-style run can touch."""
    _C = CN()
    _C.VERSION = 1
    _C.OUTPUT_DIR = "./output"
    _C.RESUME = ""
    _C.SEED = -1
    _C.USE_CUDA = True
    _C.VERBOSE = True

    _C.INPUT = CN()
    _C.INPUT.SIZE = (224, 224)
    _C.INPUT.INTERPOLATION = "bilinear"
    _C.INPUT.TRANSFORMS = ()
    _C.INPUT.NO_TRANSFORM = False
    _C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
    _C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
    _C.INPUT.CROP_PADDING = 4
    _C.INPUT.RRCROP_SCALE = (0.08, 1.0)
    _C.INPUT.CUTOUT_N = 1
    _C.INPUT.CUTOUT_LEN = 16
    _C.INPUT.GN_MEAN = 0.0
    _C.INPUT.GN_STD = 0.15
    _C.INPUT.RANDAUGMENT_N = 2
    _C.INPUT.RANDAUGMENT_M = 10
    _C.INPUT.COLORJITTER_B = 0.4
    _C.INPUT.COLORJITTER_C = 0.4
    _C.INPUT.COLORJITTER_S = 0.4
    _C.INPUT.COLORJITTER_H = 0.1
    _C.INPUT.RGS_P = 0.2
    _C.INPUT.GB_P = 0.5
    _C.INPUT.GB_K = 21

    _C.DATASET = CN()
    _C.DATASET.ROOT = ""
    _C.DATASET.NAME = ""
    _C.DATASET.SOURCE_DOMAINS = ()
    _C.DATASET.TARGET_DOMAINS = ()
    _C.DATASET.NUM_LABELED = -1
    _C.DATASET.NUM_SHOTS = -1
    _C.DATASET.VAL_PERCENT = 0.1
    _C.DATASET.STL10_FOLD = -1
    _C.DATASET.CIFAR_C_TYPE = ""
    _C.DATASET.CIFAR_C_LEVEL = 1
    _C.DATASET.ALL_AS_UNLABELED = False

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.K_TRANSFORMS = 1
    _C.DATALOADER.RETURN_IMG0 = False
    _C.DATALOADER.TRAIN_X = CN()
    _C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
    _C.DATALOADER.TRAIN_X.BATCH_SIZE = 32
    _C.DATALOADER.TRAIN_X.N_DOMAIN = 0
    _C.DATALOADER.TRAIN_X.N_INS = 16
    _C.DATALOADER.TRAIN_U = CN()
    _C.DATALOADER.TRAIN_U.SAME_AS_X = True
    _C.DATALOADER.TRAIN_U.SAMPLER = "RandomSampler"
    _C.DATALOADER.TRAIN_U.BATCH_SIZE = 32
    _C.DATALOADER.TRAIN_U.N_DOMAIN = 0
    _C.DATALOADER.TRAIN_U.N_INS = 16
    _C.DATALOADER.TEST = CN()
    _C.DATALOADER.TEST.SAMPLER = "SequentialSampler"
    _C.DATALOADER.TEST.BATCH_SIZE = 32

    _C.MODEL = CN()
    _C.MODEL.INIT_WEIGHTS = ""
    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = ""
    _C.MODEL.BACKBONE.PRETRAINED = True
    _C.MODEL.HEAD = CN()
    _C.MODEL.HEAD.NAME = ""
    _C.MODEL.HEAD.HIDDEN_LAYERS = ()
    _C.MODEL.HEAD.ACTIVATION = "relu"
    _C.MODEL.HEAD.BN = True
    _C.MODEL.HEAD.DROPOUT = 0.0

    _C.OPTIM = CN()
    _C.OPTIM.NAME = "adam"
    _C.OPTIM.LR = 0.0003
    _C.OPTIM.WEIGHT_DECAY = 5e-4
    _C.OPTIM.MOMENTUM = 0.9
    _C.OPTIM.SGD_DAMPNING = 0
    _C.OPTIM.SGD_NESTEROV = False
    _C.OPTIM.RMSPROP_ALPHA = 0.99
    _C.OPTIM.ADAM_BETA1 = 0.9
    _C.OPTIM.ADAM_BETA2 = 0.999
    _C.OPTIM.STAGED_LR = False
    _C.OPTIM.NEW_LAYERS = ()
    _C.OPTIM.BASE_LR_MULT = 0.1
    _C.OPTIM.LR_SCHEDULER = "single_step"
    _C.OPTIM.STEPSIZE = (-1,)
    _C.OPTIM.GAMMA = 0.1
    _C.OPTIM.MAX_EPOCH = 10
    _C.OPTIM.WARMUP_EPOCH = -1
    _C.OPTIM.WARMUP_TYPE = "linear"
    _C.OPTIM.WARMUP_CONS_LR = 1e-5
    _C.OPTIM.WARMUP_MIN_LR = 1e-5
    _C.OPTIM.WARMUP_RECOUNT = True

    _C.TRAIN = CN()
    _C.TRAIN.CHECKPOINT_FREQ = 0
    _C.TRAIN.PRINT_FREQ = 10
    _C.TRAIN.COUNT_ITER = "train_x"

    _C.TEST = CN()
    _C.TEST.EVALUATOR = "Classification"
    _C.TEST.PER_CLASS_RESULT = False
    _C.TEST.COMPUTE_CMAT = False
    _C.TEST.NO_TEST = False
    _C.TEST.SPLIT = "test"
    _C.TEST.FINAL_MODEL = "last_step"

    _C.TRAINER = CN()
    _C.TRAINER.NAME = ""
    return _C


def _coop_dassl_additions(cfg: CN) -> None:
    """Keys of this package that Dassl does not have (documented in the README).

    All default to the original behaviour.
    """
    # Where few-shot subsets and generated split files are cached. "" keeps the original
    # location, the dataset's own folder; set it when the dataset root is read-only.
    cfg.DATASET.CACHE_DIR = ""
    # Folder for downloaded CLIP weights. "" = $COOP_CLIP_CACHE, else ~/.cache/clip.
    cfg.MODEL.BACKBONE.CACHE_DIR = ""
    # Opt-in: skip images that cannot be decoded (counted and logged per epoch/evaluation)
    # instead of stopping with an error that names the file.
    cfg.DATALOADER.SKIP_UNREADABLE = False

    # Speed. Every fast path below gives the plain path's numbers up to float rounding;
    # FAST.ENABLED False computes exactly what the original code computes (bit for bit).
    cfg.FAST = CN()
    cfg.FAST.ENABLED = True
    # text side: "auto" (shared-prefix encoding where the prompts share their context, except
    # on a GPU with fewer classes than GPU_SHARED_PREFIX_MIN_CLASSES; else truncation at the
    # last end-of-text token), "shared_prefix" (wherever the prompts share their context, on
    # any device), "truncate" or "plain"
    cfg.FAST.TEXT = "auto"
    # on a GPU, "auto" uses the shared prefix from this many classes on: below, a training
    # step is bound by launching operations, of which the shared prefix has ~45% more
    # (at any class count when FAST.CUDA_GRAPHS replays the step)
    cfg.FAST.GPU_SHARED_PREFIX_MIN_CLASSES = 500
    # > 0: with more classes than this, run the text encoder over chunks of this many
    # classes with activation checkpointing (bounds training memory for very many classes;
    # the shared-prefix path already needs a fraction of the plain path's memory at 1000);
    # both fast text paths (shared prefix and truncation) chunk, the plain path never does
    cfg.FAST.CLASS_CHUNK = 1024
    # ResNet image encoders run in channels-last memory format (faster convolutions)
    cfg.FAST.CHANNELS_LAST = True
    # the frozen ResNet image encoders' batch norms (eval mode) are folded into the
    # convolutions before them
    cfg.FAST.FOLD_BN = True
    # build CLIP without its random initialisers (the checkpoint overwrites their values);
    # the random state they leave behind is remembered in FAST.CACHE_DIR from the first
    # build with the same state and architecture and restored, so every later draw (the
    # context initialisation) is bit-identical
    cfg.FAST.CLIP_INIT_MEMO = True
    # cache the frozen image features of evaluation splits on disk, reused by every run,
    # seed and method that evaluates the same split with the same backbone and transform
    cfg.FAST.EVAL_FEATURE_CACHE = True
    # "" = $COOP_CACHE_DIR, else ~/.cache/coop
    cfg.FAST.CACHE_DIR = ""
    # Opt-in deviation from the protocol: precompute the image features of a fixed number
    # of augmented views per training image, so training runs the text side only.
    cfg.FAST.TRAIN_FEATURE_CACHE = False
    cfg.FAST.TRAIN_CACHE_VIEWS = 10
    # Opt-in: on a CUDA device with PREC fp16 or fp32, record the text side's forward and
    # backward (the context is its only input) and the frozen image encoder's forward as
    # CUDA graphs and replay them, removing the per-operation launch cost that bounds a
    # GPU step with a few hundred classes. Same kernels, same numbers; ignored elsewhere.
    cfg.FAST.CUDA_GRAPHS = False
    # keep DataLoader workers alive across epochs instead of starting new ones every epoch;
    # they are re-seeded each epoch exactly as new workers are, so the augmentations drawn
    # are the original's
    cfg.FAST.PERSISTENT_WORKERS = True
    # on a CPU device with glibc: large tensors reuse freed heap memory instead of a fresh
    # mmap each, which the kernel zeroes and faults in page by page (coop/fast/malloc.py);
    # once per process, from the first fast run on; $COOP_MALLOC_TUNING=0 turns it off too
    cfg.FAST.MALLOC_TUNING = True


def extend_cfg(cfg: CN) -> None:
    """The keys CoOp's ``train.py`` adds before any merge (each trainer's node comes from
    its ``add_config``)."""
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"

    # Trainers registered with an ``add_config`` hook add their own nodes.
    from coop.registry import TRAINER_REGISTRY

    for _name, cls in TRAINER_REGISTRY.items():
        hook = getattr(cls, "add_config", None)
        if callable(hook):
            hook(cfg)


def get_cfg_default() -> CN:
    """Dassl defaults + this package's additions + ``extend_cfg`` (not frozen)."""
    cfg = _dassl_defaults()
    _coop_dassl_additions(cfg)
    extend_cfg(cfg)
    return cfg


def all_keys(cfg: CN, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg`` in dotted form."""
    out: List[str] = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        if isinstance(v, CN):
            out.extend(all_keys(v, full + "."))
        else:
            out.append(full)
    return out


def _unknown_key_error(cfg: CN, key: str, where: str) -> ConfigError:
    keys = all_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        # a close match on the last component, e.g. NUM_SHOT -> DATASET.NUM_SHOTS
        last = key.split(".")[-1]
        by_last = {k.split(".")[-1]: k for k in keys}
        hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
        close = [by_last[hit[0]]] if hit else []
    msg = f"Unknown config key '{key}' in {where}"
    if close:
        msg += f"; did you mean '{close[0]}'?"
    return ConfigError(msg)


def _check_keys(root: CN, node: CN, other: Any, where: str, prefix: str = "") -> None:
    for k, v in other.items():
        full = f"{prefix}{k}"
        if k not in node:
            raise _unknown_key_error(root, full, where)
        if isinstance(v, dict) and isinstance(node[k], CN):
            _check_keys(root, node[k], v, where, full + ".")
        elif isinstance(v, dict):
            raise ConfigError(f"Config key '{full}' in {where} is a value, not a section")


def resolve_config_path(path: str, kind: str = "config") -> str:
    """Resolve a YAML path: as given (relative to the working directory), else inside the
    shipped ``coop.configs`` package (so ``configs/trainers/CoOp/rn50.yaml`` works from any
    folder). Raises :class:`ConfigError` naming both places when neither exists."""
    if os.path.isfile(path):
        return path
    norm = path.replace("\\", "/")
    rel = norm.split("configs/", 1)[1] if "configs/" in norm else norm
    shipped = os.path.join(_configs_dir(), rel)
    if os.path.isfile(shipped):
        return shipped
    raise ConfigError(
        f"The {kind} file '{path}' does not exist (looked in {os.path.abspath(path)} "
        f"and in the shipped configs at {shipped})"
    )


def _configs_dir() -> str:
    import coop.configs

    return os.path.dirname(os.path.abspath(coop.configs.__file__))


def merge_from_file(cfg: CN, path: str, kind: str = "config") -> str:
    """Merge a YAML file into ``cfg`` after checking every key; returns the resolved path."""
    import yaml

    resolved = resolve_config_path(path, kind)
    try:
        with open(resolved, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"The {kind} file '{resolved}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"The {kind} file '{resolved}' must hold a mapping of config keys")
    _check_keys(cfg, cfg, data, f"'{resolved}'")
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(f"Bad value in '{resolved}': {e}") from None
    return resolved


def merge_from_list(cfg: CN, opts: Sequence[str], where: str = "the command-line opts") -> None:
    """Merge trailing ``KEY VALUE`` pairs after checking each key (yacs ``merge_from_list``)."""
    opts = list(opts or [])
    if len(opts) % 2 != 0:
        raise ConfigError(
            f"Config overrides in {where} must be KEY VALUE pairs; got an odd number of items: {opts}"
        )
    keys = all_keys(cfg)
    for key, value in zip(opts[0::2], opts[1::2]):
        if key not in keys:
            raise _unknown_key_error(cfg, key, where)
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, KeyError, AssertionError) as e:
            raise ConfigError(f"Bad value for '{key}' in {where}: {e}") from None


def iter_yaml_files() -> Iterable[str]:
    """Every YAML file shipped under ``coop.configs`` (sorted)."""
    base = _configs_dir()
    for dirpath, _dirs, files in os.walk(base):
        for name in sorted(files):
            if name.endswith(".yaml"):
                yield os.path.join(dirpath, name)
