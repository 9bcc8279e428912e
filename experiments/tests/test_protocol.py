"""The quality protocol's scaffolding (experiments/protocol): splits, commands, the test-split guard, and one tiny
real run through the product (build -> train -> eval -> record)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

PROTOCOL = Path(__file__).resolve().parents[1] / "protocol"
sys.path.insert(0, str(PROTOCOL))

import build  # noqa: E402
import choose  # noqa: E402
import grid  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import splits  # noqa: E402
import why  # noqa: E402


@pytest.mark.parametrize("dataset", splits.DATASETS)
def test_committed_splits_are_disjoint_and_50_25_25(dataset):
    record = splits.load(dataset)
    splits.check(record)
    n = sum(record["counts"].values())
    assert record["seed"] == splits.SEED
    assert record["counts"]["train"] == round(n / 2) and record["counts"]["val"] == round(n / 4)
    assert record == {**record, **splits.assign([c for s in splits.SPLITS for c in record[s]], record["seed"])}


def test_assign_is_reproducible_and_seeded():
    classes = [f"c{i:03d}" for i in range(101)]
    a, b = splits.assign(classes), splits.assign(list(reversed(classes)))
    assert a == b  # the input order does not matter
    assert [len(a[s]) for s in splits.SPLITS] == [50, 25, 26]
    record = {"dataset": "x", "counts": {s: len(a[s]) for s in splits.SPLITS}, **a}
    splits.check(record, classes)
    assert splits.assign(classes, seed=1) != a
    with pytest.raises(ValueError, match="in both"):
        splits.check({**record, "val": a["val"] + a["train"][:1], "counts": {**record["counts"], "val": 26}})


@pytest.mark.skipif(not splits.CLIPART_DIR.is_dir(), reason="openclipart-png is not installed")
def test_clipart_split_regenerates():
    record = splits.make("clipart")
    committed = splits.load("clipart")
    assert {s: record[s] for s in splits.SPLITS} == {s: committed[s] for s in splits.SPLITS}


def test_grid_budget_and_defaults():
    grid.check()
    assert set(grid.GRID) == set(grid.METHODS)
    assert grid.config("multi_similarity", "default")["loss"] == {
        "name": "multi_similarity",
        "alpha": 2.0,
        "beta": 50.0,
        "base": 0.5,
    }
    assert grid.config("triplet_margin", "default")["miner"] == {"name": "batch_hard"}
    assert grid.config("pddm", "default")["loss"]["alpha"] == 0.5


def test_dry_run_prints_the_product_commands(capsys):
    assert run.main(["--dataset", "fonts", "--regime", "lite0", "--method", "pddm", "--config", "shipped",
                     "--seed", "2", "--dry-run"]) == 0  # fmt: skip
    train, evaluate = capsys.readouterr().out.strip().splitlines()
    assert " -m distpddm.cli train " in train and train.endswith(" --local")
    assert "experiments/protocol/configs/fonts_lite0.yaml" in train
    assert """'loss={"name": "pddm", "metric": "pddm", "alpha": 0.1, "beta": 0.1""" in train
    assert '\'miner={"name": "hard", "positives": "all"}\' reducer=null train.seed=2' in train
    assert "name=fonts-lite0-pddm-shipped-s2-val-" in train
    assert " -m distpddm.cli eval " in evaluate
    assert "--shards " + str(build.DEFAULT_ROOT / "fonts" / "val") in evaluate
    assert "--local --no-report" in evaluate


def test_resume_skips_the_runs_the_results_file_records(tmp_path, capsys):
    results = tmp_path / "fonts_scratch.jsonl"
    done = {"method": "pddm", "config": "default", "seed": 0, "split": "val", "final": False, "commit": "c0"}
    other_seed = done | {"seed": 1}
    with_override = done | {"config": "allpos", "extra_overrides": ["train.steps=3"]}  # a smoke run, not the grid's
    results.write_text("".join(json.dumps(r) + "\n" for r in (done, other_seed, with_override)))
    args = ["--dataset", "fonts", "--regime", "scratch", "--method", "pddm", "--config", "all", "--dry-run",
            "--results", str(results)]  # fmt: skip
    assert run.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "recorded already: pddm:default seed 0 on val" in out
    assert out.count(" -m distpddm.cli train ") == len(grid.GRID["pddm"]) - 1  # allpos's record had overrides
    assert "name=fonts-scratch-pddm-allpos-s0-val-" in out
    assert run.main(args) == 0  # without --resume, every configuration
    assert capsys.readouterr().out.count(" -m distpddm.cli train ") == len(grid.GRID["pddm"])
    # the final command's seeds count only at the commit they ran at
    final = done | {"split": "test", "final": True}
    assert run.recorded([final], "pddm", "default", 0, "test", True, "c0")
    assert not run.recorded([final], "pddm", "default", 0, "test", True, "c1")
    assert not run.recorded([done], "pddm", "default", 0, "test", True, "c0")


