"""The main job: CoOp against zero-shot CLIP on one dataset, ending in a results table.

With no dataset root given it runs on embedded demo data: a generated miniature in
Caltech101's real layout and a tiny random CLIP checkpoint in OpenAI's format, both made by
:mod:`coop.testing` (nothing is downloaded), and says so. With ``--root`` (and optionally
``--backbone``) it runs the paper's protocol for real:

    coop-demo --root /path/to/datasets --backbone RN50 --shots 16
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
from typing import Dict, List, Optional

from coop.train import build_parser, run


def _epochs_for(shots: int) -> str:
    """The paper's schedule: 1 shot -> 50 epochs, 2/4 shots -> 100, 8/16 shots -> 200."""
    if shots <= 1:
        return "_ep50"
    if shots <= 4:
        return "_ep100"
    return ""


_BACKBONE_CFG = {"RN50": "rn50", "RN101": "rn101", "ViT-B/32": "vit_b32", "ViT-B/16": "vit_b16"}


def _run(argv: List[str]) -> Dict:
    args = build_parser().parse_args(argv)
    trainer = run(args)
    with open(osp.join(args.output_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    del trainer
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="coop-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="", help="dataset root (omit to use the embedded demo data)")
    p.add_argument("--backbone", default="", help="CLIP backbone name or checkpoint path")
    p.add_argument("--dataset", default="caltech101", help="dataset config stem")
    p.add_argument("--shots", type=int, default=None, help="shots per class")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--epochs", type=int, default=None, help="override OPTIM.MAX_EPOCH")
    args = p.parse_args(argv)

    out = osp.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    demo = not args.root
    common_opts: List[str] = []
    if demo:
        from coop.testing.fixtures import make_caltech101
        from coop.testing.pretrain import save_learnable_tiny_clip

        print(
            "No dataset root given: running on the embedded demo data (a generated "
            "Caltech101-layout miniature and a tiny random CLIP; nothing is downloaded).\n"
            "Pass --root /path/to/datasets [--backbone RN50] for a real run.\n",
            flush=True,
        )
        root = make_caltech101(osp.join(out, "data"), n_classes=10, n_per_class=20)
        dataset_dir = osp.join(root, "caltech-101")
        backbone = args.backbone or save_learnable_tiny_clip(
            osp.join(out, "tiny_clip_vit.pt"),
            osp.join(dataset_dir, "split_zhou_Caltech101.json"),
            osp.join(dataset_dir, "101_ObjectCategories"),
        )
        dataset = "caltech101"
        shots = args.shots or 16
        cfg_name = "rn50_ep50"
        epochs = args.epochs
        common_opts += ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]
    else:
        root = args.root
        backbone = args.backbone or "RN50"
        dataset = args.dataset
        shots = args.shots or 16
        cfg_name = _BACKBONE_CFG.get(backbone, "rn50") + _epochs_for(shots)
        epochs = args.epochs
    if epochs is not None:
        common_opts += ["OPTIM.MAX_EPOCH", str(epochs)]
    base = [
        "--root",
        root,
        "--dataset-config-file",
        f"configs/datasets/{dataset}.yaml",
        "--config-file",
        f"configs/trainers/CoOp/{cfg_name}.yaml",
    ]
    bb = ["MODEL.BACKBONE.NAME", backbone]

    zs = _run(
        base
        + ["--trainer", "ZeroshotCLIP", "--eval-only", "--output-dir", osp.join(out, "zeroshot")]
        + bb
        + common_opts
    )
    prec = ["TRAINER.COOP.PREC", "fp32"] if demo else []
    coop_dir = osp.join(out, f"coop_{shots}shots", f"seed{args.seed}")
    co = _run(
        base
        + ["--seed", str(args.seed), "--trainer", "CoOp", "--output-dir", coop_dir]
        + bb
        + ["DATASET.NUM_SHOTS", str(shots)]
        + prec
        + common_opts
    )

    rows = [("Zero-shot CLIP", zs), (f"CoOp ({shots} shots, seed {args.seed})", co)]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"Results on {co['dataset']} ({'demo data' if demo else root}), test split")
    print(f"{'method':<{width}}  accuracy  macro_f1")
    for name, res in rows:
        m = res["metrics"]
        print(f"{name:<{width}}  {m['accuracy']:7.1f}%  {m['macro_f1']:7.1f}%")
    print(f"\nOutputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
