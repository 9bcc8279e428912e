"""A run folder is one run's own: the lock, the resume check, checkpoints that are whole, pruning, RNG state
without pickle, the metrics file a killed run leaves, and where `distpddm eval` and `smoke` write."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distpddm.config import PartConfig, RunConfig, TrainConfig, from_dict
from distpddm.data import retry
from distpddm.errors import DeterministicError
from distpddm.loss import PDDMLoss
from distpddm.train import checkpoint
from distpddm.train.checkpoint import LocalPersistence, check_whole
from distpddm.train.metrics_log import drop_partial_line
from distpddm.train.runfolder import ResumeRefused, RunInUse, RunLock, check_resume, config_differences, fresh_name
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]


def test_the_lock_refuses_a_second_holder_and_names_the_first():
    import tempfile

    folder = tempfile.mkdtemp()
    with RunLock(folder), pytest.raises(RunInUse, match=rf'in use by a living run \(.*"pid": {os.getpid()}'):
        RunLock(folder).__enter__()
    with RunLock(folder):  # released at the end of the first
        pass


def test_a_dead_owner_does_not_hold_the_lock(tmp_path):
    """SIGKILL gives the holder no chance to clean up; the kernel releases the lock with the process."""
    code = "import sys, time; from distpddm.train.runfolder import RunLock; RunLock(sys.argv[1]).__enter__(); " \
           "print('held', flush=True); time.sleep(60)"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUse):
        RunLock(str(tmp_path)).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with RunLock(str(tmp_path)):
        pass


def _cfg(tmp_path, **train) -> RunConfig:
    cfg = RunConfig(name="r", train=TrainConfig(**train))
    import dataclasses

    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, storage_path=str(tmp_path)))


def _checkpoint(tmp_path, step: int, cfg: RunConfig, digest="abc") -> Path:
    folder = tmp_path / "r" / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    from distpddm.criterion import resolved

    state = {"step": step, "config": resolved(cfg.to_dict()), "config_resolved": 1, "split_digest": digest}
    (folder / checkpoint.CLIENT_STATE).write_text(json.dumps(state))
    return folder


def test_a_rerun_resumes_only_checkpoints_of_the_same_config_and_split(tmp_path):
    saved = _cfg(tmp_path, steps=100, seed=1)
    _checkpoint(tmp_path, 10, saved)
    longer = _cfg(tmp_path, steps=200, seed=1, log_every=5)  # a supported resume: longer, logs more often
    assert check_resume(longer, "abc")["step"] == 10
    other = _cfg(tmp_path, steps=100, seed=2)
    with pytest.raises(ResumeRefused, match=r"holds checkpoints \(step 10\) of another run: train.seed: 1 -> 2\."):
        check_resume(other, "abc")
    with pytest.raises(ResumeRefused, match=r"data.train_shards: another split \(digest abc -> xyz\)"):
        check_resume(saved, "xyz")
    assert check_resume(other, "xyz", force=True)["step"] == 10  # --force
    assert config_differences(saved.to_dict(), longer) == []
    assert fresh_name(saved) == "r-2"  # --fresh: a folder of its own
    assert fresh_name(_cfg(tmp_path / "empty")) == "r"


def test_resume_takes_the_newest_whole_checkpoint_whatever_latest_names(tmp_path):
    store = LocalPersistence(tmp_path / "r", keep=2)
    for step in (10, 20):
        _checkpoint(tmp_path, step, _cfg(tmp_path))
    (store.root / "latest").write_text("step-00000030")  # names a folder removed since
    with store.candidates() as found:
        assert [p.name for p in found] == ["step-00000020", "step-00000010"]


def _staged(root: Path, step: int) -> Path:
    folder = root / f".tmp-step-{step:08d}"
    (folder / "checkpoint").mkdir(parents=True)
    torch.save({"w": torch.arange(10.0)}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    (folder / checkpoint.CLIENT_STATE).write_text(json.dumps({"step": step}))
    checkpoint._write_manifest(folder, 0)
    return folder


def test_pruning_never_removes_the_checkpoint_just_committed(tmp_path, monkeypatch):
    """A folder from an abandoned, longer timeline (step 30) must not push out the new step 10 with keep 1."""
    monkeypatch.setattr(checkpoint, "barrier", lambda: None)
    store = LocalPersistence(tmp_path, keep=1)
    store.root.mkdir(parents=True)
    (store.root / "step-00000030").mkdir()
    store.report({}, _staged(store.root, 10))
    assert (store.root / "step-00000010").is_dir() and (store.root / "latest").read_text() == "step-00000010"
    store.report({}, _staged(store.root, 20))
    assert sorted(p.name for p in store.root.glob("step-*")) == ["step-00000020", "step-00000030"]
    assert not list(store.root.glob(".tmp-*"))


def test_a_checkpoint_that_is_not_whole_is_named(tmp_path):
    folder = _staged(tmp_path, 5)
    assert check_whole(folder, 0) is None
    states = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])  # a truncated write (disk full, power loss)
    assert "missing or truncated" in check_whole(folder, 0)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)  # the tensor's bytes
    header = data[member.header_offset : member.header_offset + 30]
    start = (
        member.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    )
    flipped = bytearray(data)
    flipped[start + member.file_size // 2] ^= 0xFF  # the same size, one byte changed: only the CRC can tell
    states.write_bytes(bytes(flipped))
    assert "fails its CRC" in check_whole(folder, 0)
    states.write_bytes(data)
    (folder / checkpoint.CLIENT_STATE).write_text('{"step"x 5}')  # as long as '{"step": 5}', not JSON
    assert "unreadable" in check_whole(folder, 0)
    (folder / "manifest_rank0.json").rename(folder / "manifest_rank1.json")
    assert "no manifest of rank 0" in check_whole(folder, 0)  # another rank's manifest: this one's is lost
    (folder / "manifest_rank1.json").unlink()
    (folder / checkpoint.CLIENT_STATE).write_text("{}")
    assert check_whole(folder, 0) is None  # no manifest at all: an older checkpoint, only loading can tell


def test_rng_state_goes_through_json_and_comes_back():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = json.loads(json.dumps(checkpoint._rng_state()))  # nothing but JSON: no pickle
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint._set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_half_a_line_left_by_a_killed_run_is_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    drop_partial_line(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    drop_partial_line(path)  # whole lines: untouched
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_eval_writes_beside_a_checkpoint_and_never_over_another_split(tmp_path):
    from distpddm.evaluate import default_out

    run = tmp_path / "run"
    model = run / "checkpoints" / "step-00000010" / "model.pt"
    model.parent.mkdir(parents=True)
    model.touch()
    assert default_out(model, None, str(tmp_path / "a" / "test")) == run / "eval-test-step-00000010"
    out = default_out(run / "model.pt", run, str(tmp_path / "a" / "test"))
    assert out == run / "eval-test"
    out.mkdir()
    (out / "source.json").write_text(json.dumps({"shards": str(tmp_path / "a" / "test")}))
    assert default_out(run / "model.pt", run, str(tmp_path / "a" / "test")) == out  # the same split: again
    other = default_out(run / "model.pt", run, str(tmp_path / "b" / "test"))
    assert other.parent == run and other.name.startswith("eval-test-") and other != out


def test_smoke_replaces_only_a_smoke_run(tmp_path):
    real = tmp_path / "smoke"  # configs/smoke.yaml's name: a real run of that name lives here
    (real / "checkpoints").mkdir(parents=True)
    picture = fixtures.jpeg_bytes(np.zeros((32, 32, 3), np.uint8))  # its own shards: a clean clone has none yet
    fixtures.write_shards(tmp_path / "train", [(n // 4, picture) for n in range(4 * 16)], per_shard=64)
    result = subprocess.run(
        [sys.executable, "-m", "distpddm.cli", "smoke", "--steps", "2", "--device", "cpu", "--out", str(tmp_path),
         f"data.train_shards={tmp_path / 'train'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "is not a smoke run" in result.stderr
    assert (real / "checkpoints").is_dir()


def test_the_highest_step_is_tried_first_whatever_latest_says(tmp_path):
    """A kill between a folder's rename and ``latest``'s replacement leaves ``latest`` one commit behind; a cut
    write can leave it holding bytes that are not text. The folders, renamed only when whole, say what was
    committed: the newest step goes first (the fault bench's lost work, docs/reliability.md)."""
    store = LocalPersistence(tmp_path / "r", keep=2)
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step, _cfg(tmp_path))
    for pointer in (b"step-00000020", b"\xff\xfe\x00garbage", b""):
        (store.root / "latest").write_bytes(pointer)
        with store.candidates() as found:
            assert [p.name for p in found] == ["step-00000030", "step-00000020", "step-00000010"]
    assert store.latest_name() is None


