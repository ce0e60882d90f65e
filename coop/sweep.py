"""``coop-sweep``: the paper's few-shot grid (datasets x shot counts x seeds) in one process.

Each run is exactly the ``coop-train`` run that ``scripts/main.sh`` starts for the same
dataset, config, shot count and seed, with the same output folder
(``<output>/<dataset>/CoOp/<cfg>_<shots>shots/nctx<N>_csc<CSC>_ctp<CTP>/seed<S>``), the same
skipping of finished runs and resuming of unfinished ones. Running them in one Python
process saves what every new process pays before its first step: importing torch and
torchvision (about 4 s on a CPU, more with CUDA's start-up), which for short runs (few
shots, the opt-in training feature cache) can exceed the run itself. Every run re-seeds all
generators and builds its trainer from scratch, so the numbers equal separate processes'.

By default the config file follows the paper's schedule for the backbone (``--backbone
rn50``: 1 shot ``rn50_ep50``, 2 and 4 shots ``rn50_ep100``, 8 and 16 shots ``rn50``;
ImageNet always ``*_ep50``); ``--cfg NAME`` uses one file for every run. ``--zeroshot`` also
runs the zero-shot CLIP baseline of each dataset first, as ``scripts/zeroshot.sh`` does
(``<output>/ZeroshotCLIP/<backbone>/<dataset>``, skipped when its ``results.json`` exists).
At the end it prints, per dataset, config and shot count, the mean and standard deviation
of the seeds' test accuracy in ``parse_test_res.py``'s form (``np.std``, population), from
each run's ``results.json`` at full precision (``coop-parse`` reads the logs' one-decimal
values, as ``parse_test_res.py`` does, so the second decimal can differ).

    coop-sweep --root /path/to/datasets --datasets caltech101,oxford_pets
    coop-sweep --root DATA --datasets imagenet --shots 16 --backbone vit_b16 --dry-run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

PAPER_SHOTS = (1, 2, 4, 8, 16)
PAPER_SEEDS = (1, 2, 3)
TRAINER = "CoOp"
ZEROSHOT = "ZeroshotCLIP"


def paper_cfg(backbone: str, shots: int, dataset: str) -> str:
    """The trainer config the paper uses for ``shots`` (COOP.md): 1 shot -> ``*_ep50``,
    2 and 4 shots -> ``*_ep100``, 8 and 16 shots -> the 200-epoch file; ImageNet always
    ``*_ep50``."""
    if dataset == "imagenet" or shots == 1:
        return f"{backbone}_ep50"
    if shots in (2, 4):
        return f"{backbone}_ep100"
    return backbone


@dataclass
class Run:
    dataset: str
    cfg: str
    shots: int  # 0 for the zero-shot baseline
    seed: int
    out: str
    argv: List[str]
    trainer: str = TRAINER

    @property
    def group(self) -> Tuple[str, str, int]:
        return self.dataset, self.cfg, self.shots

    @property
    def label(self) -> str:
        if self.trainer == ZEROSHOT:
            return f"{self.dataset} {ZEROSHOT} {self.cfg}"
        return f"{self.dataset} {self.cfg} {self.shots} shots"

    def done_file(self) -> str:
        """The file whose presence means the run is complete: main.sh's ``finished`` marker
        for training, the evaluation's ``results.json`` for the zero-shot baseline."""
        from coop.engine import FINISHED_MARKER

        return os.path.join(
            self.out, "results.json" if self.trainer == ZEROSHOT else FINISHED_MARKER
        )


class SweepError(ValueError):
    """A bad sweep argument, reported before any run starts."""


