"""A one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd with a
generated ``slurm.conf`` in a private folder.

The configuration works inside a container: the node is localhost, process tracking and
task launch use no cgroups (``proctrack/linuxproc``, ``task/none``), there is no accounting
database, and GPUs are declared as GRES only where ``/dev/nvidia<N>`` exist. Requeued jobs
become eligible again after a few seconds (``cred_expire``) and the scheduler looks every
second, so a requeue test takes seconds, not minutes. The daemons run in the foreground
as this process's children and :meth:`SlurmCluster.stop` ends exactly them.
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")


class SlurmUnavailable(RuntimeError):
    """The cluster cannot start here (the message says why)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """``start()`` it, use :attr:`env` (``SLURM_CONF``) for the client commands, ``stop()``."""

    def __init__(self, folder: str, cpus: Optional[int] = None) -> None:
        self.folder = os.path.abspath(folder)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.procs: List[subprocess.Popen] = []
        self.env: Dict[str, str] = {}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        user = getpass.getuser()
        gpus = sorted(glob.glob("/dev/nvidia[0-9]*"))
        gres_node = f" Gres=gpu:{len(gpus)}" if gpus else ""
        lines = [
            "ClusterName=cooptest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # the test's own munged; a requeued job is eligible again after 5 s (default 120)
            f"AuthInfo=socket={self._path('munge.socket')},cred_expire=5",
            f"StateSaveLocation={self._path('state')}",
            f"SlurmdSpoolDir={self._path('spool')}",
            f"SlurmctldPidFile={self._path('slurmctld.pid')}",
            f"SlurmdPidFile={self._path('slurmd.pid')}",
            f"SlurmctldLogFile={self._path('slurmctld.log')}",
            f"SlurmdLogFile={self._path('slurmd.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobRequeue=1",
            "MinJobAge=300",
            "KillWait=5",
            *(["GresTypes=gpu"] if gpus else []),
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN{gres_node}",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        if gpus:
            with open(self._path("gres.conf"), "w", encoding="utf-8") as f:
                f.write("AutoDetect=off\n")
                for dev in gpus:
                    f.write(f"NodeName={host} Name=gpu File={dev}\n")

    def _daemon(self, cmd: List[str], log: str) -> None:
        with open(self._path(log), "ab") as out:
            self.procs.append(
                subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
            )

    def _log_tail(self, name: str, n: int = 5) -> str:
        with contextlib.suppress(OSError), open(self._path(name), errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-n:])
        return "(no log)"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the daemons and wait until the node is idle; raises
        :class:`SlurmUnavailable` with the reason (a missing binary, a daemon that exited
        and the end of its log, a node that never came up)."""
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(
                f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
            )
        for sub in ("state", "spool"):
            os.makedirs(self._path(sub), exist_ok=True)
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        key = self._path("munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._write_config()
        self._daemon(
            ["munged", "--foreground", "--force", f"--key-file={key}",
             f"--socket={self._path('munge.socket')}", f"--pid-file={self._path('munged.pid')}",
             f"--seed-file={self._path('munge.seed')}", f"--log-file={self._path('munged.log')}"],
            "munged.out",
        )  # fmt: skip
        self._wait_for(
            lambda: os.path.exists(self._path("munge.socket")), 10, "munged", "munged.log"
        )
        self._daemon(["slurmctld", "-D", "-i", "-f", self.conf], "slurmctld.out")
        self._daemon(["slurmd", "-D", "-f", self.conf], "slurmd.out")
        self._wait_for(self._node_idle, timeout_s, "the node", "slurmctld.log")

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             env=self.env, timeout=10)  # fmt: skip
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait_for(self, ready, timeout_s: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    name = os.path.basename(proc.args[0])
                    self.stop()
                    raise SlurmUnavailable(
                        f"{name} exited with status {proc.returncode}: "
                        f"{self._log_tail(name + '.log')} {self._log_tail(name + '.out')}"
                    )
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if ready():
                    return
            time.sleep(0.2)
        self.stop()
        raise SlurmUnavailable(
            f"{what} did not come up in {timeout_s:.0f} s: {self._log_tail(log)}"
        )

    def run(self, *cmd: str) -> str:
        """A Slurm client command against this cluster; its stdout."""
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
        return out.stdout

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (slurmd first)."""
        if self.env:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env,
                               capture_output=True, timeout=10)  # fmt: skip
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
