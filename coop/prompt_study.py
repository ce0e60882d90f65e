"""``coop-prompts``: zero-shot CLIP with hand-crafted prompt templates, dataset x template.

    coop-prompts --root DATA --dataset caltech101 --dataset oxford_pets --backbone RN50 \
        [--template "a photo of a [CLASS]." ...] [--output-dir prompt_study] [opts]

Each dataset is built as ``coop-train --trainer ZeroshotCLIP`` builds it (its dataset YAML,
``--config-file`` for the transform and backbone, default CoOp's ``rn50.yaml``, then the
trailing opts); its test-split image features are computed once (through the feature cache)
and each template's class text features once, by the zero-shot trainer's own code, so every
cell equals the accuracy of a zero-shot run with that template. The table is printed and
written as ``prompt_study.json`` and ``prompt_study.md`` in ``--output-dir``.

A template is text with ``[CLASS]`` (or ``{}``) where the class name goes; ``dataset`` is
each dataset's own template (ZeroshotCLIP's) and ``ensemble`` the ImageNet prompt ensemble
(ZeroshotCLIP2's: seven ImageNet templates plus the dataset's own).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from coop.config import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = [
    "a [CLASS].",
    "a photo of [CLASS].",
    "a photo of a [CLASS].",
    "dataset",
    "ensemble",
]
LABELS = {"dataset": "dataset's own", "ensemble": "ImageNet ensemble"}


def template_list(spec: str, dataset_name: str) -> List[str]:
    """The ``{}`` templates a column stands for on a dataset."""
    from coop.trainers.zsclip import dataset_template, ensemble_templates

    if spec == "dataset":
        return [dataset_template(dataset_name)]
    if spec == "ensemble":
        return ensemble_templates(dataset_name)
    text = spec.replace("[CLASS]", "{}")
    if text.count("{}") != 1 or "{" in text.replace("{}", ""):
        raise ConfigError(
            f"--template {spec!r} must contain [CLASS] (or {{}}) exactly once, where the "
            "class name goes (or be 'dataset' or 'ensemble')"
        )
    return [text]


def dataset_config(name: str) -> str:
    """A dataset YAML from a config stem (``oxford_pets``) or a DATASET.NAME (``OxfordPets``)."""
    from coop.config import _configs_dir

    folder = os.path.join(_configs_dir(), "datasets")
    stem = os.path.join(folder, f"{name}.yaml")
    if os.path.isfile(stem):
        return stem
    import yaml

    known = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            dataset_name = (yaml.safe_load(f) or {}).get("DATASET", {}).get("NAME", "")
        if dataset_name.lower() == name.lower():
            return path
        known.append(os.path.splitext(os.path.basename(path))[0])
    raise ConfigError(f"Unknown dataset {name!r}; choose from {', '.join(known)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-prompts", description="Zero-shot CLIP accuracy of prompt templates."
    )
    p.add_argument("--root", default="", help="path to the datasets")
    p.add_argument(
        "--dataset-config-file", action="append", default=[], help="dataset YAML (repeatable)"
    )
    p.add_argument(
        "--dataset", action="append", default=[], help="dataset config stem or name (repeatable)"
    )
    p.add_argument(
        "--config-file",
        default="configs/trainers/CoOp/rn50.yaml",
        help="trainer YAML: the test transform, batch size and default backbone",
    )
    p.add_argument("--backbone", default="", help="CLIP backbone name or checkpoint path")
    p.add_argument(
        "--template",
        action="append",
        default=[],
        help="a template with [CLASS], or 'dataset' / 'ensemble' (repeatable; default: "
        + "; ".join(DEFAULT_TEMPLATES)
        + ")",
    )
    p.add_argument("--output-dir", default="prompt_study", help="where the table is written")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    return p


def evaluate_dataset(
    dataset_file: str, args: argparse.Namespace, specs: List[str]
) -> Tuple[Any, Dict[str, float], Dict[str, List[str]]]:
    """(config, accuracy per template column, the templates of each column) on one
    dataset's test split."""
    from coop.fast.trainer_caches import split_features
    from coop.registry import build_trainer
    from coop.train import build_parser as train_parser
    from coop.train import prepare_run

    argv = ["--root", args.root, "--trainer", "ZeroshotCLIP"]
    argv += ["--dataset-config-file", dataset_file, "--config-file", args.config_file]
    argv += ["--backbone", args.backbone] if args.backbone else []
    cfg = prepare_run(train_parser().parse_args([*argv, "OUTPUT_DIR", "", *(args.opts or [])]))
    trainer = build_trainer(cfg)
    templates = {spec: template_list(spec, cfg.DATASET.NAME) for spec in specs}
    with torch.inference_mode():
        features, labels = split_features(trainer, "test", trainer.test_loader)
        accuracy = {}
        for spec, tmpl in templates.items():
            trainer.text_features = trainer.encode_templates(tmpl)
            trainer.evaluator.reset()
            for feats, label in zip(features, labels):
                logits = trainer.logits_from_features(feats.to(trainer.device))
                trainer.evaluator.process(logits, label.to(trainer.device))
            accuracy[spec] = float(trainer.evaluator.evaluate()["accuracy"])
    return cfg, accuracy, templates


