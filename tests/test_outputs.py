"""A run's own files on local and remote (fsspec) storage."""

import dataclasses

import fsspec
import pytest

from distpddm.config import RunConfig
from distpddm.train.launch import train_local
from distpddm.train.outputs import RunOutput, is_remote, run_location


def test_run_location_keeps_urls_and_resolves_local_paths(tmp_path):
    assert run_location("s3://bucket/runs/", "a") == "s3://bucket/runs/a"
    assert run_location(str(tmp_path), "a") == str(tmp_path / "a")
    assert run_location(f"file://{tmp_path}", "a") == str(tmp_path / "a")  # a local path written as a URL
    assert is_remote("gs://b/x") and not is_remote("file:///x") and not is_remote("/x")


def test_local_run_folder_is_written_in_place(tmp_path):
    out = RunOutput(str(tmp_path / "run"))
    assert out.local == tmp_path / "run" and out.local.is_dir()
    (out.local / "metrics.jsonl").write_text("{}\n")
    out.pull("metrics.jsonl")  # nothing to fetch, nothing overwritten
    out.push()
    out.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_remote_run_folder_is_mirrored_and_a_second_attempt_appends():
    fs = fsspec.filesystem("memory")
    url = "memory://bucket/runs/r1"
    first = RunOutput(url)
    assert first.remote and first.local.is_dir()
    first.pull("metrics.jsonl")  # nothing there yet
    (first.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (first.local / "tensorboard").mkdir()
    (first.local / "tensorboard" / "events.1").write_bytes(b"tb")
    (first.local / "config.yaml.tmp").write_text("half-written")
    first.push()
    first.close()
    assert not first.local.exists()
    assert fs.cat("/bucket/runs/r1/metrics.jsonl") == b'{"step": 1}\n'
    assert fs.cat("/bucket/runs/r1/tensorboard/events.1") == b"tb"
    assert not fs.exists("/bucket/runs/r1/config.yaml.tmp")

    second = RunOutput(url)  # a resumed attempt, maybe on another node
    second.pull("metrics.jsonl", "missing.txt")
    with open(second.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    second.push()
    second.close()
    assert fs.cat("/bucket/runs/r1/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    assert fs.cat("/bucket/runs/r1/tensorboard/events.1") == b"tb"  # earlier files stay


def test_local_training_refuses_remote_storage_before_starting():
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, storage_path="s3://bucket/runs"))
    with pytest.raises(ValueError, match="remote.*Train through Ray"):
        train_local(cfg)