def _int_list(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise SweepError(f"--{what} is empty")
    return values


def plan_runs(args: argparse.Namespace) -> List[Run]:
    """Every run of the grid, in order (dataset, then shot count, then seed); raises
    :class:`SweepError` for anything that would make a run fail at once."""
    from coop.config import (
        ConfigError,
        get_cfg_default,
        merge_from_list,
        resolve_config_path,
    )

    if not os.path.isdir(args.root):
        raise SweepError(f"--root {args.root}: no such folder")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not datasets:
        raise SweepError("--datasets is empty")
    shots = _int_list(args.shots, "shots")
    if any(s < 1 for s in shots):
        raise SweepError(f"--shots must be positive, got {args.shots}")
    seeds = _int_list(args.seeds, "seeds")
    if args.csc not in ("False", "True"):
        raise SweepError(f"--csc is False or True, got {args.csc!r}")
    if args.ctp not in ("end", "middle", "front"):
        raise SweepError(f"--ctp is end, middle or front, got {args.ctp!r}")
    if args.nctx < 1:
        raise SweepError(f"--nctx must be positive, got {args.nctx}")
    try:
        merge_from_list(get_cfg_default(), args.opts, where="the sweep's opts")
    except ConfigError as e:
        raise SweepError(str(e)) from None

    runs: List[Run] = []
    for dataset in datasets:
        dataset_file = f"configs/datasets/{dataset}.yaml"
        try:
            resolve_config_path(dataset_file, "dataset config")
        except ConfigError as e:
            raise SweepError(f"--datasets: unknown dataset '{dataset}' ({e})") from None
        if args.zeroshot:  # scripts/zeroshot.sh DATASET CFG, with CFG the backbone's file
            cfg_file = f"configs/trainers/{TRAINER}/{args.backbone}.yaml"
            try:
                resolve_config_path(cfg_file)
            except ConfigError as e:
                raise SweepError(f"--zeroshot: no trainer config '{args.backbone}' ({e})") from None
            out = os.path.join(args.output, ZEROSHOT, args.backbone, dataset)
            argv = [
                "--root", args.root,
                "--trainer", ZEROSHOT,
                "--dataset-config-file", dataset_file,
                "--config-file", cfg_file,
                "--output-dir", out,
                "--eval-only",
                *args.opts,
            ]  # fmt: skip
            runs.append(Run(dataset, args.backbone, 0, -1, out, argv, trainer=ZEROSHOT))
        for k in shots:
            cfg = args.cfg or paper_cfg(args.backbone, k, dataset)
            cfg_file = f"configs/trainers/{TRAINER}/{cfg}.yaml"
            try:
                resolve_config_path(cfg_file)
            except ConfigError as e:
                raise SweepError(
                    f"no trainer config '{cfg}' for {dataset}, {k} shots ({e}); pass --cfg"
                ) from None
            for seed in seeds:
                out = os.path.join(
                    args.output,
                    dataset,
                    TRAINER,
                    f"{cfg}_{k}shots",
                    f"nctx{args.nctx}_csc{args.csc}_ctp{args.ctp}",
                    f"seed{seed}",
                )
                argv = [
                    "--root", args.root,
                    "--seed", str(seed),
                    "--trainer", TRAINER,
                    "--dataset-config-file", dataset_file,
                    "--config-file", cfg_file,
                    "--output-dir", out,
                    "TRAINER.COOP.N_CTX", str(args.nctx),
                    "TRAINER.COOP.CSC", args.csc,
                    "TRAINER.COOP.CLASS_TOKEN_POSITION", args.ctp,
                    "DATASET.NUM_SHOTS", str(k),
                    *args.opts,
                ]  # fmt: skip
                runs.append(Run(dataset, cfg, k, seed, out, argv))
    return runs


def read_accuracy(out: str) -> Optional[float]:
    """The test accuracy (%) a finished run wrote to ``results.json``, or None."""
    try:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        return float(res["metrics"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summarize(runs: Sequence[Run]) -> List[str]:
    """Per (dataset, cfg, shots): ``* accuracy: <mean>% +- <std>%`` over the seeds that have
    results (``np.std``, population, as ``parse_test_res.py``), from ``results.json``."""
    import numpy as np

    groups: Dict[Tuple[str, str, int], List[Optional[float]]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(read_accuracy(run.out))
    labels = {run.group: run.label for run in runs}
    lines = []
    for group, accs in groups.items():
        got = [a for a in accs if a is not None]
        head = f"{labels[group]}:"
        if not got:
            lines.append(f"{head} no results")
            continue
        if group[2] == 0:  # the zero-shot baseline: one evaluation
            lines.append(f"{head} * accuracy: {got[0]:.2f}%")
            continue
        lines.append(
            f"{head} * accuracy: {np.mean(got):.2f}% +- {np.std(got):.2f}% "
            f"({len(got)} of {len(accs)} seeds)"
        )
    return lines


def _run_one(run: Run, i: int, n: int) -> Tuple[int, float]:
    """``coop-train``'s main on ``run`` in this process: (exit status, seconds)."""
    from coop.train import main as train_main
    from coop.utils import close_logger

    what = run.label + ("" if run.trainer == ZEROSHOT else f", seed {run.seed}")
    print(f"[{i}/{n}] {what}: {run.out}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = train_main(run.argv)
    except Exception:  # a crash of one run is reported like a failed process
        traceback.print_exc()
        rc = 1
    finally:
        close_logger()
        gc.collect()  # the trainer (and its loader workers) go before the next run
    return rc, time.perf_counter() - t0


def run_all(runs: Sequence[Run], keep_going: bool = False) -> List[Run]:
    """Run each unfinished run in this process; returns the runs that failed (stops at the
    first failure unless ``keep_going``). A run holds ``<its folder>/.sweep.lock`` while it
    runs, and a run whose lock another process holds is skipped, so several coop-sweep
    processes with the same arguments (one per GPU, say) share the grid out between them."""
    from coop.io import WriteError, try_file_lock

    failed: List[Run] = []
    for i, run in enumerate(runs, 1):
        if os.path.isfile(run.done_file()):
            print(f"Oops! The results exist at {run.out} (so skip this job)", flush=True)
            continue
        try:
            with try_file_lock(os.path.join(run.out, ".sweep")) as mine:
                if not mine:  # another coop-sweep process is running it
                    print(f"[{i}/{len(runs)}] running in another process, skipped: {run.out}",
                          flush=True)  # fmt: skip
                    continue
                if os.path.isfile(run.done_file()):  # finished while we were not looking
                    print(f"Oops! The results exist at {run.out} (so skip this job)", flush=True)
                    continue
                rc, elapsed = _run_one(run, i, len(runs))
        except WriteError as e:
            print(f"coop-sweep: error: {e}", file=sys.stderr, flush=True)
            rc, elapsed = 2, 0.0
        if rc != 0:
            print(f"[{i}/{len(runs)}] failed (exit status {rc}) after {elapsed:.1f} s: "
                  f"{run.out}", file=sys.stderr, flush=True)  # fmt: skip
            failed.append(run)
            if not keep_going:
                break
        else:
            print(f"[{i}/{len(runs)}] done in {elapsed:.1f} s", flush=True)
    return failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coop-sweep",
        description="Run CoOp's few-shot grid (datasets x shots x seeds) in one process, "
        "with scripts/main.sh's output folders, skipping finished runs.",
    )
    p.add_argument("--root", required=True, help="the datasets folder (main.sh's DATA)")
    p.add_argument("--datasets", required=True, help="comma-separated, e.g. caltech101,dtd")
    p.add_argument("--backbone", default="rn50", help="config prefix: rn50, rn101, vit_b16, ...")
    p.add_argument(
        "--cfg", default="", help="one trainer config for every run (default: the paper's schedule)"
    )
    p.add_argument("--shots", default=",".join(map(str, PAPER_SHOTS)))
    p.add_argument("--seeds", default=",".join(map(str, PAPER_SEEDS)))
    p.add_argument("--nctx", type=int, default=16, help="context tokens (main.sh's NCTX)")
    p.add_argument("--csc", default="False", help="class-specific context (False or True)")
    p.add_argument("--ctp", default="end", help="class token position: end, middle or front")
    p.add_argument("--output", default="output", help="the folder main.sh writes to")
    p.add_argument(
        "--zeroshot", action="store_true", help="also run zero-shot CLIP per dataset (zeroshot.sh)"
    )
    p.add_argument("--keep-going", action="store_true", help="go on after a failed run")
    p.add_argument("--dry-run", action="store_true", help="print the coop-train commands only")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run (KEY VALUE ...)")  # fmt: skip
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = plan_runs(args)
    except SweepError as e:
        print(f"coop-sweep: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            print(shlex.join(["coop-train", *run.argv]))
        return 0
    t0 = time.perf_counter()
    failed = run_all(runs, keep_going=args.keep_going)
    print(f"Sweep of {len(runs)} runs in {time.perf_counter() - t0:.1f} s", flush=True)
    for line in summarize(runs):
        print(line, flush=True)
    for run in failed:
        print(f"coop-sweep: failed: {run.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
