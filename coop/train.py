"""``coop-train``: the original ``train.py`` command line, unchanged.

    coop-train --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/caltech101.yaml \
        --config-file configs/trainers/CoOp/rn50.yaml \
        --output-dir output/caltech101/seed1 DATASET.NUM_SHOTS 16

Config merge order: defaults -> dataset YAML -> method YAML -> command-line arguments ->
trailing opts -> freeze. One deliberate difference from the original: ``--seed 0`` seeds the
run with 0 (the original silently ignored it and ran unseeded).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import torch

from coop.config import ConfigError, get_cfg_default, merge_from_file, merge_from_list
from coop.utils import collect_env_info, set_random_seed, setup_logger

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


def setup_cfg(args: argparse.Namespace):
    """defaults -> dataset YAML -> method YAML -> CLI arguments -> opts -> freeze."""
    cfg = get_cfg_default()
    if args.dataset_config_file:
        merge_from_file(cfg, args.dataset_config_file, kind="dataset config")
    if args.config_file:
        merge_from_file(cfg, args.config_file, kind="config")
    reset_cfg(cfg, args)
    merge_from_list(cfg, args.opts or [])
    from coop.validation import validate_cfg

    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def run(args: argparse.Namespace):
    """Build the trainer from ``args`` and run it; returns the trainer."""
    from coop.registry import build_trainer

    cfg = setup_cfg(args)
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED)
    setup_logger(cfg.OUTPUT_DIR)

    if torch.cuda.is_available() and cfg.USE_CUDA:
        torch.backends.cudnn.benchmark = True

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

    trainer = build_trainer(cfg)
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
        return trainer
    if not args.no_train:
        trainer.train()
    return trainer


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as e:
        from coop.validation import is_user_error

        if not is_user_error(e):
            raise
        log = logging.getLogger("coop")
        if log.handlers:  # a run's log file is open: record why it stopped
            for h in log.handlers:
                if isinstance(h, logging.FileHandler):
                    h.emit(logging.makeLogRecord({"msg": f"Error: {e}", "levelno": logging.ERROR}))
        print(f"coop-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
