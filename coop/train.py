"""``coop-train``: the original ``train.py`` command line, unchanged.

    coop-train --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/caltech101.yaml \
        --config-file configs/trainers/CoOp/rn50.yaml \
        --output-dir output/caltech101/seed1 DATASET.NUM_SHOTS 16

Config merge order: defaults -> dataset YAML -> method YAML -> command-line arguments ->
trailing opts -> freeze. One deliberate difference from the original: ``--seed 0`` seeds the
run with 0 (the original silently ignored it and ran unseeded).

Bad input stops the run before any model is loaded where it can be known then (config
values and combinations, the output folder, ``--model-dir`` files and their context shape,
the dataset folder), and later with a message that names the file, epoch or batch. Every
such error prints exactly one line ``coop-train: error: ...`` to stderr (also recorded in
the run's log file) and exits with status 2.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
from typing import Any, List, Optional

import torch

from coop.config import get_cfg_default, merge_from_file, merge_from_list
from coop.utils import close_logger, collect_env_info, set_random_seed, setup_logger

logger = logging.getLogger("coop.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-train", description="Train or evaluate CoOp-style trainers (Dassl protocol)."
    )
    p.add_argument("--root", type=str, default="", help="path to dataset")
    p.add_argument("--output-dir", type=str, default="", help="output directory")
    p.add_argument(
        "--resume",
        type=str,
        default="",
        help="checkpoint directory (from which the training resumes)",
    )
    p.add_argument("--seed", type=int, default=-1, help="a non-negative value fixes the seed")
    p.add_argument("--source-domains", type=str, nargs="+", help="source domains for DA/DG")
    p.add_argument("--target-domains", type=str, nargs="+", help="target domains for DA/DG")
    p.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    p.add_argument("--config-file", type=str, default="", help="path to config file")
    p.add_argument(
        "--dataset-config-file", type=str, default="", help="path to config file for dataset setup"
    )
    p.add_argument("--trainer", type=str, default="", help="name of trainer")
    p.add_argument("--backbone", type=str, default="", help="name of CNN backbone")
    p.add_argument("--head", type=str, default="", help="name of head")
    p.add_argument("--eval-only", action="store_true", help="evaluation only")
    p.add_argument(
        "--model-dir",
        type=str,
        default="",
        help="load model from this directory for eval-only mode",
    )
    p.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    p.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    p.add_argument(
        "--engine",
        choices=("bundled", "dassl"),
        default="bundled",
        help="the engine that runs the trainer: this package's own (default) or an installed "
        "Dassl's (its data manager, transforms, samplers, evaluator, optimizer, scheduler and "
        "checkpoints)",
    )
    p.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="modify config options using the command-line",
    )
    return p


def reset_cfg(cfg, args: argparse.Namespace) -> None:
    """Copy command-line values into the config (only those that were given)."""
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed is not None and args.seed >= 0:
        cfg.SEED = args.seed
    if args.source_domains:
        cfg.DATASET.SOURCE_DOMAINS = args.source_domains
    if args.target_domains:
        cfg.DATASET.TARGET_DOMAINS = args.target_domains
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    if args.trainer:
        cfg.TRAINER.NAME = args.trainer
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.head:
        cfg.MODEL.HEAD.NAME = args.head


def setup_cfg(args: argparse.Namespace, base: Any = None):
    """defaults (``base``, else this package's) -> dataset YAML -> method YAML -> CLI
    arguments -> opts -> freeze."""
    cfg = get_cfg_default() if base is None else base
    if args.dataset_config_file:
        merge_from_file(cfg, args.dataset_config_file, kind="dataset config")
    if args.config_file:
        merge_from_file(cfg, args.config_file, kind="config")
    reset_cfg(cfg, args)
    merge_from_list(cfg, args.opts or [])
    from coop.validation import validate_cfg

    validate_cfg(cfg, dassl=getattr(args, "engine", "bundled") == "dassl")
    cfg.freeze()
    return cfg


def prepare_output_dir(path: str) -> None:
    """Create the output folder, or fail with one clear message (a file in the way, no
    permission, ...)."""
    from coop.io import WriteError, remove_stale_temp_files

    if not path or path.endswith((".txt", ".log")):  # setup_logger: a log file path
        return
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as e:
        raise WriteError(
            e.errno, f"Cannot create the output folder {path}: a file with that name exists"
        ) from None
    except OSError as e:
        detail = e.strerror or str(e)
        if isinstance(e, NotADirectoryError):
            detail += " (a part of the path is a regular file)"
        raise WriteError(e.errno, f"Cannot create the output folder {path}: {detail}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WriteError(13, f"Cannot write into the output folder {path}: permission denied")
    remove_stale_temp_files(path)  # e.g. a results.json write that a kill interrupted


def _epoch_of(fname: str) -> int:
    m = re.search(r"-(\d+)$", fname)
    return int(m.group(1)) if m else -1


def check_model_dir(model_dir: str, load_epoch: Optional[int]) -> List[str]:
    """For ``--eval-only --model-dir``: the checkpoint files to load
    (``<model_dir>/<model name>/model-best.pth.tar`` or ``model.pth.tar-<load_epoch>``).

    Raises ``FileNotFoundError`` naming the folder and the files that are there."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model-dir {model_dir} does not exist or is not a folder")
    model_file = "model-best.pth.tar" if load_epoch is None else f"model.pth.tar-{load_epoch}"
    found = sorted(glob.glob(os.path.join(glob.escape(model_dir), "*", model_file)))
    if found:
        return found
    available = [
        os.path.relpath(p, model_dir)
        for pattern in ("model.pth.tar-*", "model-best.pth.tar")
        for p in glob.glob(os.path.join(glob.escape(model_dir), "*", pattern))
    ]
    available.sort(key=lambda p: (os.path.dirname(p), _epoch_of(p), p))
    listed = ", ".join(available) if available else "no checkpoint files at all"
    hint = "" if load_epoch is not None else " (pass --load-epoch N to load model.pth.tar-N)"
    raise FileNotFoundError(
        f"No checkpoint {model_file} in --model-dir {model_dir} (looked for "
        f"{os.path.join(model_dir, '<model name>', model_file)}); available: {listed}{hint}"
    )


