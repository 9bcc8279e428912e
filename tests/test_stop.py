"""Stop requests (preemption): SIGUSR1 / SIGTERM to ``distpddm train`` save a checkpoint at the current step
and exit with status 3; the same command resumes from it. Local and Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import fixtures

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def font_shards(tmp_path_factory):
    return fixtures.font_shards(tmp_path_factory.mktemp("stop"), 30) / "train"


def _args(shards, out, name, steps, extra=()):
    return [
        "train",
        "configs/smoke.yaml",
        f"name={name}",
        f"ray.storage_path={out}",
        f"data.train_shards={shards}",
        f"train.steps={steps}",
        "train.checkpoint_every=1000",  # no periodic checkpoint: the one found is the stop's
        "train.log_every=1",
        "train.progress=false",
        "data.loader_workers=1",
        *extra,
    ]


def _logged_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").exists():
        return []
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _signal_after(args, run: Path, sig, after_step: int, env) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``distpddm`` and send ``sig`` once ``after_step`` steps are logged; (result, seconds to exit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distpddm.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = None
    try:
        deadline = time.time() + 500
        while proc.poll() is None and time.time() < deadline and sent is None:
            time.sleep(0.2)
            if max(_logged_steps(run), default=0) >= after_step:
                proc.send_signal(sig)
                sent = time.time()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent is not None, f"the run ended before the signal: {err[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - sent


def _cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "distpddm.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_sigusr1_to_a_local_run_checkpoints_the_current_step_and_a_rerun_resumes_there(font_shards, tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    args = _args(font_shards, tmp_path, "local", 200)
    run = tmp_path / "local"
    result, took = _signal_after(["train", "--local", *args[1:]], run, signal.SIGUSR1, 3, env)
    assert result.returncode == 3, result.stderr[-3000:]
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    assert 3 <= stopped < 200
    assert f"preempted: checkpoint at step {stopped}" in result.stdout
    assert (run / "checkpoints" / "latest").read_text() == f"step-{stopped:08d}"
    assert not (run / "model.pt").exists()  # not finished: no final export
    assert max(_logged_steps(run)) == stopped
    print(f"local: exit {took:.1f} s after SIGUSR1, at step {stopped}")

    again = _cli(["train", "--local", *args[1:], f"train.steps={stopped + 3}"], env)  # the last one wins
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {stopped}" in again.stderr and not (run / "preempted.json").exists()
    assert _logged_steps(run)[-3:] == [stopped + 1, stopped + 2, stopped + 3]
    assert (run / "model.pt").exists()


def test_sigterm_to_a_ray_driver_stops_every_worker_at_one_step_without_a_retry(font_shards, tmp_path):
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    args = _args(font_shards, tmp_path, "ray", 300, ["ray.num_workers=2", "ray.max_failures=2"])
    run = tmp_path / "ray"
    result, took = _signal_after(args, run, signal.SIGTERM, 3, env)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    assert 3 <= stopped < 300 and f"preempted: checkpoint at step {stopped}" in result.stdout
    saved = [json.loads(p.read_text())["step"] for p in run.glob("checkpoint_*/distpddm_state.json")]
    assert saved == [stopped]  # the stop's checkpoint, reported to Ray by both ranks (data_rank0/1)
    ckpt = next(p for p in run.glob("checkpoint_*") if p.is_dir())  # not Ray's checkpoint_manager_snapshot.json
    assert (ckpt / "data_rank0.json").exists() and (ckpt / "data_rank1.json").exists()
    # A success to Ray, no retry: a restarted attempt would resume at the stop's checkpoint, meet the stop
    # request again and save (and log) one step more.
    assert max(_logged_steps(run)) == stopped and "TrainingFailedError" not in result.stderr
    print(f"ray: exit {took:.1f} s after SIGTERM, at step {stopped}")

    again = _cli([*args, f"train.steps={stopped + 2}"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"done: step {stopped + 2}" in again.stdout and not (run / "preempted.json").exists()
    assert _logged_steps(run)[-2:] == [stopped + 1, stopped + 2]  # resumed there, not from step 0


# A process that logs without pause to stderr while rounds of two stop signals reach it: each round installs the
# handlers (as `distpddm train` does; "driver": with the Ray driver's action, which writes the request file),
# says "ready", waits until the request is acted on and a little longer, then reports how often it was acted on.
_STORM_CHILD = """
import logging, sys, time
from distpddm.train import stop

