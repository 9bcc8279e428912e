"""Hosts as Linux network namespaces on this one machine, for multi-host tests (Ray nodes, gloo ranks).

Each host is a namespace with its own loopback and one veth end (named :data:`IFACE` in every host) on a
private /24 that :class:`Cluster` assigns itself; the hosts reach each other only through that link. They
share the filesystem, which plays the cluster's shared storage (shards, ``ray.storage_path``); each host's Ray
keeps its own ``--temp-dir``. Leaving the ``with`` block kills every process running in the namespaces
(``ip netns pids``: Ray's daemons included) and deletes them; a crashed earlier session's namespaces (the
prefix and a dead pid in the name) are removed on entry.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PREFIX = "dpddm-"  # namespace names: dpddm-<pid of the creating process>-<host>
TMP_PREFIX = "dpddm"  # Ray temp dirs: /tmp/dpddm<pid>-<random>/<host><n>
IFACE = "dpveth0"  # the link's interface name in every host (one GLOO_SOCKET_IFNAME fits all)
SUBNET = "10.213.7"  # private addresses assigned here; each cluster's link is its own isolated segment
APT = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2"  # = make netns-tools
RAY = str(Path(sys.executable).with_name("ray"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=60)


def require_netns() -> None:
    """Skip (saying why) where hosts cannot be built: not root, or no network namespaces. Installs iproute2
    with apt-get when missing (as ``make netns-tools`` does)."""
    if os.geteuid() != 0:
        pytest.skip("network-namespace hosts need root (ip netns add)")
    if shutil.which("ip") is None:
        try:
            r = subprocess.run(["bash", "-c", APT], capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"could not install iproute2 ({APT}): {e}")
        if r.returncode != 0 or shutil.which("ip") is None:
            pytest.skip(f"could not install iproute2 ({APT}): exit {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        pytest.skip(f"network namespaces are not supported here: ip netns add: {r.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


def namespace_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns`` until none is left (daemons fork while being killed)."""
    for _ in range(50):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str, prefix: str) -> bool:
    owner = name[len(prefix) :].split("-", 1)[0]
    return name.startswith(prefix) and owner.isdigit() and not _alive(int(owner))


def clean_stale() -> None:
    """What a crashed session (its pid gone) left: its namespaces' processes killed, the namespaces deleted,
    its Ray temp dirs removed."""
    for line in _ip("netns", "list", check=False).stdout.split("\n"):
        ns = line.split(" ", 1)[0]
        if _stale(ns, PREFIX):
            kill_namespace(ns)
            _ip("netns", "del", ns, check=False)
    for tmp in Path("/tmp").glob(f"{TMP_PREFIX}*-*"):
        if _stale(tmp.name, TMP_PREFIX):
            shutil.rmtree(tmp, ignore_errors=True)


