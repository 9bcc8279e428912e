"""Fault injection: disturb a small training run in one way, recover as a user would (rerun the same command,
after freeing the disk, restoring the shard, waiting for the server), and say whether work was lost.

Each fault is one function ``fault_<name>(bench, rng) -> Outcome``. Its outcome is

- ``equal``: every run of the trial ended as documented (0, or 3 for a stop request) and the final
  ``model.pt`` is bitwise equal (``torch.equal``, CPU) to an undisturbed run's, resumed from the newest
  committed checkpoint (never from an older one: with an exact resume an older one would give the same
  weights, so the resume step is checked too);
- ``clear_error``: one run ended with a documented one-line error (``error: ...``, exit 1 or 2, no
  traceback), and the recovery then ended ``equal``;
- ``unclear_error``: as ``clear_error``, but the error was a traceback or an undocumented exit code;
- ``lost_work``: anything else -- final weights that differ, a resume from an older state than the newest
  committed checkpoint, a silent step 0, a hang, a committed checkpoint gone.

Runs are tiny and deterministic (``configs/smoke.yaml``: small_cnn, 32 px glyphs of 30 fonts, 12 steps, a
checkpoint every 2, ``--local`` wherever the fault allows; Ray with 2 workers where it needs Ray), so the
reference is one undisturbed run of the same command. ``tests/test_faults.py`` runs one trial of each.

    python bench/faults.py --trials 5 --faults kill_worker,corrupt_latest --write-doc

writes the table into docs/reliability.md between ``<!-- faults:begin -->`` and ``<!-- faults:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import fixtures  # noqa: E402 -- the tests' HTTP store, after the repository is on the path

STEPS = 12  # every run: 12 steps, a checkpoint every 2, the 3 newest kept
EVERY = 2
KEEP = 3
OUTCOMES = ("equal", "clear_error", "unclear_error", "lost_work")
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
TIMEOUT = 300  # seconds a run may take before the trial counts as a hang


@dataclass
class Outcome:
    kind: str  # one of OUTCOMES
    note: str = ""

    def __post_init__(self):
        assert self.kind in OUTCOMES, self.kind


@dataclass
class Run:
    """A finished ``distpddm train`` process."""

    rc: int | None  # None: killed by the harness, or hung
    out: str
    err: str

    @property
    def resumed(self) -> int | None:
        found = RESUMED.findall(self.out + self.err)
        return int(found[-1][1]) if found else None

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def clear_error(self) -> bool:
        """A documented refusal: exit 1 or 2 with one ``error:`` line and no traceback."""
        return self.rc in (1, 2) and len(self.errors) == 1 and "Traceback" not in self.err

    def tail(self, n: int = 300) -> str:
        text = (self.errors[-1] if self.errors else (self.err.strip().splitlines() or [""])[-1]).strip()
        return text[:n]


# ---------------------------------------------------------------------------------- in the child process

# `distpddm train` with a SIGKILL planted inside it (DISTPDDM_FAULT, JSON): after optimiser step `step`
# ("at": "step"), or at the `event`-th file-system event of the checkpoint of step `step` (a torch.save -- the
# file then half written --, an fsync, a rename or replace, an rmtree: before or after it), or just after that
# checkpoint ("at": "after"). With "count", it writes the number of events of each checkpoint there instead.
INJECT = r"""
import io, json, os, shutil, signal, sys
import torch
plan = json.loads(os.environ.get("DISTPDDM_FAULT", "{}"))
from distpddm.train import trainer
state = {"in": False, "n": 0}
counts = {}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def event():
    if state["in"]:
        state["n"] += 1
        if plan.get("at") == "event" and state["n"] == plan["event"]:
            die()

def wrap(mod, name):
    orig = getattr(mod, name)
    def wrapped(*a, **k):
        event()
        result = orig(*a, **k)
        event()
        return result
    setattr(mod, name, wrapped)

for mod, name in ((os, "fsync"), (os, "rename"), (os, "replace"), (shutil, "rmtree")):
    wrap(mod, name)
orig_save = torch.save

def save(obj, f, *a, **k):
    if state["in"] and isinstance(f, (str, os.PathLike)):
        state["n"] += 1
        if plan.get("at") == "event" and state["n"] == plan["event"]:
            buf = io.BytesIO()
            orig_save(obj, buf, *a, **k)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
    return orig_save(obj, f, *a, **k)