def test_test_split_refused_without_final(capsys):
    args = ["--dataset", "fonts", "--regime", "scratch", "--method", "pddm", "--split", "test", "--dry-run"]
    assert run.main(args) == 2
    assert "--final" in capsys.readouterr().err
    with pytest.raises(run.Refused, match="clean tree"):
        run.check_allowed("test", True, dirty=True, changed=["x.py"])
    with pytest.raises(run.Refused, match="val"):
        run.check_allowed("val", True, dirty=False, changed=[])
    run.check_allowed("test", True, dirty=False, changed=[])  # the final command on a clean tree


def test_choose_best_val_recall_ties_by_map():
    def rec(method, config, r1, mapr, split="val", seed=0):
        return {"method": method, "config": config, "recall@1": r1, "map@r": mapr, "split": split, "seed": seed,
                "commit": "c", "extra_overrides": []}  # fmt: skip

    picked = choose.choose(
        [
            rec("pddm", "default", 0.5, 0.2),
            rec("pddm", "shipped", 0.6, 0.1),
            rec("pddm", "allpos", 0.6, 0.3),
            rec("pddm", "nomg", 0.9, 0.9, split="test"),  # never counts
            rec("pddm", "a0.1b0.1", 0.9, 0.9, seed=1),  # not the tuning seed
            rec("contrastive", "neg0.5", 0.4, 0.1),
        ]
    )
    assert picked["pddm"]["config"] == "allpos" and not picked["pddm"]["complete"]
    assert picked["contrastive"]["config"] == "neg0.5"


def test_defaults_follow_the_mean_val_recall_over_data_sets_run_on_all():
    def rec(config, r1, mapr, split="val", method="pddm"):
        return {"method": method, "config": config, "recall@1": r1, "map@r": mapr, "split": split, "seed": 0,
                "extra_overrides": []}  # fmt: skip

    clipart = [rec("shipped", 0.70, 0.30), rec("a0.1b0.1", 0.66, 0.30), rec("allpos", 0.60, 0.1)]
    fonts = [rec("shipped", 0.85, 0.5), rec("a0.1b0.1", 0.90, 0.5), rec("default", 0.99, 0.9),
             rec("allpos", 0.99, 0.9, split="test"), rec("nomg", 0.99, 0.9, method="triplet_margin")]  # fmt: skip
    rows = choose.across({"clipart": clipart, "fonts": fonts})
    assert [r["config"] for r in rows] == ["a0.1b0.1", "shipped"]  # 0.78 > 0.775; default: on fonts only
    assert rows[0]["per_dataset"] == {"clipart": (0.66, 0.30), "fonts": (0.90, 0.5)}


def _final(method, config, seed, r1, mapr, commit="c", dirty=False, split="test", final=True):
    return {"method": method, "config": config, "seed": seed, "recall@1": r1, "map@r": mapr, "commit": commit,
            "dirty": dirty, "split": split, "final": final}  # fmt: skip


def test_report_averages_the_final_test_seeds_of_the_chosen_configurations_only():
    chosen = {"pddm": "best", "contrastive": "default"}
    records = [
        _final("pddm", "best", 0, 0.70, 0.40), _final("pddm", "best", 1, 0.72, 0.42),
        _final("pddm", "best", 2, 0.74, 0.44),
        _final("pddm", "other", 0, 0.99, 0.99),  # not the chosen configuration
        _final("pddm", "best", 3, 0.99, 0.99, split="val", final=False),  # not the final test
        _final("contrastive", "default", 0, 0.60, 0.50), _final("contrastive", "default", 1, 0.62, 0.50),
        _final("contrastive", "default", 2, 0.61, 0.53),
    ]  # fmt: skip
    summary = report.summarise(records, chosen)
    assert summary["pddm"]["seeds"] == [0, 1, 2] and summary["pddm"]["complete"]
    assert summary["pddm"]["recall@1"]["mean"] == pytest.approx(0.72)
    assert summary["pddm"]["recall@1"]["sd"] == pytest.approx(0.02)
    r1, mapr, goal = report.verdict(summary)
    assert r1.startswith("recall@1: PDDM leads by +0.110") and "contrastive" in r1
    assert "trails by -0.090, beyond" in mapr and goal.startswith("goal: NOT met")
    assert "| pddm: best | 0.720 ± 0.020 |" in report.markdown(summary)
    close = [*records[:3], *(_final("contrastive", "default", s, 0.71 + s / 100, 0.38) for s in range(3))]
    r1, mapr, goal = report.verdict(report.summarise(close, chosen))
    assert "within the seed standard deviation" in r1 and "leads" in mapr and goal.startswith("goal: met")