class Cluster:
    """Two or more hosts joined by veth links to the first host (a star: host 0 reaches every other host)."""

    def __init__(self, hosts: tuple[str, ...] = ("a", "b")):
        assert 2 <= len(hosts) <= 200
        self.names = hosts
        self.ns = {h: f"{PREFIX}{os.getpid()}-{h}" for h in hosts}
        self.ip = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(hosts)}
        # Short (Ray's socket paths must fit 107 characters), and named by this pid like the namespaces.
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir="/tmp"))
        self._procs: list[subprocess.Popen] = []
        self._starts: dict[str, int] = {}
        self.token = secrets.token_hex(32)  # Ray's token auth, explicit: the same on every node and driver

    # ------------------------------------------------------------------------------------------- set-up

    def __enter__(self) -> Cluster:
        clean_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        first = self.names[0]
        for h in self.names:
            _ip("netns", "add", self.ns[h])
            _ip("-n", self.ns[h], "link", "set", "lo", "up")
        if len(self.names) == 2:  # one veth pair, the same interface name at both ends
            a, b = self.names
            _ip("link", "add", IFACE, "netns", self.ns[a], "type", "veth", "peer", "name", IFACE, "netns", self.ns[b])
            for h in (a, b):
                _ip("-n", self.ns[h], "addr", "add", f"{self.ip[h]}/24", "dev", IFACE)
                _ip("-n", self.ns[h], "link", "set", IFACE, "up")
            return
        # More hosts: a bridge in the first host; every host (the first too) has an IFACE port on it.
        _ip("-n", self.ns[first], "link", "add", "dpbr0", "type", "bridge")
        _ip("-n", self.ns[first], "link", "set", "dpbr0", "up")
        for i, h in enumerate(self.names):
            port = f"dpp{i}"
            _ip("link", "add", IFACE, "netns", self.ns[h], "type", "veth", "peer", "name", port, "netns",
                self.ns[first])  # fmt: skip
            _ip("-n", self.ns[first], "link", "set", port, "master", "dpbr0")
            _ip("-n", self.ns[first], "link", "set", port, "up")
            _ip("-n", self.ns[h], "addr", "add", f"{self.ip[h]}/24", "dev", IFACE)
            _ip("-n", self.ns[h], "link", "set", IFACE, "up")

    def close(self) -> None:
        """Every process started here and every process in the namespaces killed; the namespaces deleted."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for h in self.names:
            kill_namespace(self.ns[h])
            _ip("netns", "del", self.ns[h], check=False)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- commands

    def wrap(self, host: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *args]

    def run(self, host: str, args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        """``args`` in ``host``, to completion (its output captured as text)."""
        return subprocess.run(self.wrap(host, args), capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, host: str, args: list[str], **kw) -> subprocess.Popen:
        """``args`` in ``host`` in a process group of its own (killed at :meth:`close`)."""
        proc = subprocess.Popen(self.wrap(host, args), start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def kill_host(self, host: str) -> None:
        """A lost node: SIGKILL to every process of ``host``."""
        kill_namespace(self.ns[host])

    def link_bytes(self, host: str) -> int:
        """Bytes received plus sent on ``host``'s link so far."""
        stats = Path("/sys/class/net")  # read inside the namespace: sysfs shows the caller's namespace
        r = self.run(
            host, ["cat", str(stats / IFACE / "statistics/rx_bytes"), str(stats / IFACE / "statistics/tx_bytes")]
        )
        return sum(int(x) for x in r.stdout.split())

    # ------------------------------------------------------------------------------------------- Ray

    def ray_env(self, extra: dict | None = None) -> dict:
        repo = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        return os.environ | {
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": f"{repo}:{path}" if path else repo,
            "PYTHONUNBUFFERED": "1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        } | (extra or {})  # fmt: skip

    def _temp_dir(self, host: str) -> str:
        """A fresh --temp-dir per start of a node (a restarted node does not reuse a killed one's sockets)."""
        n = self._starts[host] = self._starts.get(host, 0) + 1
        d = self.tmp / f"{host}{n}"
        d.mkdir()
        return str(d)

    def _ray_start(self, host: str, args: list[str], cpus: int) -> None:
        cmd = [RAY, "start", "--node-ip-address", self.ip[host], "--temp-dir", self._temp_dir(host),
               "--num-cpus", str(cpus), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
               *args]  # fmt: skip
        r = self.run(host, cmd, timeout=240, env=self.ray_env())
        if r.returncode != 0:
            raise RuntimeError(
                f"ray start in host {host} failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-3000:]}"
            )

    def start_head(self, host: str, port: int = 29479, cpus: int = 2) -> str:
        """A Ray head in ``host`` (no dashboard); returns its address for ``--address``."""
        self._ray_start(host, ["--head", "--port", str(port), "--include-dashboard", "false"], cpus)
        self.head = f"{self.ip[host]}:{port}"
        return self.head

    def start_node(self, host: str, cpus: int = 2, resources: str | None = None) -> None:
        """A Ray worker node in ``host`` joining the head (its ``--resources`` JSON, when given)."""
        self._ray_start(host, ["--address", self.head, *(["--resources", resources] if resources else [])], cpus)

    def wait_nodes(self, n: int, host: str | None = None, timeout: float = 120) -> None:
        """Until the head counts ``n`` alive nodes."""
        probe = (
            "import ray, sys, time\n"
            f"ray.init(address={self.head!r}, logging_level='ERROR')\n"
            f"end = time.time() + {timeout}\n"
            f"while sum(x['Alive'] for x in ray.nodes()) != {n} and time.time() < end: time.sleep(0.5)\n"
            f"sys.exit(0 if sum(x['Alive'] for x in ray.nodes()) == {n} else 1)\n"
        )
        r = self.run(host or self.names[0], [sys.executable, "-c", probe], timeout=timeout + 120, env=self.ray_env())
        if r.returncode != 0:
            raise RuntimeError(f"the cluster did not reach {n} alive nodes: {r.stderr[-3000:]}")
