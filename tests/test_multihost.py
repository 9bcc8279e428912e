"""Multi-host runs on real services (slow): hosts are network namespaces joined by a veth link (tests/cluster.py), each
with its own Ray node; the shared filesystem plays the cluster's shared storage. CPU only."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distpddm.ray_cluster import missing_resources
from tests import fixtures
from tests.cluster import IFACE, Cluster, require_netns
from tests.test_distributed import _single_process

REPO = Path(__file__).resolve().parents[1]
WORKER_LINE = re.compile(r"rank (\d) of 2 on node ([\d.]+) \(host [^,]+, gloo interface (\S+)\)")


def test_missing_resources_name_what_the_placement_strategy_lacks():
    one = [("10.0.0.1", {"CPU": 2.0, "memory": 1e9})]
    two = [*one, ("10.0.0.2", {"CPU": 1.0})]
    assert missing_resources(two, {"CPU": 1.0}, 2, "STRICT_SPREAD") is None
    assert missing_resources(one, {"CPU": 1.0}, 2, "PACK") is None  # two bundles fit on one node
    assert missing_resources(one, {"CPU": 1.0}, 2, "STRICT_SPREAD").endswith(
        "the cluster has 1 alive node(s) (10.0.0.1 {CPU: 2}), which host 1: missing 1 more node(s) with {CPU: 1}"
    )
    assert missing_resources(two, {"CPU": 2.0}, 2, "SPREAD").endswith(
        "which host 1: missing 1 more bundle(s) of {CPU: 2}"
    )
    why = missing_resources(two, {"CPU": 1.0, "GPU": 1.0}, 2, "STRICT_PACK")
    assert why.startswith("the run needs 2 bundles of {CPU: 1, GPU: 1} STRICT_PACK on one node")
    assert why.endswith(
        "(10.0.0.1 {CPU: 2, GPU: 0}; 10.0.0.2 {CPU: 1, GPU: 0}), which host 0: "
        "missing one node with 2 x {CPU: 1, GPU: 1}"
    )
    assert missing_resources([], {"CPU": 1.0}, 1, "PACK").endswith(
        "0 alive node(s) (none), which host 0: missing 1 more bundle(s) of {CPU: 1}"
    )


@pytest.fixture(scope="module")
def font_shards(tmp_path_factory):
    return fixtures.font_shards(tmp_path_factory.mktemp("multihost"), 60) / "train"


@pytest.fixture
def cluster():
    require_netns()
    with Cluster(("a", "b")) as c:
        yield c


def _train(cluster: Cluster, shards: Path, out: Path, steps: int, log: Path, extra=()):
    """``distpddm train`` as a driver in host a, connected to the head there; its output in ``log``."""
    args = [
        "name=mh",
        f"ray.storage_path={out}",
        f"data.train_shards={shards}",
        f"train.steps={steps}",
        "train.progress=false",
        "train.log_every=5",
        "train.checkpoint_every=10",
        "train.keep_checkpoints=2",
        "data.loader_workers=1",
        "ray.num_workers=2",
        "ray.max_failures=2",
        "ray.placement_strategy=STRICT_SPREAD",  # one worker per host
        *extra,
    ]
    cmd = [sys.executable, "-m", "distpddm.cli", "train", "--address", cluster.head, "configs/smoke.yaml", *args]
    env = cluster.ray_env({"RAY_DEDUP_LOGS": "0"})
    return cluster.popen("a", cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "loss" in line]


def _wait_for_step(proc, run: Path, step: int, timeout: float) -> None:
    end = time.time() + timeout
    while max(_steps(run), default=0) < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.time() < end, f"step {step} not reached in {timeout} s"
        time.sleep(0.5)


def _registered_step(run: Path) -> int:
    """The step of the last checkpoint Ray Train registered (a reported one it may still drop on a failure)."""
    try:
        latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


@pytest.mark.slow
def test_two_hosts_one_run_survives_a_lost_node_and_resumes(font_shards, tmp_path, cluster):
    t0 = time.time()
    cluster.start_head("a")
    cluster.start_node("b")
    cluster.wait_nodes(2)
    steps, run, log = 60, tmp_path / "mh", tmp_path / "driver.log"
    proc = _train(cluster, font_shards, tmp_path, steps, log, ["ray.resources_timeout_s=300"])
    end = time.time() + 600
    while _registered_step(run) < 10:  # a checkpoint Ray Train has registered, not only reported
        assert proc.poll() is None and time.time() < end, f"no checkpoint registered (exit {proc.poll()})"
        time.sleep(0.5)
    registered = _registered_step(run)
    cluster.kill_host("b")  # a lost node: its raylet, object store, workers, everything
    killed_at = max(_steps(run))
    assert killed_at < steps, "the run ended before the node was lost"
    time.sleep(3)
    cluster.start_node("b")
    proc.wait(timeout=900)
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]

    # Every attempt placed one rank per host, and each rank used its host's link for gloo.
    placed = [(int(r), ip, iface) for r, ip, iface in WORKER_LINE.findall(output)]
    assert len(placed) == 4, placed  # two ranks, two attempts
    for attempt in (placed[:2], placed[2:]):
        assert {r for r, _, _ in attempt} == {0, 1}
        assert {ip for _, ip, _ in attempt} == {cluster.ip["a"], cluster.ip["b"]}, attempt
        assert {iface for _, _, iface in attempt} == {IFACE}

    # The run resumed from its last registered checkpoint and finished at the configured step. Steps between that
    # checkpoint and the kill are logged twice; none are when the node died right at the checkpoint's step.
    logged = _steps(run)
    assert logged[-1] == steps
    resumed = re.findall(r"resumed from \S+ at step (\d+)\b", output)
    assert len(resumed) == 1, output[-5000:]
    resumed_from = int(resumed[0])
    assert resumed_from % 10 == 0 and registered <= resumed_from <= killed_at, (logged, registered, killed_at)
    restart = next((i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]), None)
    if restart is None:  # no step repeated: the last one logged before the kill was the checkpoint's
        assert killed_at == resumed_from and resumed_from + 5 in logged, (logged, resumed_from, killed_at)
    else:
        assert logged[restart] == resumed_from + 5, (logged, resumed_from)
    print(f"two hosts, lost node at step {killed_at}, resumed from {resumed_from}: {time.time() - t0:.0f} s")


@pytest.mark.slow
def test_a_lost_node_that_never_returns_fails_the_run_naming_the_missing_resources(font_shards, tmp_path, cluster):
    t0 = time.time()
    cluster.start_head("a")
    run, log = tmp_path / "mh", tmp_path / "driver.log"
    # Host b not there yet: the run does not start, and says so after the timeout.
    early = _train(cluster, font_shards, tmp_path, 1000, log, ["ray.resources_timeout_s=5"])
    early.wait(timeout=300)
    output = log.read_text()
    assert early.returncode == 1, output[-5000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: the run needs 2 bundles of {CPU: 1} STRICT_SPREAD over 2 nodes (ray.num_workers, ray.cpus_per_worker, "
        "ray.use_gpu, ray.placement_strategy); the cluster has 1 alive node(s) "
        f"({cluster.ip['a']} {{CPU: 2}}), which host 1: missing 1 more node(s) with {{CPU: 1}}; waited 5 s "
        "(ray.resources_timeout_s): add or restart the missing nodes"
    ], output[-5000:]
    assert not _steps(run)

    cluster.start_node("b")
    cluster.wait_nodes(2)
    proc = _train(cluster, font_shards, tmp_path, 1000, log, ["ray.resources_timeout_s=20"])
    _wait_for_step(proc, run, 5, timeout=600)
    cluster.kill_host("b")
    killed = time.time()
    proc.wait(timeout=600)
    waited = time.time() - killed
    output = log.read_text()
    assert proc.returncode == 1, output[-5000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the run needs 2 bundles of {CPU: 1} STRICT_SPREAD over 2 nodes (ray.num_workers, ray.cpus_per_worker, "
        "ray.use_gpu, ray.placement_strategy); the cluster has 1 alive node(s) "
        f"({cluster.ip['a']} {{CPU: 2}}), which host 1: missing 1 more node(s) with {{CPU: 1}}; waited 20 s "
        "(ray.resources_timeout_s): add or restart the missing nodes"
    ], output[-5000:]
    assert "Traceback" not in output.split(errors[0])[-1]
    assert max(_steps(run)) < 1000
    print(f"lost node never back: the run failed {waited:.0f} s after the kill, {time.time() - t0:.0f} s in all")


@pytest.mark.slow
def test_two_ranks_on_two_hosts_equal_one_process(tmp_path, cluster):
    # The gathered pool and its gradients cross the link: rank 1 can reach rank 0 only through it.
    t0 = time.time()
    out = tmp_path / "rank0.pt"
    body = "import sys; from tests.dist_workers import loss_and_grads; loss_and_grads(int(sys.argv[1]), 2, 29512, "
    body += "'pddm', 'anchor', sys.argv[2])"
    env = os.environ | {"MASTER_ADDR": cluster.ip["a"], "GLOO_SOCKET_IFNAME": IFACE, "PYTHONPATH": str(REPO)}
    before = cluster.link_bytes("b")
    procs = [
        cluster.popen(host, [sys.executable, "-c", body, str(rank), str(out)], cwd=REPO, env=env,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank, host in enumerate(("a", "b"))
    ]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    crossed = cluster.link_bytes("b") - before
    got = torch.load(out)
    loss, grads, quads = _single_process("pddm", "anchor")
    assert got["quadruplets"] == quads == 15
    torch.testing.assert_close(got["loss"], loss, rtol=1e-9, atol=1e-12)
    assert grads.keys() == got["grads"].keys()
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-7, atol=1e-10, msg=name)
    n_params = sum(g.numel() for g in grads.values())
    assert crossed > 8 * n_params, (crossed, n_params)  # at least the float64 gradients once
    print(f"two hosts equal one process: {crossed} bytes over the link, {time.time() - t0:.1f} s")
