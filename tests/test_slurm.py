"""``launch/slurm.sbatch`` on a real one-node Slurm (Debian's packages, :mod:`tests.slurm_cluster`): a CPU run
with ``sbatch --wait``, and preemption -- USR1 as ``--signal=B:USR1@120`` delivers it before the time limit --
that checkpoints, requeues the job and resumes at the saved step. Root only (skipped otherwise, saying why)."""

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import fixtures, slurm_cluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.why_not()
    if reason:
        pytest.skip(reason)
    t0 = time.time()
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm") / "cluster") as c:
        print(f"slurm: cluster up in {time.time() - t0:.1f} s")
        yield c


@pytest.fixture(scope="module")
def font_shards(tmp_path_factory):
    return fixtures.font_shards(tmp_path_factory.mktemp("slurm-shards"), 30) / "train"


@pytest.fixture
def ray_tmp():
    """Where the jobs' Ray keeps its temporary folders (DISTPDDM_RAY_TMP): short (Ray's socket paths stay under 108
    bytes), removed after."""
    path = tempfile.mkdtemp(prefix="dpslurm-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _job_env(cluster, ray_tmp: str) -> dict:
    """What the job inherits (sbatch exports the environment): this Python and its `ray` first on PATH, the
    checkout on PYTHONPATH, Ray on loopback (one node: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1)."""
    return cluster.env | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "DISTPDDM_RAY_TMP": ray_tmp,
        "PYTHONUNBUFFERED": "1",
    }


def _overrides(shards: Path, storage: Path, name: str, steps: int, extra=()) -> list[str]:
    return [
        f"name={name}",
        f"ray.storage_path={storage}",
        f"data.train_shards={shards}",
        f"train.deepspeed={REPO / 'configs/deepspeed/zero1_cpu.json'}",  # absolute: wherever the job starts
        f"train.steps={steps}",
        "train.progress=false",
        "data.loader_workers=1",
        "train.log_every=5",  # the assertions' own cadence, whatever configs/smoke.yaml says
        "train.checkpoint_every=10",
        "train.keep_checkpoints=1",
        *extra,  # later overrides win
    ]


def _sbatch(cluster, env, options: list[str], overrides: list[str], timeout: float = 60):
    """``sbatch OPTIONS launch/slurm.sbatch <smoke config> OVERRIDES`` from the checkout (2 CPUs: the node's)."""
    return cluster.run(
        "sbatch", *options, "--cpus-per-task=2", "launch/slurm.sbatch", str(REPO / "configs/smoke.yaml"),
        *overrides, timeout=timeout, check=False, env=env,
    )  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").exists():
        return []
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _ckpt_steps(run: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in run.glob("checkpoint_*/distpddm_state.json"))


def _left_behind(ray_tmp: str, job: str) -> list[str]:
    """What a job left in /tmp: its Ray folders (mktemp's ray-JOB.XXXXXX, one a node) and the driver's status."""
    left = [str(p) for p in Path(ray_tmp).rglob("*")] + [str(p) for p in Path("/tmp").glob(f"distpddm-{job}.*")]
    return sorted(left)


def test_sbatch_wait_runs_a_cpu_smoke_config_to_its_checkpoint_and_metrics(cluster, font_shards, tmp_path, ray_tmp):
    env = _job_env(cluster, ray_tmp)
    log = tmp_path / "job.log"
    t0 = time.time()
    got = _sbatch(cluster, env, ["--wait", f"--output={log}"], _overrides(font_shards, tmp_path, "smoke", 20), 900)
    took = time.time() - t0
    text = log.read_text() if log.exists() else ""
    assert got.returncode == 0, got.stderr + text[-5000:] + cluster.logs()
    run = tmp_path / "smoke"
    assert _ckpt_steps(run) == [20]
    assert [m["step"] for m in _metrics(run) if "loss" in m] == [5, 10, 15, 20]
    assert (run / "model.pt").exists()
    assert "ray: 1 node(s) up" in text and "done: step 20" in text
    assert _left_behind(ray_tmp, got.stdout.split()[-1]) == []
    config = (run / "config.yaml").read_text()
    assert "num_workers: 1" in config and "cpus_per_worker: 2" in config and "use_gpu: false" in config
    print(f"slurm: sbatch --wait of a 20-step smoke run: {took:.1f} s")


def _wait_for(what: str, ready, timeout: float, cluster, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(0.5)
    text = log.read_text()[-6000:] if log.exists() else "(no log)"
    raise AssertionError(f"waited {timeout:.0f} s for {what}\n{text}\n{cluster.logs()}")


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes_at_the_saved_step(
    cluster, font_shards, tmp_path, ray_tmp
):
    env = _job_env(cluster, ray_tmp)
    log, run, steps = tmp_path / "job.log", tmp_path / "preempt", 30
    overrides = _overrides(font_shards, tmp_path, "preempt", steps, [
        "train.log_every=1", "train.checkpoint_every=1000", "train.keep_checkpoints=3",
    ])  # fmt: skip
    got = _sbatch(cluster, env, ["--parsable", "--requeue", f"--output={log}"], overrides)
    assert got.returncode == 0, got.stderr
    job = got.stdout.strip().split(";")[0]
    t0 = time.time()
    _wait_for("5 steps", lambda: max((m["step"] for m in _metrics(run)), default=0) >= 5, 600, cluster, log)
    t_steps = time.time()
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    state = _wait_for(
        "the requeue",
        lambda: (j := cluster.job(job)).get("Restarts") == "1" and j.get("JobState") == "PENDING" and j,
        300,
        cluster,
        log,
    )
    t_requeued = time.time()
    print(f"slurm: requeued job pending, reason {state.get('Reason')}")
    # No begin-time delay (Slurm's default), but not within the second of the requeue: slurmd revokes the job's
    # credential at whole-second resolution and kills a relaunch whose credential dates from that same second
    # ("Killing non-startable batch JobId=...: Job credential revoked"; seen once, the job then ends FAILED).
    time.sleep(max(0.0, 2.0 - (time.time() - t_requeued)))
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    final = _wait_for(
        "the second attempt to end",
        lambda: (j := cluster.job(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and j,
        900,
        cluster,
        log,
    )
    t_done = time.time()
    text = log.read_text()
    assert final["JobState"] == "COMPLETED", text[-6000:]
    assert "attempt 1," in text and "attempt 2," in text  # SLURM_RESTART_COUNT 0, then 1
    stopped = int(re.search(r"preempted: checkpoint at step (\d+)", text).group(1))
    assert 5 <= stopped < steps
    assert "requeued, it resumes from the last checkpoint" in text
    assert re.search(rf"resumed from \S+ at step {stopped}\b", text), text[-6000:]
    # The stop's own checkpoint (no periodic one before step 1000), then the final one.
    assert _ckpt_steps(run) == [stopped, steps]
    logged = [m["step"] for m in _metrics(run) if "loss" in m]
    assert logged == list(range(1, steps + 1))  # each step once: the second attempt began at the saved step
    assert (run / "model.pt").exists() and not (run / "preempted.json").exists()
    assert _left_behind(ray_tmp, job) == []  # after both attempts
    print(
        f"slurm: preemption at step {stopped}: {t_steps - t0:.1f} s to step 5, {t_requeued - t_steps:.1f} s from "
        f"USR1 to the requeued job pending, {t_done - t_requeued:.1f} s for the second attempt"
    )