def test_each_rank_checks_its_share_of_the_saved_ranks_whatever_the_world_now(tmp_path):
    folder = _staged(tmp_path, 5)
    (folder / "data_rank1.json").write_text("{}")
    checkpoint._write_manifest(folder, 1)  # a run of 2 workers
    (folder / checkpoint.CLIENT_STATE).write_text(json.dumps({"step": 5, "world": 2}))
    checkpoint._write_manifest(folder, 0)
    (folder / ".manifest_rank1.json.77.ab.tmp").write_text("another rank's write in progress")
    assert [p.name for p in checkpoint._files(folder, 0)] == ["mp_rank_00_model_states.pt", "distpddm_state.json"]
    assert [check_whole(folder, r, 3) for r in range(3)] == [None, None, None]  # resumed on 3: rank 2 has none
    (folder / "data_rank1.json").write_text("{ }")  # the same size: fine
    (folder / "data_rank1.json").write_text("{}\n\n")
    assert "data_rank1.json: missing or truncated" in check_whole(folder, 0, 1)  # resumed on 1: rank 0 checks both
    (folder / "manifest_rank1.json").unlink()
    assert "no manifest of rank 1" in check_whole(folder, 1, 2)
    assert check_whole(folder, 0, 2) is None


def _resume(tmp_path, monkeypatch, loaded: list):
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda engine, ckpt, cfg: loaded.append(ckpt.name))
    monkeypatch.setattr(retry, "_sleep", lambda s: None)
    store = LocalPersistence(tmp_path / "r", keep=3)
    store.root.mkdir(parents=True)
    for step in (10, 20):
        store.report({}, _staged(store.root, step))
    return lambda: checkpoint.resume_latest(None, store, _cfg(tmp_path), torch.device("cpu"))


