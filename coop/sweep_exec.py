"""A sweep's runs, their state on disk, and the executors that run them.

A :class:`Run` is one ``coop-train`` (or ``coop-prompts``) command with its output folder
and the runs it needs first (an evaluation needs its training run's checkpoints). Whatever
runs it (this process, a local child process, a Slurm job) calls :func:`execute_run`, which
keeps every state in the run's folder, so any process can read a sweep's progress with
:func:`run_state`:

- ``finished`` (a training run), ``results.json`` (an evaluation-only run) or
  ``prompt_study.json`` (a prompt study): done;
- ``.sweep.lock`` held: running (the lock is released by the kernel however the holder ends);
- ``.sweep.error.json``: failed (exit status, the error line, host, time, Slurm job);
- none of these: missing (``log.txt`` there: started before, and it resumes).

Executors take the runs in dependency order and respect :attr:`Run.after`:
:class:`InProcessExecutor` (one after the other in this process, the default) and
:class:`LocalExecutor` (child processes, one per visible GPU or ``max_parallel`` on a CPU
machine); :class:`coop.sweep_slurm.SlurmExecutor` submits job arrays.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

LOCK = ".sweep"  # the lock file is <run folder>/.sweep.lock
ERROR_RECORD = ".sweep.error.json"
CONSOLE = ".sweep.console.txt"  # a child process's stdout and stderr (local executor)
SLURM_RECORD = ".sweep.slurm"  # the Slurm job a run was submitted as
RUNNING_ELSEWHERE = 75  # exit status of a run whose lock another process holds
BLOCKED = 3  # exit status of a run whose prerequisite has not finished
ALREADY_DONE = -1  # what execute_run returns for a run that was done before it started

# the console scripts a run can be, each with its main and the file its finished run leaves
# (None: the training run's ``finished`` marker, or ``results.json`` when evaluation-only)
COMMANDS = {
    "coop-train": ("coop.train", None),
    "coop-prompts": ("coop.prompt_study", "prompt_study.json"),
}

STATES = ("done", "running", "failed", "missing")


@dataclass
class Run:
    """One ``coop-train`` run of a sweep."""

    dataset: str
    trainer: str
    cfg: str
    shots: int  # 0: no few-shot step (zero-shot and evaluation runs)
    seed: int  # -1: no --seed
    out: str
    argv: List[str]
    eval_only: bool = False
    # the done files (see done_file) of the runs that must finish first
    after: List[str] = field(default_factory=list)
    # what the summary groups the run under: the folder of its seeds
    group: str = ""
    command: str = "coop-train"  # a key of COMMANDS

    def done_file(self) -> str:
        """The file whose presence means the run is complete: the ``finished`` marker of a
        training run, the ``results.json`` of an evaluation-only run, the command's own
        result file for another command."""
        from coop.engine import FINISHED_MARKER

        result = COMMANDS[self.command][1]
        if result is None:
            result = "results.json" if self.eval_only else FINISHED_MARKER
        return os.path.join(self.out, result)

    @property
    def label(self) -> str:
        seed = f" seed {self.seed}" if self.seed >= 0 else ""
        what = "evaluation" if self.eval_only else f"{self.shots} shots" if self.shots else ""
        if self.command == "coop-prompts":
            what = "prompt study"
        return " ".join(p for p in (self.dataset, self.trainer, self.cfg, what) if p) + seed

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Run:
        return cls(**json.loads(text))


def is_done(run: Run) -> bool:
    return os.path.isfile(run.done_file())


def _lock_held(folder: str) -> bool:
    """Whether another process holds the run's lock (probed without waiting; a missing lock
    file is not held)."""
    from coop.io import try_file_lock

    if not os.path.isfile(os.path.join(folder, LOCK + ".lock")):
        return False
    with try_file_lock(os.path.join(folder, LOCK)) as mine:
        return not mine


def read_error_record(folder: str) -> Optional[Dict]:
    try:
        with open(os.path.join(folder, ERROR_RECORD), encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def run_state(run: Run) -> Tuple[str, str]:
    """``(state, detail)`` of ``run`` from its folder; state is one of :data:`STATES`."""
    if is_done(run):
        return "done", ""
    if _lock_held(run.out):
        return "running", ""
    record = read_error_record(run.out)
    if record is not None:
        where = f" on {record['host']}" if record.get("host") else ""
        job = f" (Slurm job {record['slurm_job']})" if record.get("slurm_job") else ""
        return (
            "failed",
            f"exit status {record.get('exit_status')}{where}{job}: {record.get('error', '')}",
        )
    details = []
    with contextlib.suppress(OSError):
        with open(os.path.join(run.out, SLURM_RECORD), encoding="utf-8") as f:
            details.append(f"submitted as Slurm job {f.read().strip()}")
    if os.path.isfile(os.path.join(run.out, "log.txt")):
        details.append("started before: resumes from its last epoch")
    return "missing", "; ".join(details)


def record_failure(run: Run, exit_status: int, error: str) -> None:
    """Write the run's error record (what ``coop-sweep status`` reports as failed)."""
    from coop.io import atomic_write_json

    os.makedirs(run.out, exist_ok=True)
    atomic_write_json(
        os.path.join(run.out, ERROR_RECORD),
        {
            "exit_status": exit_status,
            "error": error,
            "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": _slurm_job_id(),
            "argv": run.argv,
        },
    )


