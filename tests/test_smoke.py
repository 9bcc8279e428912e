"""`distpddm smoke` (launch/smoke.sh, `make smoke`): its checks on run folders, and a short run on CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distpddm.model import ModelConfig, create_model, export_model
from distpddm.smoke import check_run
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def font_shards(tmp_path_factory):
    return fixtures.font_shards(tmp_path_factory.mktemp("smoke"), 40)


def _fake_run(run: Path, shards: Path, losses: list[float], model: bool = True) -> Path:
    run.mkdir(parents=True)
    rows = [{"step": 5 * (i + 1), "loss": x, "images_per_s": 100.0 + 10 * i} for i, x in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "val": 1}, *rows]))
    cfg = {"data": {"train_shards": str(shards), "image_size": 32}, "loss": {"alpha": 0.1, "beta": 0.2, "lam": 0.5}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if model:
        export_model(create_model(ModelConfig(backbone="small_cnn", embed_dim=16, small_cnn_width=8)), run / "model.pt")
    return run


def test_check_run_reads_the_loss_the_speed_and_the_export(font_shards, tmp_path):
    fell = check_run(_fake_run(tmp_path / "a", font_shards / "train", [2.0, 1.9, 2.1, 1.5, 1.2, 1.0, 0.9, 1.1, 0.8]))
    assert (
        fell["loss_fell"] and fell["loss_first"] == pytest.approx(2.0) and fell["loss_last"] == pytest.approx(2.8 / 3)
    )
    assert fell["images_per_s"] == pytest.approx(145.0)  # the first logged row (warm-up) left out
    assert fell["export_loads"] and fell["export_embedding"] == [8, 16]  # real images of the split, embedded
    rose = check_run(_fake_run(tmp_path / "b", font_shards / "train", [1.0, 1.2, 1.4]))
    assert not rose["loss_fell"] and rose["loss_collapsed"] == pytest.approx(0.4)  # 2 alpha + 2 lam beta
    assert not check_run(_fake_run(tmp_path / "c", font_shards / "train", [2.0, 1.0, float("nan")]))["loss_fell"]
    missing = check_run(_fake_run(tmp_path / "d", font_shards / "train", [2.0, 1.0], model=False))
    assert not missing["export_loads"] and "model.pt" in missing["export_error"]


@pytest.mark.slow
def test_smoke_runs_on_cpu_in_fp32_and_its_exit_code_is_its_verdict(font_shards, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "distpddm.cli", "smoke", "--steps", "12", "--device", "cpu", "--out", str(out),
         f"data.train_shards={font_shards / 'train'}", "data.classes_per_batch=8", "train.log_every=3"],
        cwd=tmp_path,  # any folder: configs/smoke.yaml is the checkout's
        env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    text = result.stdout
    assert "smoke: CPU, fp32; 12 steps of 32 images" in text, text + result.stderr[-3000:]
    speed = re.search(r"smoke: CPU, fp32: (\d+) images/s", text)
    assert speed and int(speed.group(1)) > 0, text
    assert "smoke: exported model.pt loads and embeds [8, 64]" in text, text
    fell = re.search(r"smoke: loss ([\d.]+) -> ([\d.]+) \((fell|DID NOT FALL)", text)
    assert fell, text
    run = out / "smoke"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 4 and float(fell.group(1)) == pytest.approx(losses[0], abs=1e-4)  # n = 1 of 4 rows
    assert (result.returncode == 0) == (fell.group(3) == "fell") and result.returncode in (0, 1)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == "fp32" and saved["ray"]["use_gpu"] is False
    assert torch.load(run / "model.pt", weights_only=True)["format"] == "distpddm-embedding-v1"