torch.save = save
orig_step, orig_ckpt = trainer.Trainer.train_step, trainer.Trainer.save_checkpoint

def train_step(self):
    result = orig_step(self)
    if plan.get("at") == "step" and self.step == plan["step"]:
        die()
    return result

def save_checkpoint(self):
    state["in"], state["n"] = self.step == plan.get("step") or "count" in plan, 0
    orig_ckpt(self)
    counts[self.step] = state["n"]
    state["in"] = False
    if "count" in plan:
        with open(plan["count"], "w") as f:
            json.dump(counts, f)
    if plan.get("at") == "after" and self.step == plan["step"]:
        die()

trainer.Trainer.train_step, trainer.Trainer.save_checkpoint = train_step, save_checkpoint
from distpddm.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ------------------------------------------------------------------------------------------- the bench


def _weights(path: Path) -> dict:
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"net.{k}": v for k, v in blob["state_dict"].items()}
    if blob.get("metric"):
        flat |= {f"metric.{k}": v for k, v in blob["metric"]["state_dict"].items()}
    return flat


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def committed_steps(run: Path) -> list[int]:
    """The committed checkpoints of a ``--local`` run (``checkpoints/step-N``), oldest first."""
    found = [p.name for p in (run / "checkpoints").glob("step-*") if p.is_dir()]
    return sorted(int(n[5:]) for n in found if n[5:].isdigit())


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if "loss" in row:
                steps.append(int(row["step"]))
    return steps