def test_report_gives_no_verdict_until_every_chosen_method_has_its_seeds():
    chosen = {"pddm": "best", "contrastive": "default", "triplet_margin": "t"}
    records = [*(_final("pddm", "best", s, 0.9, 0.9) for s in range(3)), _final("contrastive", "default", 0, 0.5, 0.5)]
    summary = report.summarise(records, chosen)
    assert not summary["contrastive"]["complete"] and summary["triplet_margin"]["seeds"] == []
    assert report.verdict(summary) == ["no verdict: seeds missing for contrastive, triplet_margin"]
    table = report.markdown(summary)
    assert "contrastive: default (incomplete)" in table and "triplet_margin: t (not run yet)" in table


def test_report_refuses_a_seed_run_twice_records_of_mixed_commits_or_a_dirty_tree():
    chosen = {"pddm": "best"}
    with pytest.raises(ValueError, match="seed 0 has more than one final record"):
        report.summarise([_final("pddm", "best", 0, 0.7, 0.4), _final("pddm", "best", 0, 0.8, 0.4)], chosen)
    with pytest.raises(ValueError, match="more than one commit"):
        report.summarise([_final("pddm", "best", 0, 0.7, 0.4), _final("pddm", "best", 1, 0.7, 0.4, commit="d")], chosen)
    with pytest.raises(ValueError, match="dirty"):
        report.summarise([_final("pddm", "best", 0, 0.7, 0.4, dirty=True)], chosen)


@pytest.mark.skipif(not splits.FONTS_DIR.is_dir(), reason="fonts-aenigma is not installed")
@pytest.mark.parametrize("method", ["multi_similarity", "pddm"])
def test_tiny_end_to_end_run_writes_a_record(tmp_path, method):
    """4 classes per split, 5 steps, through `shards build`, `train --local` and `eval` (about 1-2 min on 2 busy
    cores: most of it the product's two process starts); why.py reads what the run left."""
    build.build("fonts", tmp_path / "shards", limit=4, workers=1, quiet=True)
    out = tmp_path / "results.jsonl"
    code = run.main(
        ["--dataset", "fonts", "--regime", "scratch", "--method", method, "--split", "val",
         "--shards-root", str(tmp_path / "shards"), "--runs", str(tmp_path / "runs"), "--results", str(out),
         "--set", "train.steps=5", "--set", "data.classes_per_batch=4", "--set", "train.val_at_start=false",
         "--set", "train.progress=false"]
    )  # fmt: skip
    assert code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["method"] == method and record["config"] == "default" and record["split"] == "val"
    assert 0 <= record["recall@1"] <= 1 and 0 <= record["map@r"] <= 1
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert record["training"]["step"] == 5 and record["wall_s"] > 0
    assert record["metrics"]["recall@1"] == record["recall@1"]
    diagnosis = why.analyse(record)
    assert diagnosis["training"] and diagnosis["training"][-1]["steps"].endswith("-5")
    labels = np.load(Path(record["run_dir"]) / "eval-protocol-val" / "labels.npy")
    assert diagnosis["hardest_pairs"]["queries"] == len(labels)  # every val font has several glyphs
    assert sum(b["queries"] for b in diagnosis["by_class_size"].values()) == len(labels)
    learned = "metric_positive_higher" in diagnosis["hardest_pairs"]
    assert learned == (method == "pddm") and ("pos_score" in diagnosis["training"][-1]) == learned


def test_clipart_eval_splits_are_capped_per_class_by_a_draw_of_the_class_alone():
    images = [Path(f"/x/{n:03d}.png") for n in range(300)]
    kept = build.capped(images, build.CLIPART_EVAL_CAP, "shapes__stars")
    assert len(kept) == build.CLIPART_EVAL_CAP and kept == sorted(kept) and set(kept) <= set(images)
    assert kept == build.capped(images, build.CLIPART_EVAL_CAP, "shapes__stars")  # reproducible
    assert kept != build.capped(images, build.CLIPART_EVAL_CAP, "animals__cats")  # seeded by the class
    assert build.capped(images[:12], build.CLIPART_EVAL_CAP, "small") == images[:12]  # small classes kept whole
    assert build.capped(images, None, "train") == images
