"""``coop-interpret``: the vocabulary words nearest to each learned context vector (the
original ``interpret_prompt.py``).

    coop-interpret output/caltech101/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1 5
    coop-interpret path/to/prompt_learner/model.pth.tar-200 3 --metric cosine

The run is an output folder of ``coop-train`` (its ``prompt_learner`` checkpoint named by
``--load-epoch``, else by the ``checkpoint`` pointer, else ``model-best.pth.tar``, else the
last epoch's) or a checkpoint file. The CLIP model (``--backbone``, given as ``coop-train``
takes it) defaults to the one recorded in the run's ``results.json``, else RN50 as in the
original. Distances are Euclidean in the token-embedding space, as in the paper
(``--metric cosine``: one minus the cosine similarity). A unified context gives one line per
position; a class-specific one gives the positions of every class. The words are the raw BPE
strings (``photo</w>``); the result is also written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from coop.io import CheckpointError

METRICS = ("euclidean", "cosine")
ROW_CHUNK = 256  # context vectors per distance block (a CSC context of 1000 classes is 16,000)


def find_checkpoint(path: str, load_epoch: Optional[int] = None) -> str:
    """The prompt-learner checkpoint file of a run folder (or ``path`` itself, a file)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a run folder")
    folder = os.path.join(path, "prompt_learner")
    folder = folder if os.path.isdir(folder) else path
    if load_epoch is not None:
        wanted = os.path.join(folder, f"model.pth.tar-{load_epoch}")
        if os.path.isfile(wanted):
            return wanted
        raise FileNotFoundError(f"No checkpoint {wanted} (--load-epoch {load_epoch})")
    pointer = os.path.join(folder, "checkpoint")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            named = os.path.join(folder, f.readline().strip())
        if os.path.isfile(named):
            return named
    best = os.path.join(folder, "model-best.pth.tar")
    if os.path.isfile(best):
        return best
    epochs = glob.glob(os.path.join(glob.escape(folder), "model.pth.tar-*"))
    epochs = [p for p in epochs if re.search(r"-\d+$", p)]
    if epochs:
        return max(epochs, key=lambda p: int(p.rsplit("-", 1)[1]))
    raise FileNotFoundError(
        f"No prompt-learner checkpoint in {folder} (looked for the 'checkpoint' pointer, "
        "model-best.pth.tar and model.pth.tar-N)"
    )


def run_backbone(path: str, checkpoint: str) -> Optional[str]:
    """The backbone the run's ``results.json`` records (the run folder given, or the one
    holding the checkpoint's model folder)."""
    folders = [path] if os.path.isdir(path) else []
    folders.append(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))))
    for folder in folders:
        results = os.path.join(folder, "results.json")
        if os.path.isfile(results):
            with open(results, encoding="utf-8") as f:
                backbone = json.load(f).get("backbone")
            if backbone:
                return str(backbone)
    return None


def load_context(checkpoint: str) -> torch.Tensor:
    """The learned context ``ctx`` of a checkpoint, float32: (M, D) or (n_cls, M, D)."""
    from coop.io import load_checkpoint

    state_dict = load_checkpoint(checkpoint)["state_dict"]
    ctx = state_dict.get("ctx")
    if not isinstance(ctx, torch.Tensor):
        raise CheckpointError(
            f"{checkpoint} has no 'ctx' (the learned context of a CoOp prompt learner); "
            f"its weights are {sorted(state_dict)}"
        )
    if ctx.dim() not in (2, 3):
        raise CheckpointError(
            f"'ctx' in {checkpoint} has shape {tuple(ctx.shape)}: expected (n_ctx, dim) or "
            "(n_cls, n_ctx, dim)"
        )
    return ctx.float()