def ray_registered_step(run: Path) -> int:
    """The step of the last checkpoint Ray Train registered (what a restarted attempt resumes from)."""
    try:
        latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Bench:
    """The work folder, the shards, the undisturbed references and the run helpers every fault uses."""

    def __init__(self, work: Path, fonts: int = 30, verbose: bool = False):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self.shards = self._shards(fonts)
        self.env = os.environ | {
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
        }
        self._refs: dict[str, Path] = {}
        self.counts: dict[int, int] = {}
        self._n = 0

    def _shards(self, fonts: int) -> Path:
        """Glyph shards of ``fonts`` fonts in small shards (~90 images each: a 12-step run opens several), built
        as tests/fixtures.py builds them."""
        root = self.work / "data"
        if not (root / "shards" / "train" / "index.json").exists():
            from distpddm.data.shards import BuildOptions, build
            from distpddm.data.sources import read_source
            from tests import fixtures

            fixtures.copy_fonts(root / "fonts", fonts)
            os.environ.setdefault("DISTPDDM_CACHE", str(root / "cache"))
            plan = read_source("fonts", None, fonts=[root / "fonts"], font_size=32)
            build(plan, root / "shards", BuildOptions(shard_bytes=200_000, progress=False))
        return root / "shards" / "train"

    def folder(self, what: str) -> Path:
        """A new, empty folder for one trial."""
        self._n += 1
        path = self.work / "trials" / f"{self._n:03d}-{what}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -------------------------------------------------------------------------------------- commands

    def args(self, storage: Path | str, name: str = "run", *, ray: bool = False, shards=None, extra=()) -> list[str]:
        mode = [] if ray else ["--local"]
        workers = ["ray.num_workers=2", "ray.max_failures=2"] if ray else []
        return [
            "train", *mode, "configs/smoke.yaml", f"name={name}", f"ray.storage_path={storage}",
            f"data.train_shards={shards or self.shards}", "data.val_shards=null", "train.progress=false",
            "train.log_every=1", f"train.checkpoint_every={EVERY}", f"train.keep_checkpoints={KEEP}",
            "data.loader_workers=1", f"train.steps={STEPS}", *workers, *extra,
        ]  # fmt: skip

    def start(self, args: list[str], log: Path, fault: dict | None = None, env: dict | None = None):
        """``distpddm`` in a session of its own (its loader workers in its process group); output in ``log``."""
        cmd = [sys.executable, "-c", INJECT, *args] if fault is not None else [sys.executable, "-m", "distpddm.cli"]
        if fault is None:
            cmd += args
        env = (env or self.env) | ({"DISTPDDM_FAULT": json.dumps(fault)} if fault is not None else {})
        out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")  # noqa: SIM115 -- closed in finish()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        proc.files = (out, err, log)
        return proc

    def finish(self, proc, timeout: float = TIMEOUT) -> Run:
        """Wait for ``proc`` (killed, with its group, after ``timeout``: a hang) and read its output."""
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(proc.pid)
            proc.wait()
            rc = None
        out, err, log = proc.files
        out.close()
        err.close()
        return Run(rc, Path(f"{log}.out").read_text(errors="replace"), Path(f"{log}.err").read_text(errors="replace"))

    def run(self, args: list[str], log: Path, fault: dict | None = None, env=None, timeout=TIMEOUT) -> Run:
        return self.finish(self.start(args, log, fault, env), timeout)

    def kill_group(self, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def wait_group(self, pgid: int, timeout: float = 60) -> float:
        """Until no process of the group is left (a killed driver's orphaned loader workers exit on their own
        within seconds); the seconds waited."""
        t0 = time.time()
        while _group_alive(pgid) and time.time() - t0 < timeout:
            time.sleep(0.1)
        if _group_alive(pgid):
            self.kill_group(pgid)
        return time.time() - t0

    def rerun(self, args: list[str], log: Path, after: int | None, notes: list[str], **kw) -> Run:
        """The user's recovery: the same command, right after the fault. Refused because the folder is still
        held (``after``: the killed process's group, whose orphans may hold the lock a few seconds), it is
        rerun once they are gone, as a user would after reading the message."""
        again = self.run(args, log, **kw)
        if again.rc == 1 and "in use by a living run" in again.err and after is not None:
            waited = self.wait_group(after)
            notes.append(f"rerun refused while the killed run's children held the lock ({waited:.1f} s)")
            again = self.run(args, Path(f"{log}-again"), **kw)
        return again

    # -------------------------------------------------------------------------------------- references

    def reference(self, kind: str = "local") -> Path:
        """The undisturbed run's ``model.pt`` (``local`` or ``ray``, 2 workers), run once per bench."""
        if kind not in self._refs:
            folder = self.work / f"reference-{kind}"
            model = folder / "run" / "model.pt"
            counts = folder / "counts.json"
            if not model.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                fault = {"count": str(counts)} if kind == "local" else None
                done = self.run(self.args(folder, ray=kind == "ray"), folder / "log", fault=fault, timeout=900)
                if done.rc != 0 or not model.exists():
                    raise RuntimeError(f"the {kind} reference run failed (exit {done.rc}): {done.err[-3000:]}")
            if kind == "local":
                self.counts = {int(k): v for k, v in json.loads(counts.read_text()).items()}
            self._refs[kind] = model
        return self._refs[kind]

    def judge(self, run: Path, final: Run, *, expect_from: int | None, kind: str = "local", notes=(),
              error: Run | None = None) -> Outcome:  # fmt: skip
        """The trial's outcome from its last run (``final``), the step it had to resume from at least
        (``expect_from``; None: not checked) and the error a run met on the way (``error``, if any)."""
        notes = list(notes)
        if final.rc is None:
            return Outcome("lost_work", "; ".join([*notes, "the recovery run hung"]))
        if final.clear_error():  # the rerun refused, in one line: the state is the user's to mend
            return Outcome("clear_error", "; ".join([*notes, f"rerun refused (exit {final.rc}): {final.tail(200)}"]))
        if final.rc != 0 or not (run / "model.pt").exists():
            return Outcome(
                "lost_work", "; ".join([*notes, f"the recovery run failed (exit {final.rc}): {final.tail()}"])
            )
        resumed = final.resumed
        if expect_from:
            if resumed is None:
                return Outcome("lost_work", "; ".join([*notes, f"started from step 0, not {expect_from}"]))
            if resumed < expect_from:
                return Outcome("lost_work", "; ".join([*notes, f"resumed at step {resumed}, not {expect_from}"]))
        if not same_weights(run / "model.pt", self.reference(kind)):
            return Outcome("lost_work", "; ".join([*notes, f"final weights differ (resumed at {resumed})"]))
        if error is not None:
            notes.append(f"exit {error.rc}: {error.tail(160)}")
            return Outcome("clear_error" if error.clear_error() else "unclear_error", "; ".join(notes))
        return Outcome("equal", "; ".join(notes))


# --------------------------------------------------------------------------------------------- the faults


def fault_kill_worker(bench: Bench, rng: random.Random) -> Outcome:
    """SIGKILL of the training process (``--local``: the worker, rank 0 and lock holder) after a random step,
    or at a random point inside a checkpoint write (a half-written file, before or after an fsync, the
    folder's rename, ``latest``'s replace, pruning); then the same command."""
    bench.reference("local")
    step = rng.randint(1, STEPS - 1)
    if step % EVERY == 0 and rng.random() < 0.75:
        event = rng.randint(1, bench.counts.get(step, 1) + 1)
        fault = {"at": "event", "step": step, "event": event} if event <= bench.counts.get(step, 0) else {}
        fault = fault or {"at": "after", "step": step}
        where = f"checkpoint {step}, event {event} of {bench.counts.get(step)}"
    else:
        fault, where = {"at": "step", "step": step}, f"after step {step}"
    folder = bench.folder("kill_worker")
    args = bench.args(folder)
    proc = bench.start(args, folder / "first", fault=fault)
    first = bench.finish(proc)
    if first.rc != -signal.SIGKILL:
        return Outcome("lost_work", f"{where}: the planted kill did not happen (exit {first.rc}): {first.tail()}")
    committed = committed_steps(folder / "run")
    notes = [f"killed {where}"]
    again = bench.rerun(args, folder / "again", after=proc.pid, notes=notes)
    return bench.judge(folder / "run", again, expect_from=max(committed, default=0), notes=notes)


def _kill_at_step(bench: Bench, args: list[str], run: Path, log: Path, step: int, env=None, timeout=TIMEOUT):
    """Start ``args``, SIGKILL its main process once ``step`` steps are logged; (process group, logged step at
    the kill or None when the run ended first, the killed run)."""
    proc = bench.start(args, log, env=env)
    t0, at = time.time(), None
    while proc.poll() is None and time.time() - t0 < timeout:
        if max(logged_steps(run), default=0) >= step:
            at = max(logged_steps(run))
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return proc.pid, at, bench.finish(proc)


def fault_corrupt_latest(bench: Bench, rng: random.Random) -> Outcome:
    """A run killed after a random checkpoint, whose ``checkpoints/latest`` is then garbage, empty, names a
    folder that is not there or an older checkpoint; then the same command."""
    bench.reference("local")
    step = rng.randrange(EVERY, STEPS, EVERY)
    folder = bench.folder("corrupt_latest")
    args = bench.args(folder)
    proc = bench.start(args, folder / "first", fault={"at": "after", "step": step})
    first = bench.finish(proc)
    if first.rc != -signal.SIGKILL:
        return Outcome("lost_work", f"the planted kill did not happen (exit {first.rc}): {first.tail()}")
    run = folder / "run"
    committed = committed_steps(run)
    how = rng.choice(["garbage", "empty", "missing", "older", "binary"])
    latest = run / "checkpoints" / "latest"
    content = {
        "garbage": b"step-\xff\xfe not a checkpoint\n", "empty": b"", "missing": b"step-99999999",
        "older": f"step-{committed[0]:08d}".encode(), "binary": bytes(rng.randrange(256) for _ in range(64)),
    }[how]  # fmt: skip
    latest.write_bytes(content)
    notes = [f"latest {how} after checkpoint {step}"]
    again = bench.rerun(args, folder / "again", after=proc.pid, notes=notes)
    return bench.judge(run, again, expect_from=max(committed), notes=notes)


def fault_truncated_checkpoint(bench: Bench, rng: random.Random) -> Outcome:
    """A run killed after a random checkpoint (not the first), one file of its newest checkpoint then cut at a
    random length; the same command must resume from the newest checkpoint that is whole (the one before)."""
    bench.reference("local")
    step = rng.randrange(2 * EVERY, STEPS, EVERY)
    folder = bench.folder("truncated_checkpoint")
    args = bench.args(folder)
    proc = bench.start(args, folder / "first", fault={"at": "after", "step": step})
    first = bench.finish(proc)
    if first.rc != -signal.SIGKILL:
        return Outcome("lost_work", f"the planted kill did not happen (exit {first.rc}): {first.tail()}")
    run = folder / "run"
    newest = run / "checkpoints" / f"step-{step:08d}"
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    victim = rng.choice(files)
    size = victim.stat().st_size
    cut = rng.randrange(size) if size else 0
    with open(victim, "r+b") as f:
        f.truncate(cut)
    older = [s for s in committed_steps(run) if s < step]
    notes = [f"{victim.relative_to(newest)} cut to {cut} of {size} bytes"]
    again = bench.rerun(args, folder / "again", after=proc.pid, notes=notes)
    return bench.judge(run, again, expect_from=max(older), notes=notes)


def fault_two_runs(bench: Bench, rng: random.Random) -> Outcome:
    """The same command twice on one run folder, the second started 0-3 s after the first: one must refuse
    (exit 1, naming the holder) and the other finish as if alone."""
    bench.reference("local")
    folder = bench.folder("two_runs")
    args = bench.args(folder)
    delay = rng.uniform(0, 3)
    first = bench.start(args, folder / "a")
    time.sleep(delay)
    second = bench.start(args, folder / "b")
    a, b = bench.finish(first), bench.finish(second)
    note = f"second started {delay:.1f} s after the first: exits {a.rc}, {b.rc}"
    refused = [r for r in (a, b) if r.rc != 0]
    if len(refused) != 1:
        done = a if a.rc == 0 else b
        if a.rc == 0 and b.rc == 0 and "already at step" in (a.err + b.err):  # one ran after the other ended
            return bench.judge(folder / "run", done, expect_from=None, notes=[note, "one after the other"])
        return Outcome("lost_work", f"{note}; both ran: {a.tail()} | {b.tail()}")
    winner = a if refused[0] is b else b
    if "in use by a living run" not in refused[0].err:
        return Outcome("lost_work", f"{note}; the loser failed otherwise: {refused[0].tail()}")
    return bench.judge(folder / "run", winner, expect_from=None, notes=[note], error=refused[0])


def fault_usr1_term(bench: Bench, rng: random.Random) -> Outcome:
    """Two stop signals in a row (USR1 then TERM, TERM twice...) after a random step: the run must save a
    checkpoint at its step and exit 3; the same command then resumes there."""
    bench.reference("local")
    pair = rng.choice([("SIGUSR1", "SIGTERM"), ("SIGTERM", "SIGTERM"), ("SIGUSR1", "SIGUSR1"), ("SIGTERM", "SIGUSR1")])
    gap = rng.choice([0.0, 0.01, 0.2, 1.0])
    step = rng.randint(1, STEPS - 2)
    folder = bench.folder("usr1_term")
    args, run = bench.args(folder), folder / "run"
    proc = bench.start(args, folder / "first")
    t0 = time.time()
    while proc.poll() is None and max(logged_steps(run), default=0) < step and time.time() - t0 < TIMEOUT:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, getattr(signal, pair[0]))
        time.sleep(gap)
        os.kill(proc.pid, getattr(signal, pair[1]))
    first = bench.finish(proc)
    note = f"{pair[0]}, {pair[1]} {gap} s apart after step {step}"
    if first.rc == 0:  # the run ended before the signals: nothing to stop
        return bench.judge(run, first, expect_from=None, notes=[note, "ended before the signals"])
    if first.rc != 3:  # the rerun tells whether anything was lost
        notes, committed = [note, f"exit {first.rc}, not 3"], committed_steps(run)
        again = bench.rerun(args, folder / "again", after=proc.pid, notes=notes)
        return bench.judge(run, again, expect_from=max(committed, default=0), notes=notes, error=first)
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    if committed_steps(run)[-1:] != [stopped]:
        return Outcome("lost_work", f"{note}: preempted.json says {stopped}, newest checkpoint {committed_steps(run)}")
    notes = [f"{note}: stopped at {stopped}"]
    again = bench.rerun(args, folder / "again", after=proc.pid, notes=notes)
    return bench.judge(run, again, expect_from=stopped, notes=notes)


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes mounted at ``path`` (root only), unmounted on leaving."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs (root needed): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fault_disk_full(bench: Bench, rng: random.Random) -> Outcome:
    """``ray.storage_path`` on a tmpfs too small for the run (a random size: full at a random point of a
    random checkpoint); then the disk grown (remount) and the same command."""
    bench.reference("local")
    folder = bench.folder("disk_full")
    size = rng.randrange(2 << 20, 22 << 20, 4096)
    with tmpfs(folder / "disk", size) as disk:
        args, run = bench.args(disk), disk / "run"
        first = bench.run(args, folder / "first")
        note = f"{size >> 10} KiB"
        if first.rc == 0:
            return bench.judge(run, first, expect_from=None, notes=[note, "the run fit"])
        committed = committed_steps(run)
        note += f", full after step {max(logged_steps(run), default=0)}"
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True, capture_output=True)
        again = bench.run(args, folder / "again")
        return bench.judge(run, again, expect_from=max(committed, default=0), notes=[note], error=first)


