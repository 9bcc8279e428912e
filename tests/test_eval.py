"""`distpddm eval`: extraction, metrics, PDDM re-ranking, the report's inputs, and one-line errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distpddm.config import ModelConfig
from distpddm.data.shards import BuildOptions, build
from distpddm.data.sources import read_source
from distpddm.loss import PDDMLoss
from distpddm.model import create_model, export_model, load_exported_metric
from distpddm.rerank import pair_similarities, rerank
from tests import fixtures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    images = fixtures.glyph_images(10, 6, root / "cache")
    fixtures.make_folder(root / "src", images)
    build(read_source("folder", root / "src"), root / "out", BuildOptions(shard_bytes=8_000, progress=False))
    return root / "out" / "train"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with an exported (untrained) network and its PDDM unit."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net = create_model(ModelConfig(embed_dim=16, small_cnn_width=8))
    export_model(net, root / "model.pt", criterion=PDDMLoss(16), image_size=32)
    (root / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "val_recall@1": 0.1 * s}) for s in range(1, 6)) + "\n"
    )
    return root


@pytest.fixture
def cli(capsys):
    """``distpddm eval ARGS`` in this process: (exit code, stdout, stderr)."""
    from distpddm.cli import main

    def run(*args):
        code = main(["eval", *map(str, args)])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


class _CodeScorer(torch.nn.Module):
    """Knows the class from the last coordinate: a perfect re-ranker, to see re-ranking act."""

    def forward(self, a, b):
        return -(a[:, -1] - b[:, -1]).abs()


def _clustered(n_classes=20, per=5, dim=8, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per)
    x = rng.normal(size=(n_classes, dim))[labels] + noise * rng.normal(size=(len(labels), dim))
    code = labels[:, None] * 10.0
    return np.hstack([x, code * 0]).astype(np.float32), labels, code.astype(np.float32)


def test_reranking_reorders_the_top_n_with_the_learned_score():
    x, labels, code = _clustered()
    plain = rerank(x, labels, _CodeScorer(), top_n=8, ks=(1, 2, 4, 8))  # the code column is 0: all ties
    assert plain["rerank@8/recall@1"] == plain["rerank@8/euclidean_recall@1"]  # ties keep the Euclidean order
    tagged = np.hstack([x[:, :-1], code])  # the scorer sees classes; Euclidean search barely does (x10 apart)
    tagged[:, -1] *= 1e-3  # keep the search Euclidean-dominated by the noisy features
    better = rerank(tagged, labels, _CodeScorer(), top_n=8, ks=(1, 8))
    assert better["rerank@8/recall@8"] == better["rerank@8/euclidean_recall@8"]  # same lists, re-ordered
    assert better["rerank@8/recall@1"] == pytest.approx(better["rerank@8/euclidean_recall@8"])  # hit moved to 1
    assert better["rerank@8/recall@1"] > better["rerank@8/euclidean_recall@1"]
    assert better["rerank@8/ms_per_query"] > 0 and better["rerank@8/queries"] == 100


def test_pair_similarities_sample_true_positives_and_negatives():
    x, labels, _ = _clustered(noise=0.1)
    sims = pair_similarities(x, labels, PDDMLoss(x.shape[1]).scorer, pairs=500, seed=1)
    assert set(sims) == {"negative Euclidean distance", "PDDM score"}
    eu = sims["negative Euclidean distance"]
    assert len(eu["positive"]) == 500 and len(eu["negative"]) == 500
    assert eu["positive"].mean() > eu["negative"].mean()  # tight clusters: positives are closer
    assert (eu["positive"] < 0).all()  # never a sample with itself (distance 0)


def test_the_learned_metric_is_exported_beside_the_network(run):
    scorer = load_exported_metric(run / "model.pt")
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    torch.manual_seed(0)
    create_model(ModelConfig(embed_dim=16, small_cnn_width=8))
    assert type(scorer).__name__ == "PDDM" and scorer(a, b).shape == (4,)
    torch.testing.assert_close(scorer(a, b), scorer(b, a))  # symmetric, as the unit is


def test_eval_local_writes_embeddings_metrics_and_report_then_recomputes(split, run, tmp_path, cli):
    out = tmp_path / "ev"
    first = cli(run, "--shards", split, "--out", out, "--local", "--support", "2", "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "R@1" in first.stdout and f"report: {out / 'report.html'}" in first.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("recall@1", "recall@32", "r_precision", "map@r", "nmi", "ncm_top1", "knn_top5", "rerank@8/recall@1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["rerank@8/ms_per_query"] > 0
    assert metrics["queries"] == metrics["images"] == 60 and metrics["transfer_queries"] == 60 - 10 * 2
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (60, 16) and np.load(out / "labels.npy").shape == (60,) and len(np.load(out / "keys.npy")) == 60
    assert (out / "report.html").stat().st_size > 10_000
    again = cli("--embeddings", out, "--out", tmp_path / "again", "--support", "2", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    recomputed = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("recall@1", "r_precision", "map@r", "nmi", "ncm_top1", "rerank@8/recall@1"):
        assert recomputed[key] == metrics[key], key


def test_bad_input_gets_a_one_line_error(split, run, tmp_path, cli):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cases = [((empty, "--shards", split, "--local"), "no exported model")]
    folder = tmp_path / "emb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "embeddings.npy", rng.normal(size=(6, 4)).astype(np.float32))
    np.save(folder / "labels.npy", np.array([0, 0, 1, 1, 2], np.int64))
    cases.append((("--embeddings", folder), "6 embedding rows but 5 labels"))
    nan = tmp_path / "nan"
    nan.mkdir()
    e = rng.normal(size=(6, 4)).astype(np.float32)
    e[3, 1] = np.nan
    np.save(nan / "embeddings.npy", e)
    np.save(nan / "labels.npy", np.array([0, 0, 1, 1, 2, 2], np.int64))
    cases.append((("--embeddings", nan), "1 of 6 embeddings hold NaN or infinite values"))
    single = tmp_path / "single"
    single.mkdir()
    np.save(single / "embeddings.npy", rng.normal(size=(4, 4)).astype(np.float32))
    np.save(single / "labels.npy", np.arange(4))
    cases.append((("--embeddings", single), "every class has fewer than two samples"))
    ok = tmp_path / "ok"
    ok.mkdir()
    np.save(ok / "embeddings.npy", rng.normal(size=(6, 4)).astype(np.float32))
    np.save(ok / "labels.npy", np.array([0, 0, 0, 1, 1, 1], np.int64))
    cases.append((("--embeddings", ok, "--support", "3"), "support"))
    for args, message in cases:
        result = cli(*args, "--quiet")
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args


@pytest.mark.slow
def test_eval_on_ray_workers_embeds_every_key_once_in_split_order(split, run, tmp_path, cli):
    local = cli(run, "--shards", split, "--out", tmp_path / "local", "--local", "--no-report", "--quiet")
    assert local.returncode == 0, local.stderr[-3000:]
    ray_run = cli(
        run, "--shards", split, "--out", tmp_path / "ray", "--workers", "2", "--loader-workers", "2", "--no-report"
    )
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    keys = np.load(tmp_path / "ray" / "keys.npy")
    assert len(set(keys.tolist())) == len(keys) == 60
    assert np.array_equal(np.load(tmp_path / "ray" / "positions.npy"), np.arange(60))
    assert np.array_equal(keys, np.load(tmp_path / "local" / "keys.npy"))
    assert np.array_equal(np.load(tmp_path / "ray" / "labels.npy"), np.load(tmp_path / "local" / "labels.npy"))
    np.testing.assert_allclose(
        np.load(tmp_path / "ray" / "embeddings.npy"), np.load(tmp_path / "local" / "embeddings.npy"), atol=1e-6
    )
    ray_metrics = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert ray_metrics["recall@1"] == json.loads((tmp_path / "local" / "metrics.json").read_text())["recall@1"]

    # A model the workers cannot read (the driver does not open it with --image-size): one line, as with
    # --local, and no retry spent on it.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    failed = cli(bad, "--shards", split, "--out", tmp_path / "bad", "--workers", "2", "--image-size", "32")
    assert failed.returncode == 2, failed.stderr[-3000:]
    last = [line for line in failed.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and str(bad) in last, failed.stderr[-3000:]
    assert "retry" not in failed.stderr.lower(), failed.stderr[-3000:]