mode, rounds = sys.argv[1], int(sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(threadName)s %(message)s")
log = logging.getLogger("busy")
acted = []
if mode == "driver":
    from distpddm.train.launch import _request_stop

    class Out:  # the run folder: counts the request file's writes
        def write_text(self, name, text):
            acted.append((name, text))

    def install():
        return stop.install(lambda what: _request_stop(Out(), what))
else:

    class Count(logging.Handler):
        def emit(self, record):
            if "saving a checkpoint" in record.getMessage():
                acted.append(("log", record.args[0]))

    logging.getLogger("distpddm.train").addHandler(Count())
    install = stop.install
stop.install()  # the CLI's, first thing
n = 0
for r in range(rounds):
    previous = install()
    del acted[:]
    print("ready", r, flush=True)
    until = time.monotonic() + 30
    while time.monotonic() < until:
        n += 1
        log.info("busy %d %s", n, "x" * 200)
        if acted and until - time.monotonic() > 0.15:
            until = time.monotonic() + 0.15  # a second action would come by then
    stop.restore(previous)
    print("round", r, len(acted), " ".join(str(a[1]) for a in acted), flush=True)
"""


def _quiet(err: list[bytes]) -> str:
    """The child's stderr without its busy logging."""
    lines = b"".join(err).decode(errors="replace").splitlines()
    return "\n".join(line for line in lines if " busy " not in line)[-4000:]


@pytest.mark.parametrize("mode", ["local", "driver"])
def test_signal_storms_are_acted_on_once_without_deadlock_or_reentrant_logging(mode, tmp_path):
    """Two TERMs together (Slurm's and the batch script's forwarded one), or USR1 then TERM, 50 times while the
    main thread logs: one request each time, logged (and the driver's request file written) once, and no
    `RuntimeError: reentrant call` or deadlock from a handler that logs or takes a lock."""
    import threading

    rounds = 50
    child = tmp_path / "storm.py"
    child.write_text(_STORM_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(child), mode, str(rounds)],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # stderr buffered, as by default
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[bytes] = []

    def drain():  # slowly: the child's writes often wait for room in the pipe, where a signal interrupts them
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            err.append(chunk)
            time.sleep(0.005)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    killer = threading.Timer(120, proc.kill)  # a deadlocked child: killed, the test fails below
    killer.start()
    results, t0 = [], time.time()
    try:
        for r in range(rounds):
            line = proc.stdout.readline()
            assert line.split() == ["ready", str(r)], f"{line!r}\n{_quiet(err)}"
            first = signal.SIGUSR1 if r % 2 else signal.SIGTERM
            os.kill(proc.pid, first)
            os.kill(proc.pid, signal.SIGTERM)
            results.append((first.name, proc.stdout.readline().split()))
        proc.wait(timeout=30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
        drainer.join(timeout=10)
    took, text = time.time() - t0, b"".join(err).decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{_quiet(err)}"
    assert "reentrant call" not in text and "Traceback" not in text and "Logging error" not in text, _quiet(err)
    for r, (first, words) in enumerate(results):  # either signal's name: threads take them in any order
        assert words[:3] == ["round", str(r), "1"] and words[3] in (first, "SIGTERM"), f"{words}\n{_quiet(err)}"
    said = "the workers save a checkpoint" if mode == "driver" else "saving a checkpoint at the next step"
    assert sum(said in line for line in text.splitlines()) == rounds  # logged once a round
    print(f"{mode}: {rounds} signal pairs in {took:.1f} s")


_LATE_CHILD = """
import os, subprocess, sys, time
from distpddm.train import stop

stop.install()
subprocess.Popen(["sh", "-c", f"while kill -USR1 {os.getpid()}; do :; done"], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)  # until it is gone; not holding the test's pipes
time.sleep(0.5)  # the requests while running are the handler's
if sys.argv[1] == "ignore":
    stop.ignore_late()
sys.exit(3)
"""


def test_a_stop_signal_during_the_exit_does_not_kill_a_stopped_run(tmp_path):
    """The fault bench's `usr1_term`: USR1 twice 0.2 s apart, the checkpoint saved, then exit -10 -- Python puts
    back the default action at interpreter exit, and the second signal came then. With the signals ignored once
    the run has stopped, a stream of them during the exit leaves status 3."""
    child = tmp_path / "late.py"
    child.write_text(_LATE_CHILD)
    done = subprocess.run([sys.executable, str(child), "ignore"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