def fault_shard_deleted(bench: Bench, rng: random.Random) -> Outcome:
    """A shard (its tar, or its index) deleted after a random step of a run; then the shard put back and the
    same command."""
    bench.reference("local")
    folder = bench.folder("shard_deleted")
    shards = folder / "shards"
    shutil.copytree(bench.shards, shards)
    args, run = bench.args(folder, shards=shards), folder / "run"
    tars = sorted(shards.glob("*.tar"))
    victim = rng.choice(tars)
    if rng.random() < 0.25:
        victim = victim.with_name(victim.name[: -len(".tar")] + ".idx.npz")
    step = rng.randint(1, STEPS - 2)
    proc = bench.start(args, folder / "first")
    t0 = time.time()
    while proc.poll() is None and max(logged_steps(run), default=0) < step and time.time() - t0 < TIMEOUT:
        time.sleep(0.02)
    kept = folder / victim.name
    shutil.move(victim, kept)
    first = bench.finish(proc)
    note = f"{victim.name} deleted after step {step}"
    committed = committed_steps(run)
    shutil.move(kept, victim)
    if first.rc == 0:
        return bench.judge(run, first, expect_from=None, notes=[note, "the run never needed it"])
    again = bench.run(args, folder / "again")
    return bench.judge(run, again, expect_from=max(committed, default=0), notes=[note], error=first)