def clear_failure(run: Run) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run.out, ERROR_RECORD))


def _slurm_job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps the text (to find a run's error line)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _invoke(run: Run, console: Optional[str] = None) -> Tuple[int, str]:
    """The run's command (its ``main``) on its argv in this process: (exit status, error
    line). ``console``: a file that takes the run's console output instead of this
    process's stdout and stderr."""
    import importlib

    from coop.utils import close_logger

    command_main = importlib.import_module(COMMANDS[run.command][0]).main
    error = ""
    with contextlib.ExitStack() as stack:
        if console is not None:
            stream = stack.enter_context(open(console, "a", encoding="utf-8"))
            # the run's logger writes to the stdout it finds, so it finds this file
            stack.enter_context(contextlib.redirect_stdout(stream))
        else:
            stream = sys.stderr
        tee = _Tee(stream)
        try:
            with contextlib.redirect_stderr(tee):
                rc = command_main(list(run.argv))
        except Exception as e:  # a crash of one run is reported like a failed process
            traceback.print_exc(file=tee)
            rc, error = 1, f"{type(e).__name__}: {e}"
        finally:
            close_logger()
            gc.collect()  # the trainer (and its loader workers) go before the next run
    if rc != 0 and not error:
        lines = [ln for ln in tee.kept.getvalue().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(f"{run.command}: error:")]
        error = (errors or lines or [f"exit status {rc}"])[-1]
    return rc, error


def execute_run(run: Run, tag: str = "", quiet: bool = False) -> int:
    """Run ``run`` in this process under its lock: skipped when done (:data:`ALREADY_DONE`)
    or when another
    process holds its lock (:data:`RUNNING_ELSEWHERE`); a prerequisite that has not finished
    (:data:`BLOCKED`) or a failed run writes the error record; success clears it. Returns
    the exit status. ``quiet``: the run's console output goes to its folder's
    :data:`CONSOLE` file (its ``log.txt`` has the log lines anyway)."""
    from coop.io import WriteError, try_file_lock

    if is_done(run):
        print(f"Oops! The results exist at {run.out} (so skip this job)", flush=True)
        return ALREADY_DONE
    try:
        # a `coop-sweep status` probing the lock holds it for an instant: try again briefly
        for attempt in range(3):
            with try_file_lock(os.path.join(run.out, LOCK)) as mine:
                if mine:
                    return _execute_locked(run, tag, quiet)
            time.sleep(0.1 * (attempt + 1))
    except WriteError as e:
        print(f"coop-sweep: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{tag}running in another process, skipped: {run.out}", flush=True)
    return RUNNING_ELSEWHERE


def _execute_locked(run: Run, tag: str, quiet: bool = False) -> int:
    if is_done(run):  # finished while we were not looking
        print(f"Oops! The results exist at {run.out} (so skip this job)", flush=True)
        return ALREADY_DONE
    missing = [os.path.dirname(f) for f in run.after if not os.path.isfile(f)]
    if missing:
        error = f"its prerequisite run {missing[0]} has not finished"
        print(f"{tag}{run.label}: {error}", file=sys.stderr, flush=True)
        record_failure(run, BLOCKED, error)
        return BLOCKED
    clear_failure(run)
    print(f"{tag}{run.label}: {run.out}", flush=True)
    rc, error = _invoke(run, os.path.join(run.out, CONSOLE) if quiet else None)
    if rc != 0:
        if quiet:
            print(f"{tag}{error} (its output: {os.path.join(run.out, CONSOLE)})",
                  file=sys.stderr, flush=True)  # fmt: skip
        record_failure(run, rc, error)
    return rc


class Executor:
    """Runs a sweep's runs (given in dependency order); returns the runs that failed."""

    def run(self, runs: Sequence[Run]) -> List[Run]:
        raise NotImplementedError

    # whether the runs have finished when run() returns (not so for a batch system)
    waits = True


class InProcessExecutor(Executor):
    """One run after the other in this process (``coop-train``'s main each time), which
    saves each run the start-up of a new process; stops at the first failure unless
    ``keep_going``. ``quiet``: only the progress lines are printed, each run's own output
    goes to its :data:`CONSOLE` file."""

    def __init__(self, keep_going: bool = False, quiet: bool = False) -> None:
        self.keep_going = keep_going
        self.quiet = quiet

    def run(self, runs: Sequence[Run]) -> List[Run]:
        failed: List[Run] = []
        n = len(runs)
        for i, run in enumerate(runs, 1):
            tag = f"[{i}/{n}] "
            t0 = time.perf_counter()
            rc = execute_run(run, tag, self.quiet)
            elapsed = time.perf_counter() - t0
            if rc in (RUNNING_ELSEWHERE, ALREADY_DONE):
                continue
            if rc != 0:
                print(f"{tag}failed (exit status {rc}) after {elapsed:.1f} s: {run.out}",
                      file=sys.stderr, flush=True)  # fmt: skip
                failed.append(run)
                if not self.keep_going:
                    break
            else:
                print(f"{tag}done in {elapsed:.1f} s", flush=True)
        return failed


def visible_gpus() -> List[str]:
    """The GPUs a local sweep spreads its runs over: ``$CUDA_VISIBLE_DEVICES`` when set,
    else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class LocalExecutor(Executor):
    """Child processes on this machine: one run per GPU in ``gpus`` (each child sees only
    its own, through ``CUDA_VISIBLE_DEVICES``), the next starting as one frees; without
    GPUs, ``max_parallel`` runs at a time (each child then gets an equal share of the CPU
    cores as its thread count, unless ``OMP_NUM_THREADS`` is set). A run starts once its
    prerequisites are done; a failed run is recorded and the others go on."""

    poll_s = 0.2

    def __init__(self, gpus: Sequence[str] = (), max_parallel: Optional[int] = None) -> None:
        slots: List[Optional[str]] = list(gpus)
        if max_parallel is not None:
            slots = slots[:max_parallel] if slots else [None] * max_parallel
        self.slots = slots or [None]

    def _start(self, run: Run, slot: Optional[str]) -> subprocess.Popen:
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        elif "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.slots)))
        os.makedirs(run.out, exist_ok=True)
        with open(os.path.join(run.out, CONSOLE), "ab") as console:
            gpu = f" on GPU {slot}" if slot is not None else ""
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            console.write(
                f"== coop-sweep: started {stamp} (unix {time.time():.3f}){gpu}\n".encode()
            )
            console.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "coop.sweep_exec", run.to_json()],
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def run(self, runs: Sequence[Run]) -> List[Run]:
        n = len(runs)
        index = {run.done_file(): i for i, run in enumerate(runs, 1)}
        pending: List[Run] = []
        for run in runs:
            if is_done(run):
                print(f"Oops! The results exist at {run.out} (so skip this job)", flush=True)
            else:
                pending.append(run)
        free = list(self.slots)
        active: Dict[subprocess.Popen, Tuple[Run, Optional[str], float]] = {}
        failed: List[Run] = []
        ended: set = set()  # done files of the runs that ended here without finishing

        def tag(run: Run) -> str:
            return f"[{index[run.done_file()]}/{n}] "

        while pending or active:
            for proc, (run, slot, t0) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del active[proc]
                free.append(slot)
                took = f"{time.perf_counter() - t0:.1f} s" + (f" on GPU {slot}" if slot else "")
                if rc == 0 and is_done(run):
                    print(f"{tag(run)}done in {took}: {run.out}", flush=True)
                    continue
                ended.add(run.done_file())
                if rc == RUNNING_ELSEWHERE:
                    print(f"{tag(run)}running in another process, skipped: {run.out}", flush=True)
                    continue
                if rc == 0:  # ended without its done file (e.g. killed from outside)
                    record_failure(run, 1, "the run ended without finishing")
                print(f"{tag(run)}failed (exit status {rc}) after {took}: {run.out} (its "
                      f"output: {os.path.join(run.out, CONSOLE)})", file=sys.stderr, flush=True)  # fmt: skip
                failed.append(run)
            started = False
            for run in list(pending):
                blocking = [f for f in run.after if f in ended]
                waiting = [f for f in run.after if f in index and not os.path.isfile(f)]
                if blocking or (waiting and not active and not started):
                    # its prerequisite failed here, or nothing left here will make it
                    pending.remove(run)
                    ended.add(run.done_file())
                    error = f"its prerequisite run {os.path.dirname((blocking or waiting)[0])} has not finished"
                    record_failure(run, BLOCKED, error)
                    print(f"{tag(run)}not run: {error}", file=sys.stderr, flush=True)
                    failed.append(run)
                    continue
                if waiting or not free:
                    continue
                pending.remove(run)
                slot = free.pop(0)
                print(f"{tag(run)}start {run.label}" + (f" on GPU {slot}" if slot else ""),
                      flush=True)  # fmt: skip
                active[self._start(run, slot)] = (run, slot, time.perf_counter())
                started = True
            if active:
                time.sleep(self.poll_s)
        return failed


def main(argv: Optional[List[str]] = None) -> int:
    """A child process of :class:`LocalExecutor`: ``python -m coop.sweep_exec RUN_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m coop.sweep_exec RUN_JSON", file=sys.stderr)
        return 2
    rc = execute_run(Run.from_json(argv[0]))
    return 0 if rc == ALREADY_DONE else rc


if __name__ == "__main__":
    sys.exit(main())