def markdown(table: Dict[str, Any]) -> str:
    cols = table["columns"]
    lines = [
        "| dataset | " + " | ".join(c["label"] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for r in table["rows"]:
        cells = [f"{r['accuracy'][c['spec']]:.2f}" for c in cols]
        lines.append(f"| {r['dataset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate every template on every dataset; returns the table (also written)."""
    from coop.io import atomic_write_json, atomic_write_text

    files = list(args.dataset_config_file) + [dataset_config(d) for d in args.dataset]
    if not files:
        raise ConfigError("No dataset given: pass --dataset NAME or --dataset-config-file")
    specs = list(dict.fromkeys(args.template or DEFAULT_TEMPLATES))
    for spec in specs:  # a bad template stops before any model is loaded
        template_list(spec, "")
    rows, backbone = [], ""
    for path in files:
        cfg, accuracy, templates = evaluate_dataset(path, args, specs)
        backbone = cfg.MODEL.BACKBONE.NAME
        rows.append({"dataset": cfg.DATASET.NAME, "accuracy": accuracy, "templates": templates})
        logger.info(f"{cfg.DATASET.NAME}: {accuracy}")
    columns = [{"spec": s, "label": LABELS.get(s, s)} for s in specs]
    table = {"backbone": backbone, "split": "test", "columns": columns, "rows": rows}
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_json(os.path.join(args.output_dir, "prompt_study.json"), table, indent=2)
    atomic_write_text(os.path.join(args.output_dir, "prompt_study.md"), markdown(table))
    return table


def format_table(table: Dict[str, Any]) -> str:
    cols = [c["label"] for c in table["columns"]]
    names = [r["dataset"] for r in table["rows"]]
    first = max(len("dataset"), *(len(n) for n in names))
    widths = [max(7, len(c)) for c in cols]
    head = "  ".join([f"{'dataset':<{first}}", *(f"{c:>{w}}" for c, w in zip(cols, widths))])
    out = [f"Zero-shot CLIP ({table['backbone']}), test accuracy (%)", head]
    for r in table["rows"]:
        cells = [f"{r['accuracy'][c['spec']]:>{w}.2f}" for c, w in zip(table["columns"], widths)]
        out.append("  ".join([f"{r['dataset']:<{first}}", *cells]))
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        table = run(args)
    except Exception as e:
        from coop.validation import is_user_error, user_message

        if not is_user_error(e):
            raise
        print(f"coop-prompts: error: {user_message(e)}", file=sys.stderr)
        return 2
    print(format_table(table))
    print(f"\nWritten: {os.path.join(args.output_dir, 'prompt_study.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
