"""The Ray layout ``launch/slurm.sbatch`` takes from a Slurm allocation, and the script's own decisions -- the
Ray it accepts, the exit status, the requeue, Ray's temporary folders -- with stand-ins for Slurm, Ray and the
driver (no Slurm needed)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distpddm.train.slurm import MIN_RAY, check_ray, ports, ray_problem, shell_env, wait_for_nodes

REPO = Path(__file__).resolve().parents[1]


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


# The batch script itself, outside Slurm: stand-ins on PATH for srun (runs the step here; on TERM it kills the
# step, as srun does), scancel (TERM to the steps), scontrol (two nodes, both this host; requeue: noted), ray
# (`ray start --block`: notes its --temp-dir, writes a file there, runs until stopped), and python for `distpddm
# train` (a driver that acts as STUB_DRIVER says) and for the wait for Ray (until both nodes' Ray have started).
_STUBS = {
    "srun": """while [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done
"$@" & step=$!
echo "$step" >> "$STUB_LOG.steps"
trap 'pkill -KILL -P "$step"; kill -KILL "$step"' TERM
while kill -0 "$step" 2>/dev/null; do wait "$step"; done
""",
    "scancel": """[[ $1 == --signal=TERM && $2 == "$SLURM_JOB_ID" ]] && xargs kill -TERM < "$STUB_LOG.steps"
""",
    "scontrol": """case "$1 $2" in
  "show hostnames") printf '%s\\n' n1 n2 ;;
  "show node") echo "NodeName=$3 NodeAddr=127.0.0.1 NodeHostName=$3" ;;
  "requeue "*) echo "requeue $2" >> "$STUB_LOG" ;;
esac
""",
    "ray": """if [[ $1 == --version ]]; then echo "ray, version ${STUB_RAY_VERSION:-2.60.0}"; exit; fi
trap 'exit 0' TERM
for arg; do [[ $arg == --temp-dir=* ]] && dir=${arg#--temp-dir=}; done
touch "$dir/session"
echo "ray $1 $dir" >> "$STUB_LOG"
while :; do sleep 0.05; done
""",
    "python": """case "$1 $2 $3" in
  "-m distpddm.train.slurm wait")  # until both nodes' Ray has started
    until (( $(cat "$STUB_LOG" 2>/dev/null | grep -c '^ray start') >= 2 )); do sleep 0.05; done; exit 0 ;;
  "-m distpddm.cli train") exec bash "$STUB_BIN/driver" ;;
esac
exec {python} "$@"
""",
    # STUB_DRIVER: "N": exit N at once; "usr1:N": on the script's USR1, exit N; "kick:SIG:N": send SIG to the
    # script and exit N at once, so that the signal and the driver's exit coincide.
    "driver": """echo "driver" >> "$STUB_LOG"
IFS=: read -r how sig code <<< "$STUB_DRIVER"
case $how in
  usr1) trap 'kill $!; exit "$sig"' USR1; echo "driver trapped" >> "$STUB_LOG"; sleep 60 & wait $! ;;
  kick)  # to the batch script, above the wrapper that runs the driver
    script=$PPID
    until (( script <= 1 )) || grep -q slurm.sbatch "/proc/$script/cmdline"; do
      script=$(cut -d' ' -f4 "/proc/$script/stat")
    done
    kill -"$sig" "$script"; exit "$code" ;;
  *) exit "$how" ;;
esac
""",
}


def _batch(tmp_path, driver: str, signal_when_driver_runs=None, **env):
    """``bash launch/slurm.sbatch`` with the stand-ins, job 4242 on two nodes; (result, stub log lines, ray tmp)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in _STUBS.items():
        (stubs / name).write_text("#!/usr/bin/env bash\n" + text.replace("{python}", sys.executable))
        (stubs / name).chmod(0o755)
    log, ray_tmp = tmp_path / "stub.log", tmp_path / "raytmp"
    log.unlink(missing_ok=True)
    Path(f"{log}.steps").unlink(missing_ok=True)  # srun's steps, for scancel: this run's only
    ray_tmp.mkdir(exist_ok=True)
    env = os.environ | {
        "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "STUB_BIN": str(stubs),
        "STUB_LOG": str(log), "STUB_DRIVER": driver, "DISTPDDM_RAY_TMP": str(ray_tmp), "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "2", **env,
    }  # fmt: skip
    proc = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", "configs/smoke.yaml"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if signal_when_driver_runs:
            deadline = time.time() + 60
            while time.time() < deadline and "driver trapped" not in (log.read_text() if log.exists() else ""):
                time.sleep(0.05)  # until the driver's trap is set
            proc.send_signal(signal_when_driver_runs)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().splitlines() if log.exists() else []
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), lines, ray_tmp


