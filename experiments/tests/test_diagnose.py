"""experiments/diagnose.py: the per-seed diagnostics that say where one criterion's held-out lead comes from.

``diagnose`` imports as a top-level module: experiments/conftest.py puts experiments/ on sys.path."""

import diagnose
import numpy as np
import pytest

from distpddm.retrieval import retrieval_metrics


def test_top1_hits_match_a_brute_force_search_that_leaves_each_image_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.integers(0, 4, 60)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    want = y[d.argmin(1)] == y
    got = diagnose.top1_hits(x, y)
    assert np.array_equal(got, want) and 0 < got.sum() < 60
    assert got.mean() == pytest.approx(retrieval_metrics(x, y, (1,))["recall@1"])


def test_per_class_map_averages_to_the_overall_map_at_r_for_equal_classes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    y = np.repeat(np.arange(8), 6)
    per = diagnose.per_class_map(x, y, np.arange(8))
    assert per.mean() == pytest.approx(retrieval_metrics(x, y, (1,))["map@r"]) and per.std() > 0


def test_difficulty_bins_are_equal_sized_hardest_first_whatever_the_ties():
    raw = np.array([0.5, 0.1, 0.5, 0.9, 0.5, 0.0, 0.5, 0.3])
    bins = diagnose.difficulty_bins(raw, 4)
    assert np.bincount(bins).tolist() == [2, 2, 2, 2]
    assert set(bins[[5, 1]]) == {0} and bins[3] == 3  # the two hardest first, the easiest last
    assert bins[[7, 0, 2, 4, 6]].tolist() == [1, 1, 2, 2, 3]  # the four tied at 0.5 split in class order
    for b in range(3):  # every font of a bin at most as easy as every font of the next
        assert raw[bins == b].max() <= raw[bins == b + 1].min()


def _clusters(rng, classes, per, good):
    """Embeddings of ``classes`` x ``per`` images: tight per-class clusters for the classes in ``good``,
    the rest all drawn around one shared point (so they cannot retrieve their own class reliably)."""
    y = np.repeat(np.arange(classes), per)
    centres = rng.normal(size=(classes, 16)) * 10
    x = np.where(np.isin(y, good)[:, None], centres[y], 0.0) + rng.normal(size=(len(y), 16))
    return x.astype(np.float32), y


def test_compare_seed_puts_the_gap_on_the_fonts_that_lost_it():
    rng = np.random.default_rng(1)
    a_test, y = _clusters(rng, 8, 6, good=range(8))  # A separates every held-out class
    b_test, _ = _clusters(rng, 8, 6, good=range(4))  # B only classes 0-3
    train, ty = _clusters(rng, 6, 5, good=range(6))
    b_train, _ = _clusters(rng, 6, 5, good=range(3))  # B separates only half of its training classes
    a = {"test": a_test, "test_labels": y, "train": train, "train_labels": ty}
    b = {"test": b_test, "test_labels": y, "train": b_train, "train_labels": ty}
    raw_bins = np.array([1, 1, 1, 1, 0, 0, 0, 0])  # classes 4-7 are the "hard" bin
    out = diagnose.compare_seed(a, b, raw_bins, np.arange(8))
    hits_b = diagnose.top1_hits(b_test, y)
    assert out["overlap"] == {"both": int(hits_b.sum()), "only A": int((~hits_b).sum()), "only B": 0, "neither": 0}
    assert (~hits_b[y < 4]).sum() == 0 and (~hits_b[y >= 4]).sum() > 0  # B's misses are all in classes 4-7
    hard, easy = out["bins"]
    assert hard["fonts"] == easy["fonts"] == 4
    assert hard["recall@1 A"] == easy["recall@1 A"] == easy["recall@1 B"] == 1.0
    assert hard["recall@1 B"] == pytest.approx(hits_b[y >= 4].mean()) and hard["map@r B"] < hard["map@r A"]
    for tag, emb in (("A", train), ("B", b_train)):  # each row's own training embeddings, not the held-out ones
        want = retrieval_metrics(emb, ty, (1,))
        assert out[f"train {tag}"] == {"recall@1": want["recall@1"], "map@r": want["map@r"]}
    assert out["train B"]["map@r"] < out["train A"]["map@r"]
    assert out["test A"]["recall@1"] == 1.0 and out["test B"]["recall@1"] == pytest.approx(hits_b.mean())
    swapped = diagnose.compare_seed(b, a, raw_bins, np.arange(8))  # a second "seed" whose gaps are the negatives
    summary = diagnose.summarise([out, swapped])
    gap = hits_b[y >= 4].mean() - 1
    assert summary["bins"][0]["recall@1"]["B - A"] == {
        "mean": pytest.approx(0.0),
        "sd": pytest.approx(abs(gap) * 2**0.5),
    }
    assert summary["test recall@1"]["A"]["mean"] == pytest.approx((1 + hits_b.mean()) / 2)
    with pytest.raises(ValueError, match="different images"):
        diagnose.compare_seed(a, b | {"test_labels": y[::-1]}, raw_bins, np.arange(8))


def test_gap_figure_draws_one_line_per_comparison_on_both_metrics():
    def result(protocol, gap):
        stat = {"mean": gap, "sd": 0.01}
        bins = [{"fonts": 5, "recall@1": {"B - A": stat}, "map@r": {"B - A": stat}} for _ in range(4)]
        return {"protocol": protocol, "rows": ["pml_ms", "pddm_allpos_b01"], "seeds": [0, 1], "summary": {"bins": bins}}

    fig = diagnose.gap_figure([result("scratch", -0.02), result("scratch64", 0.01)])
    r1, ap = fig.axes
    for ax in (r1, ap):
        lines = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]  # the gap lines, not caps or the zero line
        assert [list(ln.get_ydata()) for ln in lines] == [[-0.02] * 4, [0.01] * 4]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["scratch (2 seeds)", "scratch64 (2 seeds)"]
