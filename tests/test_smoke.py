"""`distpddm smoke` (launch/smoke.sh, `make smoke`): its checks on run folders, and a short run on CPU."""

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from distpddm.loss import PDDMLoss
from distpddm.model import ModelConfig, create_model, export_model
from distpddm.smoke import SMOKE_VAL_IMAGES, check_run, smoke
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def font_shards(tmp_path_factory):
    return fixtures.font_shards(tmp_path_factory.mktemp("smoke"), 40)


def _fake_run(run: Path, shards: Path, losses: list[float], recall=None, model: bool = True) -> Path:
    """A finished run folder as the trainer leaves it; ``recall=(start, end)``: held-out Recall@1 logged at step
    0 (its own row, as :meth:`Trainer.validate_at_start` writes it) and in the last step's row."""
    run.mkdir(parents=True)
    rows = [{"step": 5 * (i + 1), "loss": x, "images_per_s": 100.0 + 10 * i} for i, x in enumerate(losses)]
    if recall is not None:
        rows.insert(0, {"step": 0, "val_recall@1": recall[0], "val_images": 48.0})
        rows[-1] |= {"val_recall@1": recall[1], "val_map@r": 0.1, "val_images": 48.0}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"data": {"train_shards": str(shards), "image_size": 32}, "loss": {"alpha": 0.1, "beta": 0.2, "lam": 0.5}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if model:
        export_model(create_model(ModelConfig(backbone="small_cnn", embed_dim=16, small_cnn_width=8)), run / "model.pt")
    return run


def test_check_run_judges_learning_by_held_out_recall_at_1_not_by_the_loss(font_shards, tmp_path):
    train = font_shards / "train"
    rose = check_run(_fake_run(tmp_path / "a", train, [1.0, 1.2, 1.4], recall=(0.25, 0.5)))
    assert rose["judged_by"] == "held-out Recall@1" and rose["learned"]  # although the loss rose
    assert not rose["loss_fell"] and rose["loss_first"] == pytest.approx(1.0) and rose["loss_last"] == 1.4
    assert (rose["recall1_start"], rose["recall1_end"], rose["recall1_step"], rose["val_images"]) == (0.25, 0.5, 15, 48)
    assert rose["export_loads"] and rose["export_embedding"] == [8, 16]  # real images of the split, embedded
    # 0.5 -> 0.55 on 48 images: within one standard error (0.072) of the step-0 figure, chance
    for i, (start, end) in enumerate([(0.5, 0.25), (0.5, 0.5), (0.5, 0.55), (0.25, float("nan")), (float("nan"), 0.5)]):
        fell = check_run(_fake_run(tmp_path / f"b{i}", train, [2.0, 1.5, 1.0], recall=(start, end)))
        assert fell["judged_by"] == "held-out Recall@1" and fell["loss_fell"] and not fell["learned"], (start, end)


def test_without_held_out_figures_check_run_falls_back_to_the_loss_and_says_so(font_shards, tmp_path):
    train = font_shards / "train"
    fell = check_run(_fake_run(tmp_path / "a", train, [2.0, 1.9, 2.1, 1.5, 1.2, 1.0, 0.9, 1.1, 0.8]))
    assert fell["judged_by"] == "training loss" and fell["learned"] and "recall1_start" not in fell
    assert fell["loss_first"] == pytest.approx(2.0) and fell["loss_last"] == pytest.approx(2.8 / 3)
    assert fell["images_per_s"] == pytest.approx(145.0)  # the first logged row (warm-up) left out
    rose = check_run(_fake_run(tmp_path / "b", train, [1.0, 1.2, 1.4]))
    assert rose["judged_by"] == "training loss" and not rose["learned"] and not rose["loss_fell"]
    assert rose["loss_collapsed"] == pytest.approx(0.4)  # 2 alpha + 2 lam beta
    nan = check_run(_fake_run(tmp_path / "c", train, [2.0, 1.0, float("nan")]))
    assert not nan["learned"] and not nan["loss_fell"]
    end_only = _fake_run(tmp_path / "d", train, [2.0, 1.0], recall=(0.1, 0.9))  # no step-0 figure: nothing to beat
    (end_only / "metrics.jsonl").write_text(
        "".join(ln + "\n" for ln in (end_only / "metrics.jsonl").read_text().splitlines()[1:])
    )
    assert check_run(end_only)["judged_by"] == "training loss"
    missing = check_run(_fake_run(tmp_path / "e", train, [2.0, 1.0], recall=(0.1, 0.9), model=False))
    assert missing["learned"] and not missing["export_loads"] and "model.pt" in missing["export_error"]


def _smoke_with(monkeypatch, capsys, losses, recall, overrides):
    """``smoke()`` with the trainer replaced by one that leaves a finished run (and the config it was given)."""
    given = {}

    def train_local(cfg):
        given["cfg"] = cfg
        run = _fake_run(Path(cfg.output_location()) / "fake", Path(cfg.data.train_shards), losses, recall)
        for name in ("metrics.jsonl", "config.yaml", "model.pt"):
            (run / name).rename(run.parent / name)

    monkeypatch.setitem(sys.modules, "distpddm.train.launch", types.SimpleNamespace(train_local=train_local))
    code = smoke(None, overrides, steps=15, device="cpu")
    return code, capsys.readouterr().out, given["cfg"]