def run(args: argparse.Namespace):
    """Build the trainer from ``args`` and run it; returns the trainer."""
    from coop.registry import build_trainer

    if getattr(args, "engine", "bundled") == "dassl":
        return run_on_dassl(args)
    cfg = prepare_run(args)
    setup_logger(cfg.OUTPUT_DIR)

    logger.info("***************")
    logger.info("** Arguments **")
    logger.info("***************")
    for key in sorted(vars(args)):
        logger.info(f"{key}: {getattr(args, key)}")
    logger.info("************")
    logger.info("** Config **")
    logger.info("************")
    logger.info(cfg)
    logger.info("Collecting env info ...")
    logger.info(f"** System info **\n{collect_env_info()}\n")
    return drive(build_trainer(cfg, model_files(args)), args)


def prepare_run(args: argparse.Namespace, base: Any = None) -> Any:
    """The steps before any log or model, on either engine: the config (from ``base``
    defaults), the seed, the output folder and cuDNN's autotuner on CUDA."""
    cfg = setup_cfg(args, base=base)
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED)
    prepare_output_dir(cfg.OUTPUT_DIR)
    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True
    return cfg


def model_files(args: argparse.Namespace) -> List[str]:
    """For ``--eval-only --model-dir``: the checkpoint files the trainer will load."""
    if args.eval_only and args.model_dir:
        return check_model_dir(args.model_dir, args.load_epoch)
    return []


def drive(trainer: Any, args: argparse.Namespace) -> Any:
    """What the original ``train.py`` does with a built trainer: evaluate the model of
    ``--model-dir`` (``--eval-only``), or train (unless ``--no-train``)."""
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
    elif not args.no_train:
        trainer.train()
    return trainer


def run_on_dassl(args: argparse.Namespace):
    """``run`` on an installed Dassl's engine, as Dassl's ``tools/train.py`` runs a trainer:
    Dassl's config defaults (with this package's keys), its ``setup_logger`` (a tee of
    stdout into ``log.txt``) and its ``build_trainer``."""
    from coop.dassl_bridge import dassl_log, extend_dassl_cfg, import_dassl, register_into_dassl

    import_dassl()
    from dassl.config import get_cfg_default as dassl_cfg_default
    from dassl.engine import TRAINER_REGISTRY as DASSL_TRAINERS
    from dassl.engine import build_trainer

    cfg = prepare_run(args, base=extend_dassl_cfg(dassl_cfg_default()))
    checkpoints = model_files(args)
    close_logger()  # Dassl's log takes this package's lines (coop.dassl_bridge.attach_logging)
    with dassl_log(cfg.OUTPUT_DIR):
        try:
            print("** Engine: Dassl **")
            register_into_dassl()
            print("***************\n** Arguments **\n***************")
            for key in sorted(vars(args)):
                print(f"{key}: {getattr(args, key)}")
            print(f"************\n** Config **\n************\n{cfg}")
            cls = DASSL_TRAINERS.get(cfg.TRAINER.NAME)
            if checkpoints and hasattr(cls, "for_checkpoints"):
                return drive(cls.for_checkpoints(cfg, checkpoints), args)
            return drive(build_trainer(cfg), args)
        except Exception as e:
            from coop.validation import is_user_error, user_message

            if is_user_error(e):  # why the run stopped, in its log too
                print(f"Error: {user_message(e)}")
            raise


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Exception as e:
        from coop.validation import is_user_error, user_message

        if not is_user_error(e):
            raise
        msg = user_message(e)
        log = logging.getLogger("coop")
        if log.handlers:  # a run's log file is open: record why it stopped
            for h in log.handlers:
                if isinstance(h, logging.FileHandler):
                    h.emit(
                        logging.makeLogRecord({"msg": f"Error: {msg}", "levelno": logging.ERROR})
                    )
        print(f"coop-train: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
