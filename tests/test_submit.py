"""`launch/ray_job.sh` / `distpddm submit` against a real Ray head with its job server on this machine."""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests import fixtures

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    """Ends this head's processes only: its process group and the processes under it or naming its temp dir
    (never `ray stop`, which ends every Ray cluster on the machine)."""
    mine = set()
    with contextlib.suppress(psutil.NoSuchProcess):
        mine |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or []):
            mine.add(p.info["pid"])
            with contextlib.suppress(psutil.NoSuchProcess):
                mine |= {c.pid for c in p.children(recursive=True)}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):  # `ray start --block` takes > 30 s to end on its own
        proc.wait(timeout=5)
    for pid in mine | {proc.pid}:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node Ray cluster with the job server on free loopback ports, token authentication on (Ray 2.60's
    default for a new head when a token exists): http address, and the environment a user's shell has."""
    pytest.importorskip("aiohttp", reason="the Ray job server needs ray[default] (pyproject; `make install`)")
    temp_dir = tempfile.mkdtemp(prefix="dps", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = _free_ports(9)
    env = os.environ | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(ports[0]), "--dashboard-port", str(ports[1]), "--dashboard-host", "127.0.0.1",
        "--include-dashboard", "true", "--temp-dir", temp_dir, "--num-cpus", "2", "--disable-usage-stats",
        "--node-manager-port", str(ports[2]), "--object-manager-port", str(ports[3]),
        "--ray-client-server-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
        "--dashboard-agent-listen-port", str(ports[6]), "--dashboard-agent-grpc-port", str(ports[7]),
        "--runtime-env-agent-port", str(ports[8]),
    ]  # fmt: skip
    log = open(tmp_path_factory.mktemp("head") / "ray_start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail("the Ray head did not start:\n" + Path(log.name).read_text()[-3000:])
                time.sleep(1)
        yield address, env
    finally:
        _stop(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's folder: configs/run.yaml naming ../shards/train and ../runs relative to itself."""
    root = tmp_path_factory.mktemp("project")
    fixtures.font_shards(root, 40)
    (root / "configs").mkdir()
    tree = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    tree["name"] = "submitted"
    tree["data"] |= {"train_shards": "../shards/train", "classes_per_batch": 8}
    tree["train"] = {"steps": 6, "log_every": 3, "checkpoint_every": 6, "keep_checkpoints": 1, "progress": False}
    tree["ray"] = {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0, "storage_path": "../runs"}
    (root / "configs" / "run.yaml").write_text(yaml.safe_dump(tree))  # train.deepspeed: the package default
    (root / "elsewhere").mkdir()
    return root


def _submit(args, cwd, env, timeout=900):
    return subprocess.run(
        ["bash", str(REPO / "launch" / "ray_job.sh"), *args],
        cwd=cwd,
        env=env | {"PY": sys.executable, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _jobs(address: str, env: dict) -> list[str]:
    code = "import json, sys; from distpddm.submit import _client; "
    code += "print(json.dumps([j.submission_id for j in _client(sys.argv[1]).list_jobs()]))"
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ray_job_sh_runs_a_config_from_another_folder_and_refuses_a_bad_one(head, project):
    address, env = head
    # From a folder that is neither the repository nor the config's: the config's paths are its own folder's.
    ok = _submit(["../configs/run.yaml", "--address", address], project / "elsewhere", env)
    output = ok.stdout + ok.stderr
    assert ok.returncode == 0, output[-5000:]
    size = re.search(r"working dir: .* -> (\d+) files, ([\d.]+) MiB zipped \(upload size\)", ok.stdout)
    assert size, ok.stdout[-3000:]
    assert float(size.group(2)) < 3.0 and int(size.group(1)) < 400  # source only: no shards, runs, .venv, .git
    job_id = re.search(r"job id: (distpddm-submitted-\S+)", ok.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in ok.stdout
    assert "done: step 6" in ok.stdout  # the job's own output, followed
    run = project / "runs" / "submitted"
    assert (run / "model.pt").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [3, 6]
    shipped = yaml.safe_load((run / "config.yaml").read_text())  # as the job resolved it on the head
    assert shipped["data"]["train_shards"] == str((project / "shards" / "train").resolve())
    assert shipped["ray"]["storage_path"] == str((project / "runs").resolve())
    assert Path(shipped["train"]["deepspeed"]).name == "deepspeed.json"  # shipped beside the config

    # A bad config fails here, with the config error, and submits nothing.
    before = _jobs(address, env)
    assert before == [job_id]
    bad = _submit(["../configs/run.yaml", "data.train_shards=no/shards", "--address", address], project / "elsewhere",
                  env)  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    missing = str(project / "elsewhere" / "no" / "shards")  # an override: relative to the current folder
    assert f"error: invalid config:\n  - data.train_shards: no shards at '{missing}'" in bad.stderr
    assert "Traceback" not in bad.stderr and "job id" not in bad.stdout
    assert _jobs(address, env) == before