def nearest_words(
    ctx: torch.Tensor, embedding: torch.Tensor, topk: int, metric: str = "euclidean"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``ctx`` (N, D): the indices (N, k) of its ``topk`` nearest rows of
    ``embedding`` (V, D) and their distances (N, k), nearest first."""
    idx, dist = [], []
    emb_unit = F.normalize(embedding, dim=-1) if metric == "cosine" else None
    for rows in ctx.split(ROW_CHUNK):
        if metric == "cosine":
            d = 1 - F.normalize(rows, dim=-1) @ emb_unit.t()
        else:  # exact differences, not the matmul expansion (a copied token is at 0)
            d = torch.cdist(rows, embedding, compute_mode="donot_use_mm_for_euclid_dist")
        order = torch.sort(d, dim=1, stable=True).indices[:, :topk]
        idx.append(order)
        dist.append(d.gather(1, order))
    return torch.cat(idx), torch.cat(dist)


def interpret(
    ctx: torch.Tensor, embedding: torch.Tensor, topk: int, metric: str, decoder: Dict[int, str]
) -> List[List[Dict[str, Any]]]:
    """Per class (one group for a unified context), per position: words and distances."""
    if ctx.shape[-1] != embedding.shape[1]:
        raise ValueError(f"context width {ctx.shape[-1]} != embedding width {embedding.shape[1]}")
    groups = ctx.unsqueeze(0) if ctx.dim() == 2 else ctx
    n_cls, n_ctx, dim = groups.shape
    idx, dist = nearest_words(groups.reshape(-1, dim), embedding, topk, metric)
    out = []
    for c in range(n_cls):
        positions = []
        for m in range(n_ctx):
            row = c * n_ctx + m
            positions.append(
                {
                    "position": m + 1,
                    "words": [decoder[int(i)] for i in idx[row]],
                    "distances": [float(d) for d in dist[row]],
                }
            )
        out.append(positions)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-interpret", description="Nearest vocabulary words of a learned context."
    )
    p.add_argument("path", help="a coop-train output folder or a prompt_learner checkpoint file")
    p.add_argument("topk", type=int, nargs="?", default=5, help="words per context vector")
    p.add_argument("--backbone", default="", help="CLIP model name or checkpoint path")
    p.add_argument("--metric", choices=METRICS, default="euclidean")
    p.add_argument("--load-epoch", type=int, default=None, help="model.pth.tar-N of the run")
    p.add_argument("--output", default="nearest_words.json", help="the JSON file to write")
    return p


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from coop.clip_adapter import get_tokenizer, load_clip
    from coop.io import atomic_write_json

    if args.topk < 1:
        raise ValueError(f"topk must be at least 1, got {args.topk}")
    checkpoint = find_checkpoint(args.path, args.load_epoch)
    ctx = load_context(checkpoint)  # before CLIP is loaded: a wrong file stops early
    backbone = args.backbone or run_backbone(args.path, checkpoint) or "RN50"
    embedding = load_clip(backbone).token_embedding.weight.detach().float()  # (V, D)
    if ctx.shape[-1] != embedding.shape[1]:
        raise CheckpointError(
            f"The context vectors of {checkpoint} are {ctx.shape[-1]}-wide, but the token "
            f"embeddings of CLIP {backbone!r} are {embedding.shape[1]}-wide: pass the backbone "
            "the run was trained with (--backbone)"
        )
    print(f"Return the top-{args.topk} matched words")
    print(f"Size of token embedding: {embedding.shape}")
    print(f"Size of context: {ctx.shape}")
    groups = interpret(ctx, embedding, args.topk, args.metric, get_tokenizer().decoder)
    for c, positions in enumerate(groups):
        if ctx.dim() == 3:
            print(f"Class {c}:")
        for pos in positions:
            dist = [f"{d:.4f}" for d in pos["distances"]]
            print(f"{pos['position']}: {pos['words']} {dist}")
    result = {
        "checkpoint": os.path.abspath(checkpoint),
        "backbone": backbone,
        "metric": args.metric,
        "topk": args.topk,
        "class_specific": ctx.dim() == 3,
        "classes" if ctx.dim() == 3 else "positions": groups if ctx.dim() == 3 else groups[0],
    }
    atomic_write_json(args.output, result, indent=2)
    print(f"Written: {args.output}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except Exception as e:
        from coop.validation import is_user_error, user_message

        if not (is_user_error(e) or type(e) is ValueError):
            raise
        print(f"coop-interpret: error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