def test_the_batch_script_requeues_only_a_run_that_stopped_with_its_checkpoint(tmp_path):
    got, log, _ = _batch(tmp_path, "usr1:3", signal.SIGUSR1)
    assert got.returncode == 3, got.stdout + got.stderr
    assert "requeue 4242" in log and "requeued, it resumes" in got.stdout

    got, log, _ = _batch(tmp_path, "usr1:1", signal.SIGUSR1)  # USR1 came, but the run failed
    assert got.returncode == 1 and not any(line.startswith("requeue") for line in log), got.stdout + got.stderr
    assert "not requeued" in got.stderr, got.stderr

    got, log, _ = _batch(tmp_path, "3")  # stopped on a request of its own (TERM, the stop file): Slurm's call
    assert got.returncode == 3 and not any(line.startswith("requeue") for line in log), got.stdout + got.stderr


def test_each_nodes_ray_folder_is_its_own_unguessable_and_removed_when_the_job_ends(tmp_path):
    got, log, ray_tmp = _batch(tmp_path, "0")
    assert got.returncode == 0, got.stdout + got.stderr
    dirs = [Path(line.split()[2]) for line in log if line.startswith("ray start")]
    assert len(dirs) == 2 and len(set(dirs)) == 2 and all(d.parent == ray_tmp for d in dirs), dirs
    assert all(re.fullmatch(r"ray-4242\.\w{6}", d.name) for d in dirs), dirs  # mktemp's, with the job's id
    assert list(ray_tmp.iterdir()) == []  # each node's, removed as its `ray start` ended


def test_the_batch_script_exits_with_the_drivers_status_when_a_signal_comes_as_it_ends(tmp_path):
    """`wait` returns 128+N for a trapped signal: when the driver ends at that moment, its own status counts."""
    for sig, requeued in [("USR1", True)] * 5 + [("TERM", False)] * 3:
        got, log, _ = _batch(tmp_path, f"kick:{sig}:3")
        assert got.returncode == 3, f"{sig}: exit {got.returncode}\n{got.stdout}{got.stderr}"
        assert any(line.startswith("requeue") for line in log) == requeued, log


def test_the_batch_script_refuses_a_ray_without_token_authentication(tmp_path):
    got, log, _ = _batch(tmp_path, "0", STUB_RAY_VERSION="2.51.0")
    assert got.returncode == 2 and len(got.stderr.splitlines()) == 1, got.stderr
    assert "older than 2.52" in got.stderr and not any(line.startswith(("ray", "driver")) for line in log)
    assert _batch(tmp_path, "0", STUB_RAY_VERSION="2.52.0")[0].returncode == 0


def test_ray_versions_before_token_authentication_are_refused(monkeypatch):
    assert ray_problem("2.52.0") is None and ray_problem("2.60.1") is None and ray_problem("3.0.0.dev0") is None
    assert "older than 2.52" in ray_problem("2.51.9") and "older than 2.52" in ray_problem("2.40.0")
    assert "not installed" in ray_problem(None)
    assert check_ray("ray, version 2.60.0") is None  # this environment's
    assert "older than 2.52" in check_ray("ray, version 2.49.1") and "no `ray`" in check_ray("")
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.47.1")
    assert "older than 2.52" in check_ray(None)
    requirement = re.search(r'"ray\[[^"]*\]>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert tuple(int(x) for x in requirement[1].split(".")) == MIN_RAY  # the package requires what the script does
