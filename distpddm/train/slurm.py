"""A Ray cluster's layout inside a Slurm allocation, for ``launch/slurm.sbatch``: ports, workers, readiness.

Ports come from the job id (a block of :data:`BLOCK` below the kernel's ephemeral range), so two jobs sharing
a node do not collide unless their ids are equal modulo :data:`SLOTS`. Workers come from the SLURM_*
variables of the allocation (nodes alike): with GPUs, one worker per GPU (``SLURM_GPUS_ON_NODE`` x nodes)
sharing the node's CPUs; without, one worker per node holding all of its CPUs (``SLURM_CPUS_ON_NODE``).

    python -m distpddm.train.slurm check-ray ["$(ray --version)"]   # exit 2 (one line on stderr): Ray too old
    python -m distpddm.train.slurm env          # shell assignments (eval them)
    python -m distpddm.train.slurm wait ADDRESS NODES TIMEOUT_S [PID ...]   # PIDs: the `ray start`s to watch
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Mapping

from .stop import EXIT_PREEMPTED

BASE, BLOCK, SLOTS = 20000, 200, 63  # ports 20000..32599: below Linux's ephemeral range (32768-60999)
PORT_NAMES = (  # ray start's --<name>-port ("gcs": --port), in the job's block
    "gcs", "node-manager", "object-manager", "ray-client-server", "dashboard-agent-listen",
    "dashboard-agent-grpc", "metrics-export", "runtime-env-agent",
    "dashboard",  # with ray[default] the head runs a dashboard process even with --include-dashboard=false
)  # fmt: skip
WORKER_PORTS = 10  # offset of the worker port range (to the end of the block)
MIN_RAY = (2, 52)  # token authentication (RAY_AUTH_MODE=token), which the job's cluster relies on


def ray_problem(version: str | None, what: str = "Ray") -> str | None:
    """Why ``version`` (of ``what``; None: not installed) cannot host the job's cluster, in one line; None when
    it can. A Ray older than :data:`MIN_RAY` ignores ``RAY_AUTH_MODE=token``: its ports would take anyone's
    requests."""
    if not version:
        return f"{what} is not installed"
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if not match:
        return f"{what}: cannot read its version from {version!r}"
    if (int(match[1]), int(match[2])) < MIN_RAY:
        need = ".".join(map(str, MIN_RAY))
        return (
            f"{what} {version.strip()} is older than {need}, which has token authentication (RAY_AUTH_MODE=token): "
            f"its ports would be open to anyone on the network; install ray>={need}"
        )
    return None


def check_ray(cli_says: str | None = None) -> str | None:
    """:func:`ray_problem` of this Python's Ray, then of the ``ray`` command's (``cli_says``: what ``ray
    --version`` printed, e.g. ``ray, version 2.60.0``; None: not checked)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("ray")
    except PackageNotFoundError:
        installed = None
    problem = ray_problem(installed, f"Ray for {sys.executable}")
    if problem or cli_says is None:
        return problem
    if not cli_says.strip():
        return "no `ray` command on PATH (or `ray --version` failed)"
    match = re.search(r"version\s+(\S+)", cli_says)
    if not match:
        return f"`ray --version` said {cli_says.strip()[:200]!r}, not a version"
    return ray_problem(match[1], "the `ray` command on PATH")


def ports(job_id: int) -> dict[str, int]:
    """The job's Ray ports by ``ray start`` option name, plus ``min-worker`` / ``max-worker``."""
    base = BASE + (job_id % SLOTS) * BLOCK
    found = {name: base + i for i, name in enumerate(PORT_NAMES)}
    return found | {"min-worker": base + WORKER_PORTS, "max-worker": base + BLOCK - 1}


def _count(text: str | None) -> int:
    """``SLURM_GPUS_ON_NODE`` / ``SLURM_CPUS_ON_NODE`` as a number (``2``, ``2(x3)``, or absent: 0)."""
    match = re.match(r"\s*(\d+)", text or "")
    return int(match.group(1)) if match else 0


def layout(env: Mapping[str, str]) -> dict[str, int | bool]:
    """Nodes, per-node CPUs / GPUs, and the ``ray.*`` settings they give."""
    nodes = max(1, _count(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")))
    cpus = max(1, _count(env.get("SLURM_CPUS_ON_NODE")))
    gpus = _count(env.get("SLURM_GPUS_ON_NODE"))
    if gpus:
        workers, per_worker = nodes * gpus, max(1, cpus // gpus)
    else:
        workers, per_worker = nodes, cpus
    return {"nodes": nodes, "cpus": cpus, "gpus": gpus, "num_workers": workers, "cpus_per_worker": per_worker,
            "use_gpu": gpus > 0}  # fmt: skip


def shell_env(env: Mapping[str, str]) -> str:
    """``NAME=value`` lines for the batch script: RAY_<PORT> for each port, the layout in upper case, and
    EXIT_PREEMPTED (the driver's exit status when it stopped on request with a checkpoint: requeue then)."""
    job = int(env.get("SLURM_JOB_ID", "0"))
    lines = [f"RAY_{name.upper().replace('-', '_')}_PORT={p}" for name, p in ports(job).items()]
    lines += [f"{k.upper()}={str(v).lower()}" for k, v in layout(env).items()]
    lines.append(f"EXIT_PREEMPTED={EXIT_PREEMPTED}")
    return "\n".join(lines)


def _check(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"process {pid} (a `ray start`) ended before its node joined") from None


def wait_for_nodes(address: str, nodes: int, timeout: float, pids: list[int] = ()) -> float:
    """Block until the Ray cluster at ``host:port`` has ``nodes`` live nodes; the seconds it took. Fails at once
    when one of ``pids`` (the ``ray start`` processes) has ended."""
    t0 = time.monotonic()
    host, port = address.rsplit(":", 1)
    while True:  # the GCS port first: connecting a client to nothing retries for a long time
        _check(pids)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"no Ray head listening at {address} after {timeout:.0f} s") from None
            time.sleep(0.5)
    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    alive = 0
    while time.monotonic() - t0 <= timeout:
        try:
            alive = sum(1 for n in client.get_all_node_info(timeout=5).values() if n.state == 0)  # ALIVE
        except Exception:  # noqa: BLE001 -- the GCS still starting
            alive = 0
        if alive >= nodes:
            return time.monotonic() - t0
        _check(pids)
        time.sleep(0.5)
    raise TimeoutError(f"{alive} of {nodes} Ray nodes up at {address} after {timeout:.0f} s")


def main(argv: list[str]) -> int:
    if argv[:1] == ["check-ray"] and len(argv) <= 2:
        problem = check_ray(argv[1] if len(argv) == 2 else None)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["env"]:
        print(shell_env(os.environ))
        return 0
    if argv[:1] == ["wait"] and len(argv) >= 4:
        try:
            took = wait_for_nodes(argv[1], int(argv[2]), float(argv[3]), [int(p) for p in argv[4:]])
        except (TimeoutError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"ray: {argv[2]} node(s) up at {argv[1]} after {took:.1f} s")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
