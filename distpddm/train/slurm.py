"""A Ray cluster's layout inside a Slurm allocation, for ``launch/slurm.sbatch``: ports, workers, readiness.

Ports come from the job id (a block of :data:`BLOCK` below the kernel's ephemeral range), so two jobs sharing
a node do not collide unless their ids are equal modulo :data:`SLOTS`. Workers come from the SLURM_*
variables of the allocation (nodes alike): with GPUs, one worker per GPU (``SLURM_GPUS_ON_NODE`` x nodes)
sharing the node's CPUs; without, one worker per node holding all of its CPUs (``SLURM_CPUS_ON_NODE``).

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

BASE, BLOCK, SLOTS = 20000, 200, 63  # ports 20000..32599: below Linux's ephemeral range (32768-60999)
PORT_NAMES = (  # ray start's --<name>-port ("gcs": --port), in the job's block
    "gcs", "node-manager", "object-manager", "ray-client-server", "dashboard-agent-listen",
    "dashboard-agent-grpc", "metrics-export", "runtime-env-agent",
    "dashboard",  # with ray[default] the head runs a dashboard process even with --include-dashboard=false
)  # fmt: skip
WORKER_PORTS = 10  # offset of the worker port range (to the end of the block)


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
    """``NAME=value`` lines for the batch script: RAY_<PORT> for each port, and the layout in upper case."""
    job = int(env.get("SLURM_JOB_ID", "0"))
    lines = [f"RAY_{name.upper().replace('-', '_')}_PORT={p}" for name, p in ports(job).items()]
    lines += [f"{k.upper()}={str(v).lower()}" for k, v in layout(env).items()]
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