def test_resume_falls_back_over_damage_but_never_to_step_0_beside_checkpoints(tmp_path, monkeypatch):
    loaded = []
    resume = _resume(tmp_path, monkeypatch, loaded)
    root = tmp_path / "r" / "checkpoints"
    resume()
    assert loaded == ["step-00000020"]
    (root / "step-00000020" / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"PK")
    resume()
    assert loaded[-1] == "step-00000010"  # the newest whole one, said in a warning
    (root / "step-00000010" / "manifest_rank0.json").unlink()
    (root / "step-00000010" / checkpoint.CLIENT_STATE).unlink()
    with pytest.raises(checkpoint.DeterministicError, match=r"none of the 2 checkpoints .* is whole \(newest: "):
        resume()
    assert len(loaded) == 2 and sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000020"]


def test_an_io_error_is_retried_and_a_lasting_one_stops_the_resume(tmp_path, monkeypatch):
    loaded = []
    resume = _resume(tmp_path, monkeypatch, loaded)
    real, failures = checkpoint._check_whole, []

    def flaky(folder, rank, world):
        if failures:
            failures.pop()
            raise OSError(5, "Input/output error")
        return real(folder, rank, world)

    monkeypatch.setattr(checkpoint, "_check_whole", flaky)
    failures[:] = [1] * retry.READ_RETRIES  # one short of giving up
    resume()
    assert loaded == ["step-00000020"]
    failures[:] = [1] * (retry.READ_RETRIES + 1)
    with pytest.raises(checkpoint.CheckpointUnreadable, match="step-00000020 could not be read .*not falling back"):
        resume()
    assert loaded == ["step-00000020"]  # not step 10