@contextlib.contextmanager
def shard_server(root: Path):
    """``root`` over HTTP (the tests' store: HEAD, GET with Range), answering 503 while ``fail_until``."""
    with fixtures.http_store(root) as handler:
        handler.fail_until, handler.refused = 0.0, 0

        def answer(method: str, name: str, nth: int) -> int | None:
            if time.time() < handler.fail_until:
                handler.refused += 1
                return 503
            return None

        handler.answer = answer
        yield handler


def fault_storage_503(bench: Bench, rng: random.Random) -> Outcome:
    """The training split on an HTTP server (fsspec) that answers 503 to every request for ten seconds from a
    random step on; after it, the same command. (The run folder itself cannot be remote with ``--local``, and
    Ray's checkpoints on remote storage need an object store this machine lacks: the shards are what is
    remote here.)"""
    bench.reference("local")
    folder = bench.folder("storage_503")
    with shard_server(bench.shards.parent) as handler:
        url = f"{handler.base}/train/index.json"
        args, run = bench.args(folder, shards=url), folder / "run"
        step = rng.randint(1, STEPS - 2)
        proc = bench.start(args, folder / "first")
        t0 = time.time()
        while proc.poll() is None and max(logged_steps(run), default=0) < step and time.time() - t0 < TIMEOUT:
            time.sleep(0.02)
        handler.fail_until = time.time() + 10
        first = bench.finish(proc)
        note = f"503 for 10 s after step {step} ({handler.refused} requests refused)"
        time.sleep(max(0.0, handler.fail_until - time.time()))
        committed = committed_steps(run)
        if first.rc == 0:
            return bench.judge(run, first, expect_from=None, notes=[note])
        again = bench.run(args, folder / "again")
        return bench.judge(run, again, expect_from=max(committed, default=0), notes=[note], error=first)


