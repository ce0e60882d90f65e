"""One process per run (scripts/main.sh) against one process for the whole grid (coop-sweep).

Runs the same CoOp runs (the quick benchmark's 10-class miniature and 64 px checkpoint, one
shot, the given seeds, 3 epochs) twice per repetition, side by side: each as its own
``python -m coop.train`` process, as main.sh starts them, and all in one ``coop-sweep``
process. Prints both wall times and the ratio. Shared caches (``FAST.CACHE_DIR``) are
filled once beforehand, so both sides measure the runs, not the first computation of
cached features.

    python benchmarks/sweep_processes.py [--seeds 3] [--reps 2] [--train-cache]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--train-cache", action="store_true", help="FAST.TRAIN_FEATURE_CACHE True")
    args = p.parse_args()

    plan = bench.make_plan(True, "cpu")
    plan.tmp = tempfile.mkdtemp(prefix="coop-bench-proc-")
    try:
        env = bench._RunEnv(plan)
        data = env.data(plan.sweep_classes, plan.sweep_per_class)
        res = int(plan.run_clip["image_resolution"])
        opts = [
            "MODEL.BACKBONE.NAME", env.ckpt(), "INPUT.SIZE", f"({res}, {res})",
            "TRAINER.COOP.PREC", "fp32", "DATALOADER.NUM_WORKERS", "0", "USE_CUDA", "False",
            "OPTIM.MAX_EPOCH", "3", "TRAIN.PRINT_FREQ", "1000",
            "FAST.CACHE_DIR", os.path.join(plan.tmp, "cache"),
        ]  # fmt: skip
        if args.train_cache:
            opts += ["FAST.TRAIN_FEATURE_CACHE", "True", "FAST.TRAIN_CACHE_VIEWS", "1"]
        seeds = ",".join(str(s) for s in range(1, args.seeds + 1))
        grid = ["--root", data, "--datasets", "caltech101", "--shots", "1", "--seeds", seeds]
        child_env = dict(os.environ, OMP_NUM_THREADS="1")

        def sweep(out: str, *flags: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "coop.sweep", *grid, "--output", out, *flags, *opts]
            return subprocess.run(cmd, env=child_env, check=True, capture_output=True, text=True)

        sweep(os.path.join(plan.tmp, "warm"))  # fills the caches both sides then share
        print(
            f"{args.seeds} CoOp runs (1 shot, 3 epochs, quick checkpoint"
            f"{', training feature cache' if args.train_cache else ''}), 1 torch thread",
            flush=True,
        )
        for rep in range(args.reps):
            out_a, out_b = (os.path.join(plan.tmp, f"{s}{rep}") for s in "ab")
            listing = sweep(out_a, "--dry-run").stdout.splitlines()
            commands = [shlex.split(ln) for ln in listing if ln.startswith("coop-train ")]
            t0 = time.perf_counter()
            for cmd in commands:  # coop-train ARGS -> python -m coop.train ARGS
                subprocess.run([sys.executable, "-m", "coop.train", *cmd[1:]], env=child_env,
                               check=True, capture_output=True)  # fmt: skip
            separate = time.perf_counter() - t0
            t0 = time.perf_counter()
            sweep(out_b)
            one = time.perf_counter() - t0
            print(
                f"rep {rep + 1}: separate processes {separate:.1f} s, coop-sweep {one:.1f} s, "
                f"ratio {separate / one:.2f}x",
                flush=True,
            )
    finally:
        shutil.rmtree(plan.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
