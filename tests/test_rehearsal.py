"""The ImageNet-10K rehearsal script, end to end at a small size: it must keep running as the code changes
(the full size, `make rehearsal`, is a benchmark: docs/benchmarks.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rehearsal_runs_every_stage_on_a_small_tree(tmp_path):
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "DISTPDDM_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "bench/rehearsal.py", "--classes", "300", "--steps", "30", "--work", str(tmp_path / "w")]
    result = subprocess.run(cmd + ["--out", str(tmp_path / "r.json")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = json.loads((tmp_path / "r.json").read_text())["stages"]
    assert [s["stage"].split()[0] for s in stages] == ["tree", "build", "train"]
    assert "holdout: " in stages[1]["note"] and "1 bad files" in stages[1]["note"]  # the truncated file listed
    assert all(s["peak_mib"] > 0 for s in stages[1:]) and "held-out R@1" in stages[2]["note"]
    index = json.loads((tmp_path / "w" / "shards" / "holdout" / "index.json").read_text())
    assert len(index["classes"]) == 30 and index["carving"]["holdout_classes"] == 30
