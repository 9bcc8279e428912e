"""distpddm.retrieval: exact search against brute force (exact ties included), the metrics against
pytorch-metric-learning's AccuracyCalculator and a from-scratch reference, distributed sums, NMI, transfer
accuracy on constructed cases, and the one-line input errors."""

import numpy as np
import pytest

from distpddm import retrieval as R


def clusters(sizes, dim=16, sigma=0.6, seed=0):
    """Seeded Gaussian clusters (float32), rows shuffled; class c has sizes[c] members."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.standard_normal((len(sizes), dim))
    return (centres[y] + sigma * rng.standard_normal((len(y), dim))).astype(np.float32), y


def integer_points(n, dim, seed=0, dup_group=12):
    """Small-integer embeddings (every distance exact in float32): many exact ties, up to 150 copied rows and a
    group of ``dup_group`` identical rows."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, (n, dim)).astype(np.float32)
    copies = min(150, n // 4)
    src, dst = rng.choice(n, copies, replace=False), rng.choice(n, copies, replace=False)
    x[dst] = x[src]
    if n > 100:
        x[n // 2 : n // 2 + dup_group] = x[n // 3]
    return x


def brute_force(queries, gallery, k, query_ids=None):
    """float64 squared distances, ranked by (distance, gallery row), the query's own row removed."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    d = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
    rows = np.broadcast_to(np.arange(len(g)), d.shape)
    order = np.lexsort((rows, d), axis=-1)
    if query_ids is not None:
        order = np.array([row[row != i] for i, row in zip(query_ids, order, strict=True)])
    order = order[:, :k]
    return np.take_along_axis(d, order, 1), order


def reference_metrics(x, y, ks, r_cap):
    """The metrics from their definitions, query by query, on a float64 all-pairs ranking."""
    n = len(x)
    _, nn = brute_force(x, x, n - 1, np.arange(n))
    counts = {c: int((y == c).sum()) for c in np.unique(y)}
    out = {f"recall@{k}": [] for k in ks} | {"r_precision": [], "map@r": []}
    for i in range(n):
        if counts[y[i]] == 1:
            continue
        same = y[nn[i]] == y[i]
        for k in ks:
            out[f"recall@{k}"].append(same[: min(k, n - 1)].any())
        r = min(counts[y[i]] - 1, r_cap)
        out["r_precision"].append(same[:r].sum() / r)
        out["map@r"].append(sum(same[: j + 1].sum() / (j + 1) for j in range(r) if same[j]) / r)
    singletons = sum(c == 1 for c in counts.values())
    figures = {key: float(np.mean(v)) for key, v in out.items()}
    return figures | {"queries": n - singletons, "singletons": singletons, "images": n, "classes": len(counts)}


# ------------------------------------------------------------------------------------------------ search


@pytest.mark.parametrize(
    "k, block, dim",
    [
        (5, 97, 4),  # faiss's per-pair kernel (small blocks), heap selection (k < 100)
        (10, None, 64),  # one block: faiss's BLAS kernel
        (150, 61, 4),  # reservoir selection (k >= 100)
        (150, None, 64),
    ],
)
def test_search_equals_brute_force_with_exact_ties(k, block, dim):
    n = 2503  # divisible neither by 97 nor by 61
    x = integer_points(n, dim)
    ids = np.arange(n)
    dist, rows = R.search(x, x, k, query_ids=ids, block=block)
    want_d, want_rows = brute_force(x, x, k, ids)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(dist, want_d.astype(np.float32))
    assert not (rows == ids[:, None]).any()
    # the case is exercised: equal distances inside lists, and rows whose self match ties pushed out
    assert ((dist[:, 1:] == dist[:, :-1]).sum(1) > 0).mean() > 0.5
    raw = R.search(x, x, k + 1)[1]  # 13 identical rows: those with k + 1 lower duplicates lose their self match
    assert (~(raw == ids[:, None]).any(1)).sum() >= max(0, 13 - (k + 1))


def test_search_without_query_ids_and_shapes():
    x = integer_points(700, 8, seed=1)
    q = integer_points(53, 8, seed=2)
    dist, rows = R.search(q, x, 7, block=10)
    want_d, want_rows = brute_force(q, x, 7)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(dist, want_d.astype(np.float32))
    assert dist.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (53, 7)


def test_self_pushed_out_drops_the_last():
    """Five identical rows: the last one's k + 1 = 3 nearest are three lower duplicates, so the list keeps
    the first two of them."""
    x = np.zeros((6, 2), np.float32)
    x[5] = 9.0
    _, rows = R.search(x, x, 2, query_ids=np.arange(6))
    np.testing.assert_array_equal(rows[:5], [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(rows[5], [0, 1])


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_pytorch_metric_learning():
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    sizes = [1, 1, 1, *np.random.default_rng(3).integers(2, 70, 37)]  # three singletons
    x, y = clusters(sizes, dim=16, sigma=0.9)
    ours = R.retrieval_metrics(x, y, ks=(1, 2, 4, 8, 16, 32))
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    pml = calc.get_accuracy(x, y)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-12)
    assert 0.3 < ours["map@r"] < 0.95 and 0.5 < ours["recall@1"] < 0.999  # not a trivial case
    assert (ours["queries"], ours["singletons"], ours["images"], ours["classes"]) == (len(y) - 3, 3, len(y), 40)
    # PML clusters with faiss.Kmeans(niter=20) and faiss's default seed 1234: the same k-means here
    assert R.clustering_nmi(x, y, seed=1234) == pytest.approx(pml["NMI"], abs=1e-12)


def test_metrics_match_reference_with_ties_singletons_and_cap():
    rng = np.random.default_rng(5)
    y = rng.permutation(np.repeat(np.arange(9), [1, 1, 2, 3, 5, 8, 13, 21, 6]))  # 60 images
    x = rng.integers(-1, 2, (len(y), 3)).astype(np.float32)  # 27 distinct points: ties everywhere
    x[y == 7] += np.float32(1)  # class 7 a little apart, so the metrics are not all near chance
    ks = (1, 3, 8, 100)  # 100 > N - 1: capped at the whole gallery
    for r_cap in (1000, 4):  # 4 binds for classes of more than 5 images
        got = R.retrieval_metrics(x, y, ks, r_cap=r_cap, block=7)
        want = reference_metrics(x, y, ks, r_cap)
        assert got.pop("r_cap") == r_cap
        assert got == pytest.approx(want, abs=1e-12)
    assert got["recall@100"] == 1.0


def test_block_size_does_not_change_the_figures():
    x, y = clusters([5, 9, 2, 30, 17, 1, 11], dim=8, sigma=1.5, seed=7)
    whole = R.retrieval_metrics(x, y)
    for block in (1, 3, 10, 1000):
        assert R.retrieval_metrics(x, y, block=block) == pytest.approx(whole, abs=1e-12)


def test_sums_over_three_ranks_equal_the_whole():
    x, y = clusters(np.random.default_rng(9).integers(1, 40, 50), dim=8, sigma=1.0, seed=9)
    assert len(x) % 3 != 0
    whole = R.retrieval_metrics(x, y, ks=(1, 2, 4, 32))
    splits = {
        "index arrays": np.array_split(np.arange(len(x)), 3),
        "slices": [slice(0, 100), slice(100, 101), slice(101, None)],
        "strided": [slice(r, None, 3) for r in range(3)],
        "masks": [np.arange(len(x)) % 3 == r for r in range(3)],
    }
    for name, parts in splits.items():
        sums = [R.retrieval_sums(x, y, ks=(1, 2, 4, 32), queries=p) for p in parts]
        total = {key: sum(s[key] for s in sums) for key in sums[0]}
        assert total["parts"] == 3
        got = R.finish_sums(total)
        assert got == pytest.approx(whole, abs=1e-12), name
        assert (got["images"], got["classes"], got["r_cap"]) == (len(x), 50, R.DEFAULT_R_CAP)
    one = R.retrieval_metrics(x, y, queries=[int(np.flatnonzero(np.bincount(y)[y] > 1)[0])])
    assert one["queries"] == 1


def test_only_singleton_queries_give_nan_not_an_error():
    x, y = clusters([1, 4, 4], dim=4, seed=1)
    got = R.retrieval_metrics(x, y, queries=np.flatnonzero(y == 0))
    assert got["queries"] == 0 and got["singletons"] == 1 and np.isnan(got["recall@1"]) and np.isnan(got["map@r"])


def test_recall_from_neighbours_by_hand():
    neighbours = np.array([[1, 2, 3], [2, 2, 1], [3, 3, 3], [5, 0, 0]])
    queries = np.array([3, 1, 1, 5])
    got = R.recall_from_neighbours(neighbours, queries, ks=(1, 2, 3, 10))
    assert got == {"recall@1": 0.25, "recall@2": 0.25, "recall@3": 0.75, "recall@10": 0.75}
    labels = np.array(["a", "b", "a", "b", "a"])
    assert R.recall_from_neighbours(labels[[[2, 1], [0, 3]]], labels[[0, 1]], ks=[1, 2]) == {
        "recall@1": 0.5,
        "recall@2": 1.0,
    }


# ------------------------------------------------------------------------------------------------ clustering


def test_nmi_separated_clusters_is_one_and_deterministic():
    # two classes: faiss's k-means (random init, one run, as in PML) cannot merge them; with more classes it
    # can (3 tight classes: NMI 0.67 for some seeds), which is the method's, not the embedding's, failure
    for seed in range(3):
        x, y = clusters([30, 30], dim=16, sigma=0.01, seed=seed)
        assert R.clustering_nmi(x, y, seed=seed) == pytest.approx(1.0)
    x, y = clusters([25] * 12, dim=8, sigma=1.2, seed=3)
    a, b = R.clustering_nmi(x, y, seed=0), R.clustering_nmi(x, y, seed=0)
    assert a == b and 0.2 < a < 0.99


def test_nmi_is_sklearn_on_the_faiss_assignment():
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    x, y = clusters([20] * 10, dim=8, sigma=1.0, seed=4)
    km = faiss.Kmeans(8, 10, niter=20, seed=7)
    km.train(x)
    assign = km.index.search(x, 1)[1][:, 0]
    assert R.clustering_nmi(x, y, seed=7) == normalized_mutual_info_score(y, assign, average_method="arithmetic")


# ------------------------------------------------------------------------------------------------ transfer


def test_transfer_separated_clusters_is_perfect():
    x, y = clusters([12] * 20, dim=16, sigma=0.01, seed=6)
    got = R.transfer_accuracy(x, y, support=3, seed=1)
    assert got == {
        "ncm_top1": 1.0,
        "ncm_top5": 1.0,
        "knn_top1": 1.0,
        "knn_top5": 1.0,
        "support": 3,
        "queries": 20 * 9,
        "classes": 20,
        "k": 5,
    }


def _simplex_pair(c_b):
    """Class A: e_0, e_1, e_2 (any 2 support + 1 query look the same); class B: 3 copies of ``c_b``. Support
    2, so each class has exactly 1 query, and the figures are the same whichever split is drawn."""
    a = np.eye(8)[:3]
    x = np.concatenate([a, np.repeat(c_b[None], 3, 0)]).astype(np.float32)
    return x, np.array([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_transfer_ncm_right_where_knn_wrong(seed):
    """A's query q = r e_q. Its support mean is r (e_i + e_j) / 2: |q - mean|^2 = 1.5 r^2. B sits at distance
    d from the centre, orthogonally: |q - b|^2 = d^2 + r^2. Each A support image: |q - e_i r|^2 = 2 r^2.
    With r = 1, d^2 = 0.75: NCM picks A (1.5 < 1.75), nearest support image is B (1.75 < 2). B's query
    is on its support: both right. So NCM 1.0, k-NN 0.5."""
    c_b = np.zeros(8)
    c_b[5] = np.sqrt(0.75)
    x, y = _simplex_pair(c_b)
    for k in (1, 3):
        got = R.transfer_accuracy(x, y, support=2, seed=seed, k=k)
        assert (got["ncm_top1"], got["knn_top1"]) == (1.0, 0.5)
        assert got["ncm_top5"] == got["knn_top5"] == 1.0  # two classes: top-5 is top-all
        assert (got["queries"], got["classes"], got["support"]) == (2, 2, 2)


def test_transfer_unit_vectors_normalise_the_means():
    """Unit vectors: A = e_0, e_1, e_2; B = cos(p) (e_0 + e_1 + e_2) / sqrt(3) + sin(p) e_5 with cos p = 0.3.
    A's query e_q against its normalised mean (e_i + e_j) / sqrt(2): distance^2 2; against B: 2 - 2 * 0.3 /
    sqrt(3) = 1.65 -> B (wrong). The raw mean (distance^2 1.5) would have been right."""
    e = np.eye(8)
    b = 0.3 * (e[0] + e[1] + e[2]) / np.sqrt(3) + np.sqrt(1 - 0.09) * e[5]
    x = np.concatenate([e[:3], np.repeat(b[None], 3, 0)]).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1])
    got = R.transfer_accuracy(x, y, support=2)
    assert (got["ncm_top1"], got["knn_top1"]) == (0.5, 0.5)
    got = R.transfer_accuracy(x * 2, y, support=2)  # not unit vectors: raw means
    assert (got["ncm_top1"], got["knn_top1"]) == (1.0, 0.5)


def test_knn_ranking_votes_then_nearest():
    cand = np.array(
        [
            [2, 1, 1, 3, 4, 5, 6],  # votes among 3: 1 x2, 2 x1; then 3, 4, 5 by position
            [7, 8, 8, 7, 9, 9, 4],  # votes among 4: 7 x2, 8 x2 -> 7 (nearer); then 9, 4
            [4, 4, 4, 4, 4, 4, 4],  # one class only: the rest is empty (-1)
        ]
    )
    np.testing.assert_array_equal(R._rank_by_votes(cand, 3, 5)[0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(R._rank_by_votes(cand, 4, 5)[1], [7, 8, 9, 4, -1])
    np.testing.assert_array_equal(R._rank_by_votes(cand, 4, 5)[2], [4, -1, -1, -1, -1])


def test_support_split_is_seeded_and_per_class():
    y = np.repeat(np.arange(30), 7)
    a, b, c = R.support_split(y, 3, seed=0), R.support_split(y, 3, seed=0), R.support_split(y, 3, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (np.bincount(y[a]) == 3).all()
    x, y = clusters([8] * 15, dim=8, sigma=1.5, seed=8)
    assert R.transfer_accuracy(x, y, support=2, seed=4) == R.transfer_accuracy(x, y, support=2, seed=4)


# ------------------------------------------------------------------------------------------------ errors


def _one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fn", [R.retrieval_metrics, R.retrieval_sums, R.clustering_nmi])
def test_bad_inputs(fn):
    x, y = clusters([3, 3], dim=4)
    _one_line_error(fn, x, y[:5], match="6 embedding rows but 5 labels")
    bad = x.copy()
    bad[1, 0], bad[4, 2] = np.nan, np.inf
    _one_line_error(fn, bad, y, match=r"2 of 6 embedding rows hold NaN or infinite values \(first: row 1\)")
    _one_line_error(fn, x[:1], y[:1], match="1 sample")
    _one_line_error(fn, x[0], y, match="2-D")
    _one_line_error(fn, x, np.arange(6), match="every class has fewer than two samples")


def test_bad_arguments():
    x, y = clusters([3, 3], dim=4)
    _one_line_error(R.retrieval_metrics, x, y, ks=(0, 1), match="ks must be positive")
    _one_line_error(R.retrieval_metrics, x, y, r_cap=0, match="r_cap")
    _one_line_error(R.retrieval_metrics, x, y, queries=[0, 6], match="outside 0..5")
    _one_line_error(R.retrieval_metrics, x, y, queries=[1, 1], match="more than once")
    _one_line_error(R.finish_sums, {"queries": 3}, match="not retrieval_sums output")
    _one_line_error(R.search, x, x, 6, query_ids=np.arange(6), match="k=6 neighbours asked, the gallery offers 1..5")
    _one_line_error(R.search, x, x[:, :3], 1, match="same width")
    _one_line_error(R.search, x, x, 1, query_ids=[0], match="1 query_ids for 6 queries")
    _one_line_error(R.recall_from_neighbours, np.zeros((3, 2)), np.zeros(2), ks=(1,), match="Q x M")


def test_transfer_errors():
    x, y = clusters([4, 3, 5], dim=4)
    _one_line_error(
        R.transfer_accuracy, x, y, support=3, match=r"--support 3 larger than a class: class 1 has 3 images"
    )
    _one_line_error(R.transfer_accuracy, x, y, support=0, match="--support must be a positive integer")
    _one_line_error(R.transfer_accuracy, x[:9], np.r_[y[:8], 7], support=1, match="class 7 has 1 image")
    _one_line_error(R.transfer_accuracy, x, y, support=1, k=0, match="k must be a positive integer")
    bad = x.copy()
    bad[3] = np.nan
    _one_line_error(R.transfer_accuracy, bad, y, support=1, match="1 of 12 embedding rows")


def test_use_gpu_true_without_a_gpu_is_a_clear_error():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("faiss has a GPU here")
    x, y = clusters([3, 3], dim=4)
    _one_line_error(R.search, x, x, 1, use_gpu=True, match="use_gpu=True but faiss sees no GPU")
    _one_line_error(R.clustering_nmi, x, y, use_gpu=True, match="use_gpu=True but faiss sees no GPU")
    assert R.retrieval_metrics(x, y, use_gpu=False) == R.retrieval_metrics(x, y)