def test_smoke_validates_on_the_sibling_test_split_and_its_exit_code_is_the_held_out_verdict(
    font_shards, monkeypatch, capsys
):
    over = [f"data.train_shards={font_shards / 'train'}", "train.val_at_start=false"]
    code, text, cfg = _smoke_with(monkeypatch, capsys, [1.0, 1.2, 1.4], (0.25, 0.5), over)
    assert cfg.data.val_shards == str(font_shards / "test") and cfg.train.val_at_start  # forced: step 0 is needed
    assert cfg.data.val_max_images == SMOKE_VAL_IMAGES
    assert f"held-out classes {font_shards / 'test'} (the train shards' sibling test split)" in text, text
    assert "held-out Recall@1 0.250 at step 0 -> 0.500 at step 15 on 48 images (rose: learned)" in text, text
    assert "smoke: loss 1.0000 -> 1.4000" in text and "information, not the verdict" in text, text
    assert code == 0 and text.rstrip().endswith("smoke: PASSED"), text
    code, text, cfg = _smoke_with(monkeypatch, capsys, [2.0, 1.5, 1.0], (0.5, 0.5), [*over, "data.val_max_images=64"])
    assert cfg.data.val_max_images == 64 and "DID NOT RISE" in text and code == 1 and "smoke: FAILED" in text, text
    code, text, _ = _smoke_with(monkeypatch, capsys, [2.0, 1.5, 1.0], (0.5, 0.55), over)  # 48 images: chance
    assert "0.500 at step 0 -> 0.550 at step 15 on 48 images (DID NOT RISE beyond the noise of 0.072" in text, text
    assert code == 1, text


def test_smoke_without_a_held_out_split_says_so_and_falls_back_to_the_loss(font_shards, tmp_path, monkeypatch, capsys):
    shutil.copytree(font_shards / "train", tmp_path / "only" / "train")  # a build with no test split beside it
    over = [f"data.train_shards={tmp_path / 'only' / 'train'}"]
    code, text, cfg = _smoke_with(monkeypatch, capsys, [2.0, 1.5, 1.0], None, over)
    assert cfg.data.val_shards is None
    assert "learning cannot be judged on held-out classes; FALLING BACK to the training loss" in text, text
    assert "smoke: loss 2.0000 -> 1.0000" in text and "the fallback verdict: fell" in text and code == 0, text
    code, text, _ = _smoke_with(monkeypatch, capsys, [1.0, 1.5, 2.0], None, over)
    assert "the fallback verdict: DID NOT FALL" in text and code == 1, text


@pytest.mark.slow
def test_smoke_runs_on_cpu_in_fp32_and_passes_by_held_out_recall_at_1(font_shards, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "distpddm.cli", "smoke", "--steps", "60", "--device", "cpu", "--out", str(out),
         f"data.train_shards={font_shards / 'train'}", "data.classes_per_batch=8", "train.log_every=15"],
        cwd=tmp_path,  # any folder: configs/smoke.yaml is the checkout's
        env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    text = result.stdout
    assert "smoke: CPU, fp32; 60 steps of 32 images" in text, text + result.stderr[-3000:]
    assert f"held-out classes {font_shards / 'test'} (the train shards' sibling test split)" in text, text
    speed = re.search(r"smoke: CPU, fp32: (\d+) images/s", text)
    assert speed and int(speed.group(1)) > 0, text
    assert "smoke: exported model.pt loads and embeds [8, 64]" in text, text
    recall = re.search(r"held-out Recall@1 ([\d.]+) at step 0 -> ([\d.]+) at step 60 on (\d+) images \((.*)\)", text)
    assert recall, text
    run = out / "smoke"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "val_recall@1" in r}
    assert sorted(val) == [0, 60] and int(recall.group(3)) == val[60]["val_images"] == SMOKE_VAL_IMAGES
    assert float(recall.group(1)) == pytest.approx(val[0]["val_recall@1"], abs=5e-4)  # the untrained network
    assert float(recall.group(2)) == pytest.approx(val[60]["val_recall@1"], abs=5e-4)
    # 20 unseen fonts from scratch: ~0.70-0.74 untrained, ~0.79 after 60 steps (seeds 0 and 1, measured once)
    assert val[60]["val_recall@1"] > val[0]["val_recall@1"] and recall.group(4) == "rose: learned", text
    assert result.returncode == 0 and "smoke: PASSED" in text, text
    assert "information, not the verdict" in text and len([r for r in rows if "loss" in r]) == 4, text
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == "fp32" and saved["ray"]["use_gpu"] is False
    assert saved["data"]["val_shards"] == str(font_shards / "test") and saved["train"]["val_at_start"]
    assert saved["loss"]["alpha"] == PDDMLoss(4).alpha and saved["miner"]["name"] == "hard"  # parts spelled out
    assert torch.load(run / "model.pt", weights_only=True)["format"] == "distpddm-embedding-v1"
