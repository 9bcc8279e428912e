"""A one-node Slurm cluster on this machine for tests: Debian's packages (installed with apt-get when missing),
its own munge key, slurm.conf, state and logs in a temporary folder, the daemons on 127.0.0.1 at free ports.
Root only (slurmd runs jobs as their user; munged and slurmd need root here). Always stopped, even on errors.

Measured on Debian's Slurm 22.05: ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` need no
cgroups; the node comes up idle within a second; ``AuthInfo=cred_expire=10`` shortens the begin-time delay
of a requeued job (``scontrol update JobId=J StartTime=now`` ends it at once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODE = "dpnode"


def why_not() -> str | None:
    """Why a Slurm cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "a Slurm cluster needs root (munged, slurmd); run the tests as root"
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(t) is None]
    if missing:
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        got = subprocess.run(
            ["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True, timeout=900
        )
        if got.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {got.stderr[-500:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    env: dict  # SLURM_CONF for the clients (sbatch, scontrol, squeue)

    def run(self, *args: str, timeout: float = 60, check: bool = True, env=None) -> subprocess.CompletedProcess:
        """A client command (``env``: the environment a job submitted by it inherits; SLURM_CONF added)."""
        env = self.env if env is None else env | {"SLURM_CONF": self.env["SLURM_CONF"]}
        return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout, check=check)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict ({} once Slurm has forgotten it)."""
        got = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if got.returncode != 0:
            return {}
        fields = {}
        for item in got.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log"))
        )


def _conf(root: Path, cpus: int) -> str:
    return f"""\
ClusterName=distpddm-test
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=30
SlurmdTimeout=60
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={NODE} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[Cluster]:
    """munged, slurmctld and slurmd (one node, this machine's CPUs) under ``root``; stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "slurm.conf").write_text(_conf(root, os.cpu_count() or 1))
    env = os.environ | {"SLURM_CONF": str(root / "slurm.conf")}
    procs: list[subprocess.Popen] = []
    try:
        munge = [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
            f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed",
        ]  # fmt: skip
        procs.append(subprocess.Popen(munge, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(lambda: (root / "munge.socket").exists(), 30, "munged's socket")
        conf = str(root / "slurm.conf")
        for daemon in (["slurmctld", "-D", "-i", "-f", conf], ["slurmd", "-D", "-f", conf, "-N", NODE]):
            log = open(root / f"{daemon[0]}.out", "w")  # noqa: SIM115 -- closed with the process
            procs.append(subprocess.Popen(daemon, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        cluster = Cluster(root, env)

        def idle() -> bool:
            got = cluster.run("sinfo", "-h", "-o", "%T", check=False)
            return got.returncode == 0 and got.stdout.strip() == "idle"

        _wait(idle, 60, "the node to be idle", cluster)
        yield cluster
    finally:
        if len(procs) == 3:
            _end_jobs(Cluster(root, env))
        for p in reversed(procs):  # slurmd first
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(ready, timeout: float, what: str, cluster: Cluster | None = None) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}" + (f"\n{cluster.logs()}" if cluster else ""))
        time.sleep(0.2)


def _end_jobs(cluster: Cluster) -> None:
    """Cancel every job, then end whatever still runs with this cluster's SLURM_CONF in its environment (job
    steps, slurmstepd): nothing of it outlives the test."""
    import psutil

    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
        with contextlib.suppress(TimeoutError):
            _wait(lambda: not cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split(), 60, "cancel")
    mine = cluster.env["SLURM_CONF"]
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get("SLURM_CONF") == mine:
                left.append(proc)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
