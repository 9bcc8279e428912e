"""bench/gpu_check.sh on a machine without a GPU: it detects that and runs its reduced CPU checks end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distpddm.data.shards import BuildOptions, build
from distpddm.data.sources import read_source
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


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

    smoke = checks["smoke"]
    assert smoke["loss_fell"] and smoke["loss_last_mean"] < smoke["loss_first_mean"]
    assert smoke["steps"] == 30 and smoke["precision"] == "fp32"
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