# ------------------------------------------------------------------------------------------------ Ray


def _ray_workers(driver: int) -> list:
    """The Ray Train worker actors of the local cluster ``driver`` started."""
    import psutil

    found = []
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if p.info["name"] == "ray::RayTrainWorker" and driver in {a.pid for a in p.parents()}:
                found.append(p)
    return found


def fault_kill_ray_worker(bench: Bench, rng: random.Random) -> Outcome:
    """Ray, 2 workers: SIGKILL of one worker after a random step; Ray restarts the workers from its last
    checkpoint (ray.max_failures=2) and the run finishes."""
    bench.reference("ray")
    folder = bench.folder("kill_ray_worker")
    args, run = bench.args(folder, ray=True), folder / "run"
    step = rng.randint(1, STEPS - 2)
    proc = bench.start(args, folder / "first")
    t0, killed, registered = time.time(), None, 0
    while proc.poll() is None and time.time() - t0 < TIMEOUT:
        if max(logged_steps(run), default=0) >= step:
            workers = _ray_workers(proc.pid)
            if workers:
                registered = ray_registered_step(run)
                victim = rng.choice(workers)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim.pid, signal.SIGKILL)
                killed = max(logged_steps(run))
            break
        time.sleep(0.05)
    done = bench.finish(proc, timeout=900)
    note = f"worker killed at step {killed}" if killed is not None else "the run ended first"
    return bench.judge(run, done, expect_from=registered or None, kind="ray", notes=[note])