def test_a_forked_child_does_not_keep_the_lock_after_its_parent(tmp_path):
    """A DataLoader worker outliving its killed parent must not hold the run folder."""
    code = (
        "import os, sys, time; from distpddm.train.runfolder import RunLock; RunLock(sys.argv[1]).__enter__()\n"
        "print('held', flush=True)\n"  # before the fork: the two lines cannot interleave
        "if os.fork() == 0:\n    print('child', flush=True); time.sleep(60); os._exit(0)\n"
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert [holder.stdout.readline().strip() for _ in range(2)] == ["held", "child"]  # the child is running
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    try:
        with RunLock(str(tmp_path)):  # the orphaned child lives on, sleeping
            pass
    finally:
        subprocess.run(["pkill", "-f", f"RunLock\\(sys.argv\\[1\\]\\).*{tmp_path}"], check=False)


def test_a_file_system_without_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(DeterministicError, match=r"cannot lock the run folder .*No locks available.*UNLOCKED=1"):
        RunLock(str(tmp_path)).__enter__()
    monkeypatch.setenv("DISTPDDM_UNLOCKED", "1")
    with RunLock(str(tmp_path)) as lock:
        assert lock.fd is None


def test_keys_added_to_distpddm_since_a_checkpoint_do_not_refuse_it(tmp_path):
    cfg = _cfg(tmp_path)
    saved = cfg.to_dict()
    del saved["miner"], saved["train"]["seed"]  # as an older distpddm wrote it, without these keys
    assert config_differences(saved, cfg) == []
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
    assert config_differences(saved, other) == [f"train.seed: {cfg.train.seed} -> {cfg.train.seed + 1}"]


def test_a_checkpoint_records_every_part_argument_so_a_changed_default_refuses_the_resume(tmp_path):
    from distpddm.criterion import resolved

    cfg = _cfg(tmp_path)  # loss: pddm with no arguments, no miner section
    recorded = resolved(cfg.to_dict())
    assert recorded["loss"]["alpha"] == PDDMLoss(4).alpha and recorded["loss"]["metric_grad"] is False
    assert recorded["miner"] == {"name": "hard", "positives": "all", "negatives": 1, "candidates": None, "chunk": None}
    assert from_dict(recorded).loss.args["alpha"] == recorded["loss"]["alpha"]  # a checkpoint's config loads
    assert config_differences(recorded, cfg) == []
    as_of_old_defaults = recorded | {
        "loss": recorded["loss"] | {"alpha": 0.5},
        "miner": {"name": "hard", "positives": "hardest"},
    }
    assert config_differences(as_of_old_defaults, cfg) == [
        f"loss.alpha: 0.5 -> {recorded['loss']['alpha']}",
        "miner.positives: 'hardest' -> 'all'",
    ]
    contrastive = dataclasses.replace(cfg, loss=PartConfig("contrastive"))
    assert resolved(contrastive.to_dict())["miner"] is None  # a pair loss has no implicit miner
    assert "loss.name: 'pddm' -> 'contrastive'" in config_differences(recorded, contrastive)


def test_a_checkpoint_written_before_parts_were_recorded_compares_with_the_defaults_of_its_time(tmp_path):
    """Before 9cb64e5 a checkpoint held the config as given: an unset alpha ran at 0.5, the hardest positive."""
    from distpddm.config import load_config

    old_cub = {"name": "pddm", "metric": "pddm", "alpha": 0.5, "beta": 1.0, "lam": 0.5}
    cub = load_config(REPO / "configs" / "cub200.yaml", check_paths=False)  # spells the paper's setting out
    saved = cub.to_dict() | {"loss": old_cub, "miner": {"name": "hard"}}  # as cub200.yaml was, as then saved
    assert config_differences(saved, cub, legacy=True) == []
    changed = config_differences(saved, cub)  # read with today's defaults it would look like another run
    assert "loss.metric_grad: False -> True" in changed and "miner.positives: 'all' -> 'hardest'" in changed
    cfg = _cfg(tmp_path)  # today's defaults: a run on them must not silently take an old run's checkpoints
    unset = cfg.to_dict()
    assert config_differences(unset, cfg, legacy=True) == [
        "loss.alpha: 0.5 -> 0.25", "loss.beta: 1.0 -> 0.5", "loss.metric_grad: True -> False",
        "miner.positives: 'hardest' -> 'all'",
    ]  # fmt: skip
    folder = tmp_path / "r" / "checkpoints" / "step-00000010"
    folder.mkdir(parents=True)
    (folder / checkpoint.CLIENT_STATE).write_text(json.dumps({"step": 10, "config": unset, "split_digest": "abc"}))
    with pytest.raises(ResumeRefused, match=r"loss.alpha: 0.5 -> 0.25"):
        check_resume(cfg, "abc")


def test_a_checkpoint_the_disk_cannot_hold_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """torch.save on a full disk raises ``RuntimeError: [enforce fail at inline_container.cc:672] ...``: the
    run stops saying what failed, where, and how much room is left (the fault bench's `disk_full`)."""

    class FullDisk:
        def save_checkpoint(self, path, tag, client_state):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7808 vs 7702\nframes")

    monkeypatch.setattr(checkpoint, "barrier", lambda: None)
    store = LocalPersistence(tmp_path, keep=2)
    said = r"checkpoint of step 4 could not be written in .*checkpoints \(RuntimeError: .*unexpected pos 7808 vs "
    with pytest.raises(checkpoint.CheckpointUnwritable, match=said + r"7702; \d+ MiB free there\): the last commit"):
        checkpoint.save_checkpoint(FullDisk(), store, _cfg(tmp_path), 4, None, None, {}, {})
