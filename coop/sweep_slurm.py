"""The Slurm executor of ``coop-sweep``: job arrays through ``submitit`` (``pip install
'coop-dassl[slurm]'``).

Each stage of a sweep (training runs first, then the evaluations that need them) is one job
array, at most ``array_parallelism`` tasks of it running at a time; an evaluation array
starts after the training array has ended (``afterany``), and each evaluation checks on its
own that its training run finished (else it records the failure). A task runs its run in
the job's Python process (:func:`coop.sweep_exec.execute_run`), under the run's lock. When
Slurm warns a task of its time limit or pre-empts it (submitit's signal, ``USR2``), the
task's ``checkpoint()`` resubmits the same run and submitit requeues the job; started
again, ``coop-train`` resumes from the run's own ``resume.pth.tar``, so the result equals
an uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from coop.sweep_exec import (
    ALREADY_DONE,
    SLURM_RECORD,
    Executor,
    Run,
    execute_run,
    is_done,
    run_state,
)


class SlurmError(RuntimeError):
    """Slurm or submitit is missing, or a submission failed."""


def parse_time(text: str) -> int:
    """Slurm's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes (seconds round up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r} is not a Slurm time (e.g. 90, 4:00:00, 1-12:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + (1 if c and int(c) else 0)
    elif c is not None:  # HH:MM:SS
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    elif b is not None:  # MM:SS
        minutes = int(a) + (1 if int(b) else 0)
    else:  # MM
        minutes = int(a)
    if minutes < 1:
        raise ValueError(f"--time {text!r} is less than a minute")
    return minutes


def parse_extra(items: Sequence[str]) -> Dict[str, str]:
    """``--slurm-extra KEY=VALUE`` items as sbatch parameters (``qos=high``,
    ``constraint=a100``; ``--`` in front of a key is dropped)."""
    extra: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"--slurm-extra takes KEY=VALUE (an sbatch option), got {item!r}")
        extra[key] = value
    return extra


class SweepTask:
    """One run as a submitit job: calling it runs the run; ``checkpoint()`` (called by
    submitit on a time-limit or pre-emption signal) resubmits it unchanged, since the run
    resumes from its own folder."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def __call__(self) -> str:
        rc = execute_run(self.run, tag=f"[Slurm job {os.environ.get('SLURM_JOB_ID', '?')}] ")
        if rc not in (0, ALREADY_DONE):
            # the job fails too (its error record is in the run's folder)
            raise RuntimeError(f"run {self.run.out} failed with exit status {rc}")
        return self.run.out

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(SweepTask(self.run))


def stages(runs: Sequence[Run]) -> List[List[Run]]:
    """The runs in dependency stages: a run's prerequisites are in earlier stages."""
    depth: Dict[str, int] = {}
    out: List[List[Run]] = []
    for run in runs:  # runs come in dependency order
        d = 1 + max((depth.get(f, -1) for f in run.after), default=-1)
        depth[run.done_file()] = d
        while len(out) <= d:
            out.append([])
        out[d].append(run)
    return [s for s in out if s]


class SlurmExecutor(Executor):
    """Submits the runs that are neither done nor running as Slurm job arrays (one per
    stage) and returns; with ``wait``, polls until their jobs have left the queue."""

    waits = False

    def __init__(
        self,
        folder: str,
        time_min: int = 1440,
        partition: Optional[str] = None,
        account: Optional[str] = None,
        gpus_per_run: int = 1,
        cpus_per_run: int = 8,
        array_parallelism: int = 16,
        extra: Optional[Dict[str, str]] = None,
        max_requeues: int = 3,
        wait: bool = False,
        poll_s: float = 5.0,
    ) -> None:
        self.folder = folder
        self.params = dict(
            time=time_min,
            partition=partition,
            account=account,
            gpus_per_node=gpus_per_run or None,  # 0: no GPU request at all (CPU clusters)
            cpus_per_task=cpus_per_run,
            ntasks_per_node=1,
            array_parallelism=array_parallelism,
            additional_parameters=dict(extra or {}),
        )
        self.max_requeues = max_requeues
        self.wait = wait
        self.waits = wait
        self.poll_s = poll_s
        self.job_ids: List[str] = []

    def _executor(self, name: str, dependency: Optional[str]):
        try:
            import submitit
        except ImportError:
            raise SlurmError(
                "--executor slurm needs submitit: pip install 'coop-dassl[slurm]'"
            ) from None
        ex = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.max_requeues)
        params = {k: v for k, v in self.params.items() if v is not None}
        ex.update_parameters(job_name=name, dependency=dependency, **params)
        return ex

    def run(self, runs: Sequence[Run]) -> List[Run]:
        todo = [r for r in runs if run_state(r)[0] not in ("done", "running")]
        for r in runs:
            if r not in todo:
                print(f"{run_state(r)[0]}, not submitted: {r.out}", flush=True)
        previous: Optional[str] = None
        for n, stage in enumerate(stages(todo)):
            dependency = f"afterany:{previous}" if previous else None
            ex = self._executor(f"coop-sweep-{n}", dependency)
            jobs = []
            try:
                with ex.batch():
                    for run in stage:
                        jobs.append(ex.submit(SweepTask(run)))
            except Exception as e:  # sbatch's own message (bad partition, account, ...)
                raise SlurmError(f"Slurm refused the submission: {e}") from None
            previous = jobs[0].job_id.split("_")[0]
            self.job_ids.append(previous)
            for run, job in zip(stage, jobs):
                os.makedirs(run.out, exist_ok=True)
                with open(os.path.join(run.out, SLURM_RECORD), "w", encoding="utf-8") as f:
                    f.write(job.job_id + "\n")
            what = "training or standalone" if n == 0 else f"stage {n + 1} (after job {dependency})"
            print(f"Submitted job array {previous} ({len(stage)} {what} runs): "
                  f"logs in {self.folder.replace('%j', previous + '_<task>')}", flush=True)  # fmt: skip
        if not todo:
            print("Nothing to submit", flush=True)
        if self.wait and self.job_ids:
            self.wait_for_queue()
            return [r for r in todo if not is_done(r)]
        return []

    def wait_for_queue(self) -> None:
        """Poll ``squeue`` until none of the submitted arrays is queued or running."""
        while True:
            try:
                out = subprocess.run(
                    ["squeue", "-h", "-o", "%i", "-j", ",".join(self.job_ids)],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SlurmError(f"squeue failed: {e}") from None
            # squeue exits non-zero once every listed job has left its memory
            if out.returncode != 0 or not out.stdout.strip():
                return
            print(f"waiting for {len(out.stdout.split())} Slurm jobs ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            time.sleep(self.poll_s)