def _group_names(pgid: int) -> list[str]:
    import psutil

    names = []
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(p.pid) == pgid:
                names.append(p.info["name"])
    return sorted(names)


def _whole_ray_steps(run: Path) -> list[int]:
    """Steps of the ``checkpoint_*`` folders whose every manifest's files are there with their sizes (whether or
    not Ray registered them)."""
    steps = []
    for folder in run.glob("checkpoint_*"):
        manifests = list(folder.glob("manifest_rank*.json"))
        try:
            whole = bool(manifests) and all(
                (folder / name).is_file() and (folder / name).stat().st_size == size
                for m in manifests
                for name, size in json.loads(m.read_text()).items()
            )
            if whole:
                steps.append(int(json.loads((folder / "distpddm_state.json").read_text())["step"]))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(steps)


def fault_kill_driver(bench: Bench, rng: random.Random) -> Outcome:
    """Ray, 2 workers: SIGKILL of the driver (``distpddm train``, which started the local Ray cluster) after a
    random step; then the same command, at once (what the dead driver's Ray cluster left running is noted)."""
    bench.reference("ray")
    folder = bench.folder("kill_driver")
    args, run = bench.args(folder, ray=True), folder / "run"
    step = rng.randint(1, STEPS - 2)
    pgid, at, first = _kill_at_step(bench, args, run, folder / "first", step, timeout=600)
    if at is None:
        return bench.judge(run, first, expect_from=None, kind="ray", notes=["the run ended first"])
    registered = ray_registered_step(run)
    notes = [f"driver killed at step {at} (checkpoint {registered} registered)"]
    time.sleep(2)
    left, went_on = _group_names(pgid), max(logged_steps(run), default=0)
    if went_on > at:
        notes.append(f"its workers logged up to step {went_on} after the kill")
    if left:
        notes.append(f"2 s later still running: {', '.join(left)}")
    whole = max(_whole_ray_steps(run), default=0)
    try:
        again = bench.rerun(args, folder / "again", after=None, notes=notes, timeout=900)
    finally:
        bench.kill_group(pgid)
    if again.resumed is not None and again.resumed < whole:
        notes.append(f"resumed at {again.resumed}: a whole checkpoint of step {whole} was on disk, not registered")
    return bench.judge(run, again, expect_from=max(whole, registered or 0) or None, kind="ray", notes=notes)


def fault_kill_host(bench: Bench, rng: random.Random) -> Outcome:
    """Two hosts (network namespaces, tests/cluster.py), one Ray worker each: every process of the second host
    SIGKILLed after a random step, the host back 3 s later; the run resumes from the last registered
    checkpoint and finishes."""
    from tests.cluster import Cluster, require_netns

    try:
        require_netns()
    except BaseException as e:  # pytest's Skipped outside pytest too
        raise PermissionError(f"no network namespaces: {e}") from None
    bench.reference("ray")
    folder = bench.folder("kill_host")
    step = rng.randint(1, STEPS - 2)
    with Cluster(("a", "b")) as cluster:
        cluster.start_head("a")
        cluster.start_node("b")
        cluster.wait_nodes(2)
        extra = ["ray.placement_strategy=STRICT_SPREAD", "ray.resources_timeout_s=300"]
        args = bench.args(folder, ray=True, extra=extra)
        args.insert(1, f"--address={cluster.head}")
        run = folder / "run"
        log = folder / "first"
        out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "distpddm.cli", *args]
        proc = cluster.popen("a", cmd, cwd=REPO, env=cluster.ray_env({"RAY_DEDUP_LOGS": "0"}), stdout=out, stderr=err)
        proc.files = (out, err, log)
        t0, killed, registered = time.time(), None, 0
        while proc.poll() is None and time.time() - t0 < 600:
            if max(logged_steps(run), default=0) >= step:
                registered = ray_registered_step(run)
                cluster.kill_host("b")
                killed = max(logged_steps(run))
                time.sleep(3)
                cluster.start_node("b")
                break
            time.sleep(0.05)
        done = bench.finish(proc, timeout=900)
    note = f"host b lost at step {killed}, back 3 s later" if killed is not None else "the run ended first"
    return bench.judge(run, done, expect_from=registered or None, kind="ray", notes=[note])


