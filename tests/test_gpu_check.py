"""bench/gpu_check.sh on a machine without a GPU: it detects that and runs its reduced CPU checks end to end;
and its smoke judgement (held-out Recall@1 against step 0, as ``distpddm smoke``) on fabricated run folders."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distpddm.data.shards import BuildOptions, build
from distpddm.data.sources import read_source
from distpddm.model import ModelConfig, create_model, export_model
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def glyph_shards(tmp_path, monkeypatch):
    """A build folder whose train split has 12 fonts (classes) of 62 glyphs: enough for 8 x 4 batches."""
    monkeypatch.setenv("DISTPDDM_CACHE", str(tmp_path / "cache"))
    fixtures.copy_fonts(tmp_path / "fonts", 24)
    plan = read_source("fonts", None, fonts=[tmp_path / "fonts"], font_size=32)
    build(plan, tmp_path / "shards", BuildOptions(shard_bytes=1_000_000, progress=False))
    return tmp_path / "shards"


def _gpu_check(out: Path, shards: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "SHARDS": str(shards), **env}
    if torch.cuda.is_available():  # this test is about the reduced path
        env["GPU_CHECK_MODE"] = "cpu-reduced"
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_without_a_gpu_the_reduced_checks_run_end_to_end_and_pass(glyph_shards, tmp_path):
    out = tmp_path / "report" / "out.json"
    done = _gpu_check(out, glyph_shards)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report  # the same JSON on stdout
    assert str(out) in done.stderr and (tmp_path / "report" / "out.log").stat().st_size > 0

    assert report["mode"] == "cpu-reduced" and report["device"] == "cpu"
    assert report["device_name"].startswith("CPU") and report["torch"] == torch.__version__
    assert report["passed"] and report["failed"] == []
    assert report["shards"]["classes"] >= 8  # 12 where all 24 fonts render
    checks = report["checks"]
    assert set(checks) == {"smoke", "throughput", "mining", "parity"}
    assert all(c["passed"] for c in checks.values()), checks

    smoke = checks["smoke"]  # learned: held-out Recall@1 rose from the untrained network's; the loss is not judged
    assert smoke["learned"] and smoke["recall1_end"] > smoke["recall1_start"] and smoke["recall1_step"] == 30
    assert Path(smoke["val_shards"]) == (glyph_shards / "test").resolve() and smoke["val_images"] == 512
    assert not smoke["loss_judged"] and "loss_fell" in smoke
    assert smoke["steps"] == 30 and smoke["precision"] == "fp32"
    assert report["nearest_neighbours"].startswith("faiss")  # installed here: no stand-in
    export = smoke["export"]
    assert export["ok"] and export["weights_fp32"] and export["embedding_dtype"] == "float32"
    smoke_dim = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())["model"]["embed_dim"]
    assert export["embedding_shape"] == [64, smoke_dim] and export["max_norm_error"] < 1e-3

    tput = checks["throughput"]
    assert tput["backbone"] == "small_cnn" and tput["images_per_step"] == 32 and tput["steps"] == 20
    assert tput["averaged_steps"] == [10, 15, 20]
    assert tput["images_per_s"] > 0 and tput["step_ms"] > 0
    split = tput["split"]
    assert set(split) == {"data", "forward", "gather", "mining_loss", "backward_step"}
    assert all(part["ms"] >= 0 for part in split.values())
    assert abs(sum(part["share"] for part in split.values()) - 1) < 0.01

    mining = checks["mining"]
    assert mining["device"] == "cpu" and mining["resnet50_ms"] > 0
    (row,) = mining["rows"]
    assert row["pool"] == 256 and row["dim"] == 128
    assert all(row[f"{case}_ms"] > 0 for case in ("local", "dense", "pml", "functional", "cand"))
    assert 0 <= row["cand_exact_negative"] <= 1

    parity = checks["parity"]
    assert parity["device"] == "cpu" and parity["trivial"] and "trivially equal" in parity["note"]
    assert parity["quadruplets_identical"] and parity["quadruplets"] == 256
    assert parity["max_abs_diff"] < 1e-7 and abs(parity["loss_cpu"] - parity["loss_device"]) < 1e-6
    assert all(c["ok"] for c in parity["compared"].values())


@pytest.mark.slow
def test_a_check_that_does_not_run_fails_the_script_and_says_why(glyph_shards, tmp_path):
    # No time left for any step: every check is reported as failed, with the reason, and the exit code is 1.
    out = tmp_path / "out.json"
    done = _gpu_check(out, glyph_shards, GPU_CHECK_BUDGET="0")
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-reduced" and not report["passed"]
    assert sorted(report["failed"]) == ["mining", "parity", "smoke", "throughput"]
    parity = report["checks"]["parity"]
    assert parity["failed_steps"]["parity"]["timed_out"]
    assert "budget" in " ".join(parity["log_tail"]["parity"])


def _fake_run(run: Path, recall: tuple[float, float], losses: list[float]) -> Path:
    """A finished smoke run folder as the trainer leaves it, with held-out Recall@1 at step 0 and at the end."""
    run.mkdir(parents=True)
    rows = [{"step": 0, "val_recall@1": recall[0], "val_images": 40.0}]
    rows += [{"step": 10 * (i + 1), "loss": x} for i, x in enumerate(losses)]
    rows[-1] |= {"val_recall@1": recall[1], "val_images": 40.0}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"data": {"image_size": 32, "val_shards": "elsewhere/test"}, "train": {"precision": "fp32"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    export_model(create_model(ModelConfig(backbone="small_cnn", embed_dim=16, small_cnn_width=8)), run / "model.pt")
    return run


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_check_judges_held_out_recall_at_1_against_step_0_not_the_loss(tmp_path, capsys):
    gpu_check, split = _gpu_check_module(), fixtures.font_shards(tmp_path / "fonts", 6) / "train"
    for name, recall, losses, passed in [
        ("rose", (0.3, 0.6), [0.26, 0.27, 0.29], True),  # the case: the loss rose, the embedding improved
        ("fell", (0.6, 0.3), [0.40, 0.30, 0.20], False),
        ("flat", (0.5, 0.5), [0.40, 0.30, 0.20], False),
        ("nan", (0.3, float("nan")), [0.40, 0.30, 0.20], False),
    ]:
        run = _fake_run(tmp_path / name, recall, losses)
        args = argparse.Namespace(run=str(run), device="cpu", shards=str(split), image_size=32, batch=8, out=None)
        code = gpu_check.cmd_smoke(args)
        result = json.loads(capsys.readouterr().out)
        assert result["passed"] is passed and code == (0 if passed else 1), name
        assert result["learned"] is passed and result["export"]["ok"] and not result["loss_judged"], name
        assert result["recall1_start"] == recall[0] and result["recall1_step"] == 30 and result["val_images"] == 40
        assert result["loss_fell"] is (losses[-1] < losses[0]) and result["val_shards"] == "elsewhere/test"


def test_the_faiss_stand_in_finds_what_faiss_finds(tmp_path):
    (tmp_path / "shim.py").write_text(_gpu_check_module().FAISS_SHIM % "a test")
    spec = importlib.util.spec_from_file_location("shim", tmp_path / "shim.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    gallery = rng.integers(0, 3, size=(200, 4)).astype(np.float32)  # small integers: many exact ties
    dist, rows = shim.knn(gallery[:50], gallery, 9)
    want_dist, want_rows = faiss.knn(gallery[:50], gallery, 9)
    np.testing.assert_array_equal(dist, want_dist)
    np.testing.assert_array_equal(rows, want_rows)  # ties in gallery order, as faiss
