"""The Ray layout ``launch/slurm.sbatch`` takes from a Slurm allocation (no Slurm needed)."""

import subprocess
import sys

import pytest

from distpddm.train.slurm import ports, shell_env, wait_for_nodes


def test_workers_follow_the_gpus_else_one_per_node_with_all_its_cpus():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "4", "SLURM_CPUS_ON_NODE": "64", "SLURM_GPUS_ON_NODE": "8"}
    lines = dict(line.split("=", 1) for line in shell_env(env).splitlines())
    assert (lines["NUM_WORKERS"], lines["CPUS_PER_WORKER"], lines["USE_GPU"], lines["GPUS"]) == ("32", "8", "true", "8")
    cpu = dict(line.split("=", 1) for line in shell_env(env | {"SLURM_GPUS_ON_NODE": ""}).splitlines())
    assert (cpu["NUM_WORKERS"], cpu["CPUS_PER_WORKER"], cpu["USE_GPU"], cpu["GPUS"]) == ("4", "64", "false", "0")
    bare = dict(line.split("=", 1) for line in shell_env({"SLURM_JOB_ID": "7"}).splitlines())
    assert (bare["NUM_WORKERS"], bare["CPUS_PER_WORKER"]) == ("1", "1")  # never 0 workers


def test_ports_differ_between_jobs_and_stay_below_the_ephemeral_range():
    a, b = ports(1000), ports(1001)
    assert len(set(a.values())) == len(a) and not set(a.values()) & set(b.values())
    assert a["min-worker"] < a["max-worker"] < b["gcs"]
    assert max(max(ports(j).values()) for j in range(200)) < 32768
    assert 6379 not in {p for j in range(200) for p in ports(j).values()}  # not Ray's default


def test_waiting_for_a_cluster_fails_fast_when_its_ray_start_has_ended():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(RuntimeError, match="ended before its node joined"):
        wait_for_nodes("127.0.0.1:9", 1, 30, [dead.pid])
    with pytest.raises(TimeoutError, match="no Ray head listening"):
        wait_for_nodes("127.0.0.1:9", 1, 1)