FAULTS = {
    name[len("fault_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("fault_") and callable(fn)
}
ORDER = ["kill_worker", "kill_ray_worker", "kill_driver", "kill_host", "disk_full", "shard_deleted",
         "corrupt_latest", "truncated_checkpoint", "two_runs", "usr1_term", "storage_503"]  # fmt: skip
assert sorted(ORDER) == sorted(FAULTS)


def trial(bench: Bench, name: str, seed: int) -> Outcome | str:
    """One trial of a fault; why not, when it cannot run here (root needed); an exception of the harness
    itself counts as lost work (a finding to look at)."""
    rng = random.Random(seed)
    try:
        return FAULTS[name](bench, rng)
    except PermissionError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001
        return Outcome("lost_work", f"harness: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class Tally:
    trials: int = 0
    counts: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    notes: list = field(default_factory=list)


def table(results: dict[str, Tally]) -> str:
    rows = [
        "| fault | trials | equal | clear error | unclear error | lost work | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in results.items():
        c = t.counts
        notes = "; ".join(dict.fromkeys(t.notes))[:600].replace("|", "/")
        rows.append(f"| `{name}` | {t.trials} | {c['equal']} | {c['clear_error']} | {c['unclear_error']} | "
                    f"{c['lost_work']} | {notes} |")  # fmt: skip
    return "\n".join(rows)


def write_doc(doc: Path, body: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=1, help="trials of each fault (kill_worker: twice this, at least 20 "
                   "when --trials >= 5)")  # fmt: skip
    p.add_argument("--faults", default=",".join(ORDER), help=f"comma-separated, of: {', '.join(ORDER)}")
    p.add_argument("--trials-of", default="", help="per-fault trials, e.g. kill_worker=20,kill_host=1")
    p.add_argument("--work", type=Path, default=Path("/tmp/distpddm-faults"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-doc", action="store_true", help="write the table into docs/reliability.md")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "reliability.md", help="the file --write-doc writes")
    p.add_argument("--json", type=Path, help="every trial's outcome, as JSON lines")
    args = p.parse_args(argv)
    from tqdm import tqdm

    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        p.error(f"unknown faults {unknown}; known: {', '.join(ORDER)}")
    per = {n: args.trials for n in names}
    for item in filter(None, args.trials_of.split(",")):
        key, value = item.split("=")
        per[key.strip()] = int(value)
    bench = Bench(args.work)
    results = {n: Tally() for n in names}
    plan = [(n, k) for n in names for k in range(per[n])]
    started = time.time()
    with tqdm(plan, unit="trial") as bar:
        for name, k in bar:
            bar.set_description(name)
            seed = args.seed * 100_003 + zlib.crc32(name.encode()) % 9973 * 1000 + k
            outcome = trial(bench, name, seed)
            tally = results[name]
            if isinstance(outcome, str):
                tally.notes.append(f"not run: {outcome}")
                bar.write(f"{name} #{k}: not run: {outcome}")
                continue
            tally.trials += 1
            tally.counts[outcome.kind] += 1
            if outcome.kind != "equal" or len(tally.notes) < 3:
                tally.notes.append(f"{outcome.kind}: {outcome.note}" if outcome.kind != "equal" else outcome.note)
            bar.write(f"{name} #{k} (seed {seed}): {outcome.kind}: {outcome.note}")
            if args.json:
                with args.json.open("a") as f:
                    row = {"fault": name, "trial": k, "seed": seed, "kind": outcome.kind, "note": outcome.note}
                    f.write(json.dumps(row) + "\n")
    text = table(results)
    print(text)
    if args.write_doc:
        command = "python bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:])
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cores = os.cpu_count()
        body = (f"{text}\n\n`{command}` ({time.time() - started:.0f} s), {when}, CPU, {cores} cores "
                f"({platform.machine()}, Python {platform.python_version()}).")  # fmt: skip
        write_doc(args.doc, body)
    return 1 if any(t.counts["lost_work"] for t in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
