"""``coop-sweep``: the paper's protocols as sweeps of ``coop-train`` runs.

    coop-sweep [fewshot] --root DATA --datasets caltech101,dtd      # main.sh's grid
    coop-sweep ablation|zeroshot|linear-probe|base2new|xd|dg --root DATA ... [KEY VALUE ...]
    coop-sweep prompts --root DATA --datasets caltech101,dtd --backbone vit_b16  # coop-prompts
    coop-sweep status PRESET --root DATA ...                       # done/running/failed/missing

Each preset (:mod:`coop.sweep_presets`) lists the runs the original scripts start, with
their arguments and output folders, for any trainer (``--trainer``); ``--dry-run`` prints
them as a shell script (every run's state, folder and command line, finished ones commented
out). Runs are skipped once finished and resumed when unfinished, and an evaluation runs
after its training run. An executor runs them (:mod:`coop.sweep_exec`): in this process, one
after the other (the default: each run saves the start-up of a new Python process, and
re-seeds and builds its trainer anew, so the numbers equal separate processes'); ``--executor
local``, child processes, one per visible GPU or ``--max-parallel`` on a CPU machine;
``--executor slurm``, Slurm job arrays through submitit (:mod:`coop.sweep_slurm`). Every run
keeps its state in its own folder, so ``status`` and ``--retry-failed`` work whichever
executor ran it, and several sweeps of the same grid share it out (per-run locks).

At the end of a sweep that waited for its runs, it prints per folder of seeds the mean and
standard deviation of their test accuracy in ``parse_test_res.py``'s form (``np.std``,
population), from each run's ``results.json`` at full precision (for a prompt study, its
accuracy per template); for base-to-new, per dataset the base and new means and their
harmonic mean H.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from coop.sweep_exec import (
    STATES,
    Executor,
    InProcessExecutor,
    LocalExecutor,
    Run,
    is_done,
    read_error_record,
    run_state,
    visible_gpus,
)
from coop.sweep_presets import (
    DEFAULT_TRAINER,
    NO_TRAINING,
    PAPER_DATASETS,
    PAPER_SEEDS,
    PAPER_SHOTS,
    PRESETS,
    SOURCE,
    STUDIES,
    SweepError,
    plan,
    protocol_cfg,
    trainer_class,
    with_backbone,
)

__all__ = ["Run", "SweepError", "main", "paper_cfg", "plan", "summarize", "summarize_base2new",
           "read_accuracy"]  # fmt: skip

TRAINER = "CoOp"


def paper_cfg(backbone: str, shots: int, dataset: str, trainer: str = TRAINER) -> str:
    """The trainer config the method declares for a few-shot run (CoOp, after COOP.md: 1
    shot ``*_ep50``, 2 and 4 shots ``*_ep100``, 8 and 16 shots the 200-epoch file, ImageNet
    always ``*_ep50``), with ``backbone`` swapped in."""
    return with_backbone(protocol_cfg(trainer_class(trainer), "fewshot", dataset, shots), backbone)


def read_accuracy(out: str) -> Optional[float]:
    """The test accuracy (%) a finished run wrote to ``results.json``, or None."""
    import json
    import os

    try:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        return float(res["metrics"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_prompt_study(out: str) -> Optional[str]:
    """A finished prompt study's accuracy per template, as one line, or None."""
    import json
    import os

    try:
        with open(os.path.join(out, "prompt_study.json"), encoding="utf-8") as f:
            table = json.load(f)
        return "; ".join(
            f"{c['label']}: {row['accuracy'][c['spec']]:.2f}%"
            for row in table["rows"]
            for c in table["columns"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summarize(runs: Sequence[Run]) -> List[str]:
    """Per folder of seeds: ``* accuracy: <mean>% +- <std>%`` over the seeds that have
    results (``np.std``, population, as ``parse_test_res.py``), from ``results.json``; per
    prompt study, its accuracy per template."""
    import numpy as np

    groups: Dict[str, List[Tuple[Run, Optional[float]]]] = {}
    lines = []
    for run in runs:
        if run.command == "coop-prompts":
            lines.append(f"{run.out}: {read_prompt_study(run.out) or 'no results'}")
            continue
        groups.setdefault(run.group or run.out, []).append((run, read_accuracy(run.out)))
    for group, members in groups.items():
        got = [a for _, a in members if a is not None]
        if not got:
            lines.append(f"{group}: no results")
        elif len(members) == 1 and members[0][0].seed < 0:  # one unseeded evaluation
            lines.append(f"{group}: * accuracy: {got[0]:.2f}%")
        else:
            lines.append(
                f"{group}: * accuracy: {np.mean(got):.2f}% +- {np.std(got):.2f}% "
                f"({len(got)} of {len(members)} seeds)"
            )
    return lines


def _subsample(run: Run) -> str:
    """The run's ``DATASET.SUBSAMPLE_CLASSES`` opt (the last one, as the merge keeps)."""
    opts = run.argv
    values = [opts[i + 1] for i in range(len(opts) - 1) if opts[i] == "DATASET.SUBSAMPLE_CLASSES"]
    return values[-1] if values else "all"


def summarize_base2new(runs: Sequence[Run]) -> List[str]:
    """Per dataset of a base-to-new sweep: the seed means of the base accuracy (the training
    runs' own test, on the base classes) and of the new accuracy (their evaluations on the
    new classes) and H = 2BN/(B+N) of those means; over several datasets, the same of the
    per-dataset means, as the papers' average row."""
    from coop.report import harmonic

    by_done = {run.done_file(): run for run in runs}
    pairs: Dict[Tuple[str, str], Tuple[Run, List[float], List[float]]] = {}
    for run in runs:
        train = by_done.get(run.after[0]) if run.after else None
        if train is None or _subsample(run) != "new" or _subsample(train) != "base":
            continue
        key = (train.group or train.out, run.group or run.out)
        _, bases, news = pairs.setdefault(key, (run, [], []))
        for values, r in ((bases, train), (news, run)):
            acc = read_accuracy(r.out)
            if acc is not None:
                values.append(acc)
    lines, means = [], []
    for run, bases, news in pairs.values():
        what = f"base-to-new {run.dataset} ({run.trainer}, {run.cfg}, {run.shots} shots)"
        if not bases or not news:
            lines.append(f"{what}: no results")
            continue
        b, n = sum(bases) / len(bases), sum(news) / len(news)
        means.append((b, n))
        lines.append(
            f"{what}: base {b:.2f}%, new {n:.2f}%, H {harmonic(b, n):.2f}% "
            f"({len(bases)}/{len(news)} seeds)"
        )
    if len(means) > 1 and len(means) == len(pairs):
        b = sum(m[0] for m in means) / len(means)
        n = sum(m[1] for m in means) / len(means)
        lines.append(
            f"base-to-new average of {len(means)} datasets: base {b:.2f}%, new {n:.2f}%, "
            f"H {harmonic(b, n):.2f}%"
        )
    return lines


# ---------------------------------------------------------------------------- command line
def build_parser(preset: str, status: bool = False) -> argparse.ArgumentParser:
    prog = f"coop-sweep {'status ' if status else ''}{preset}"
    p = argparse.ArgumentParser(
        prog=prog,
        description=(PRESETS[preset].__doc__ or "").strip().split("\n\n")[0],
    )
    p.add_argument("--root", required=True, help="the datasets folder (the scripts' DATA)")
    trains = preset not in NO_TRAINING
    if trains:
        p.add_argument("--trainer", default=DEFAULT_TRAINER.get(preset, TRAINER),
                       help="the method (a registered trainer); default %(default)s")  # fmt: skip
    if preset in ("xd", "dg"):
        p.add_argument("--source", default=SOURCE, help="the training set (default imagenet)")
        p.add_argument("--targets", default="", help="comma-separated evaluation datasets "
                       "(default: the protocol's)")  # fmt: skip
    else:
        p.add_argument("--datasets", default=",".join(PAPER_DATASETS),
                       help="comma-separated, e.g. caltech101,dtd (default: the eleven)")  # fmt: skip
    if trains:
        p.add_argument("--seeds", default=",".join(map(str, PAPER_SEEDS)))
        p.add_argument("--shots", default="", help="comma-separated shot counts (default: "
                       f"the protocol's; few-shot {','.join(map(str, PAPER_SHOTS))})")  # fmt: skip
    if preset == "zeroshot":
        p.add_argument("--backbones", default="rn50", help="comma-separated config names "
                       "as zeroshot.sh's CFG: rn50, rn101, vit_b32, vit_b16")  # fmt: skip
    p.add_argument("--backbone", default=None,
                   help="swap the backbone of the method's configs: rn50, rn101, vit_b32, vit_b16"
                   + (" (default rn50)" if not trains else ""))  # fmt: skip
    p.add_argument("--cfg", default="", help="one trainer config (a YAML name) for every run")
    if trains:
        p.add_argument("--nctx", type=int, default=None, help="context tokens (main.sh's NCTX)")
        p.add_argument("--csc", default=None, help="class-specific context: False or True")
        p.add_argument("--ctp", default=None, help="class token position: end, middle or front")
    else:
        p.add_argument("--template", action="append", default=[],
                       help="a coop-prompts template (repeatable; default: coop-prompts' "
                       "default templates)")  # fmt: skip
    if preset == "ablation":
        p.add_argument("--studies", default=",".join(STUDIES),
                       help="comma-separated: " + ", ".join(STUDIES) + " (default: all)")  # fmt: skip
    if preset == "fewshot":
        p.add_argument("--zeroshot", action="store_true",
                       help="also run zero-shot CLIP per dataset first (zeroshot.sh)")  # fmt: skip
    p.add_argument("--output", default="output", help="the folder the scripts write to")
    if not status:
        p.add_argument("--dry-run", action="store_true",
                       help="print every run (state, folder, command) as a shell script")  # fmt: skip
        p.add_argument("--retry-failed", action="store_true",
                       help="run only the failed runs (and what needs them)")  # fmt: skip
        p.add_argument("--keep-going", action="store_true",
                       help="in-process: go on after a failed run")  # fmt: skip
        p.add_argument("--quiet", action="store_true",
                       help="in-process: print only the progress lines; each run's own "
                       "output goes to <run folder>/.sweep.console.txt")  # fmt: skip
        ex = p.add_argument_group("executors")
        ex.add_argument("--executor", choices=("inprocess", "local", "slurm"),
                        default="inprocess", help="who runs the runs (default %(default)s)")  # fmt: skip
        ex.add_argument("--max-parallel", type=int, default=None,
                        help="local: runs at a time (default: one per visible GPU, else 1)")  # fmt: skip
        ex.add_argument("--gpus", default=None,
                        help="local: comma-separated GPU ids (default: the visible ones)")  # fmt: skip
        ex.add_argument("--partition", default=None, help="slurm: partition")
        ex.add_argument("--account", default=None, help="slurm: account")
        ex.add_argument("--time", default="24:00:00",
                        help="slurm: time limit per run (default %(default)s); a run that "
                        "reaches it is requeued and resumes")  # fmt: skip
        ex.add_argument("--gpus-per-run", type=int, default=1,
                        help="slurm: GPUs per run (0 on a CPU cluster)")  # fmt: skip
        ex.add_argument("--cpus-per-run", type=int, default=8,
                        help="slurm: CPU cores per run (default %(default)s, the YAMLs' 8 "
                        "loader workers)")  # fmt: skip
        ex.add_argument("--slurm-array-parallelism", type=int, default=16,
                        help="slurm: runs of one array at a time (default %(default)s)")  # fmt: skip
        ex.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                        help="slurm: any other sbatch option, e.g. qos=high (repeatable)")  # fmt: skip
        ex.add_argument("--slurm-folder", default=None,
                        help="slurm: submitit's job folder (default <output>/.slurm/%%j)")  # fmt: skip
        ex.add_argument("--wait", action="store_true",
                        help="slurm: wait until the jobs have left the queue")  # fmt: skip
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides for every run (KEY VALUE ...)")  # fmt: skip
    return p


def _executor(args: argparse.Namespace) -> Executor:
    if args.executor == "local":
        if args.max_parallel is not None and args.max_parallel < 1:
            raise SweepError(f"--max-parallel must be positive, got {args.max_parallel}")
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        return LocalExecutor(visible_gpus() if gpus is None else gpus, args.max_parallel)
    if args.executor == "slurm":
        import os

        from coop.sweep_slurm import SlurmExecutor, parse_extra, parse_time

        try:
            minutes = parse_time(args.time)
            extra = parse_extra(args.slurm_extra)
        except ValueError as e:
            raise SweepError(str(e)) from None
        for flag, value in (
            ("--gpus-per-run", args.gpus_per_run),
            ("--cpus-per-run", args.cpus_per_run),
        ):
            if value < 0:
                raise SweepError(f"{flag} must not be negative, got {value}")
        if args.slurm_array_parallelism < 1:
            raise SweepError("--slurm-array-parallelism must be positive")
        folder = args.slurm_folder or os.path.join(os.path.abspath(args.output), ".slurm", "%j")
        return SlurmExecutor(
            folder, time_min=minutes, partition=args.partition, account=args.account,
            gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
            array_parallelism=args.slurm_array_parallelism, extra=extra, wait=args.wait,
        )  # fmt: skip
    return InProcessExecutor(keep_going=args.keep_going, quiet=args.quiet)


def retry_selection(runs: Sequence[Run]) -> List[Run]:
    """The failed runs and the unfinished runs that need one of them."""
    chosen: List[Run] = []
    picked = set()
    for run in runs:
        failed = not is_done(run) and read_error_record(run.out) is not None
        needs = any(f in picked for f in run.after) and not is_done(run)
        if failed or needs:
            chosen.append(run)
            picked.add(run.done_file())
    return chosen


def print_dry_run(runs: Sequence[Run]) -> None:
    """Every run as a shell script: a comment with its state, what it is, its folder and
    what it waits for; its command line (commented out when done)."""
    index = {run.done_file(): i for i, run in enumerate(runs, 1)}
    counts = dict.fromkeys(STATES, 0)
    for i, run in enumerate(runs, 1):
        state, detail = run_state(run)
        counts[state] += 1
        action = {"done": "done, skipped", "running": "running elsewhere, skipped",
                  "failed": "failed before, runs again", "missing": "to run"}[state]  # fmt: skip
        after = [f"[{index[f]}/{len(runs)}]" if f in index else f for f in run.after]
        wait = f" after {', '.join(after)}" if after else ""
        note = f" ({detail})" if detail else ""
        print(f"# [{i}/{len(runs)}] {action}{wait}: {run.label} -> {run.out}{note}")
        command = shlex.join([run.command, *run.argv])
        print(f"# {command}" if state in ("done", "running") else command)
    print(f"# {len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES))


def print_status(runs: Sequence[Run]) -> int:
    """One line per run (state, folder, detail) and the counts; 0 when all are done."""
    counts = dict.fromkeys(STATES, 0)
    for run in runs:
        state, detail = run_state(run)
        counts[state] += 1
        print(f"{state:8s} {run.out}" + (f"  ({detail})" if detail else ""))
    print(f"{len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES))
    return 0 if counts["done"] == len(runs) else 1


def _split(argv: List[str]) -> Tuple[str, bool, List[str]]:
    """(preset, status, the rest): ``[status] PRESET ...``; without a preset name, the
    few-shot grid (today's command line)."""
    status = bool(argv) and argv[0] == "status"
    if status:
        argv = argv[1:]
        if not argv or argv[0] not in PRESETS:
            raise SweepError(f"status takes a preset first: one of {', '.join(PRESETS)}")
    if argv and argv[0] in PRESETS:
        return argv[0], status, argv[1:]
    return "fewshot", status, argv


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[0] + "\n\npresets: " + ", ".join(PRESETS)
              + "\n\n`coop-sweep PRESET --help` lists a preset's options.")  # fmt: skip
        return 0
    try:
        preset, status, rest = _split(argv)
    except SweepError as e:
        print(f"coop-sweep: error: {e}", file=sys.stderr)
        return 2
    args = build_parser(preset, status).parse_args(rest)
    try:
        runs = plan(preset, args, check_root=not status)
        executor = None if status or args.dry_run else _executor(args)
    except SweepError as e:
        print(f"coop-sweep: error: {e}", file=sys.stderr)
        return 2
    if status:
        return print_status(runs)
    if args.retry_failed:
        runs = retry_selection(runs)
        print(f"{'# ' if args.dry_run else ''}Retrying {len(runs)} runs", flush=True)
    if args.dry_run:
        print_dry_run(runs)
        return 0
    t0 = time.perf_counter()
    try:
        failed = executor.run(runs)
    except Exception as e:
        from coop.sweep_slurm import SlurmError

        if not isinstance(e, SlurmError):
            raise
        print(f"coop-sweep: error: {e}", file=sys.stderr)
        return 2
    if not executor.waits:
        print(f"Follow it with: coop-sweep status {preset} <the same preset options>", flush=True)
        return 0
    print(f"Sweep of {len(runs)} runs in {time.perf_counter() - t0:.1f} s", flush=True)
    for line in summarize(runs) + summarize_base2new(runs):
        print(line, flush=True)
    for run in failed:
        print(f"coop-sweep: failed: {run.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
