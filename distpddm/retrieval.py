"""Retrieval metrics at ImageNet-10K scale: Recall@K, R-Precision, MAP@R (exact Euclidean search), NMI of a
k-means clustering, and transfer accuracy to unseen classes. Pure numpy + faiss (no torch).

Setting: class-disjoint retrieval, every image a query whose gallery is every other image. The search runs
in blocks of queries, so memory is the embeddings (N x D float32, held once: not copied into a faiss index
on CPU, queries gathered block by block) plus one block's neighbour lists and the metrics made from them (a
few hundred MB), whatever N: about 5 GB at 9M x 128. The metrics are sums over queries, so ranks can each
search their own queries against the whole gallery and all-reduce the sums (:func:`retrieval_sums`,
:func:`finish_sums`).

Conventions (the same in every function here):

- Distances are squared Euclidean (faiss's), exact, in float32. Embeddings are not normalised here.
- Ties: neighbours are ranked by (distance, gallery row): of equally distant gallery items the lower row
  comes first, and where such a tie straddles the end of a list the lower rows are kept. That is faiss's
  CPU order (its heaps and reservoirs compare (distance, id) pairs and scan the gallery in row order; the
  tests check it against a brute-force search on exact ties). On a faiss GPU index the order within a list is
  re-sorted to the same rule; which of the tied items straddling the end of a list are kept is the GPU's.
- The query itself is left out of its own neighbours (search k + 1, drop the self match; where ties with
  duplicates of the query pushed it out of the list, drop the last instead, as pytorch-metric-learning does).
- Singletons (samples whose class has no other member) are not queries for any metric: with R = 0 neither
  R-Precision nor MAP@R is defined, and Recall@K could only be 0. pytorch-metric-learning's
  ``AccuracyCalculator`` does the same by default (its ``not_lone_query_mask`` drops "lone" queries from
  precision@1, R-Precision and MAP@R). They stay in every gallery; their number is reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

DEFAULT_KS = (1, 2, 4, 8, 16, 32)
#: R of R-Precision / MAP@R is capped here: a class of 50,000 images would otherwise need a 50,000-deep
#: search for each of its members. Classes of at most r_cap + 1 images are measured exactly.
DEFAULT_R_CAP = 1000
#: Bound on one block's search output (float32 distances + int64 rows, block x depth); the metrics made from
#: a block take a few times this again, transiently.
SEARCH_BYTES = 64 << 20
#: faiss GPU indexes select at most this many neighbours per query; deeper searches run on the CPU.
GPU_MAX_K = 2048


def _faiss():
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every ISA it tries at INFO
    import faiss

    return faiss


def _use_gpu(faiss, use_gpu: bool | None) -> bool:
    """Whether to run on a GPU: None = when faiss has one, True = must (ValueError if none), False = never."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and not gpus:
        raise ValueError("use_gpu=True but faiss sees no GPU (faiss-cpu is installed, or no device is visible)")
    return bool(gpus) and use_gpu is not False


def block_rows(depth: int, budget: int = SEARCH_BYTES) -> int:
    """Queries per block so that a block's distances and rows (12 bytes each, block x depth) fit ``budget``."""
    return max(1, budget // (12 * max(1, depth)))


# ------------------------------------------------------------------------------------------------ checks


def _check_split(embeddings, labels, *, pairs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(float32 C-contiguous embeddings, 1-D labels), or a one-line ValueError naming what is wrong."""
    x = np.asarray(embeddings)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N x D), got shape {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embedding rows but {len(y)} labels")
    if len(x) < 2:
        raise ValueError(f"{len(x)} sample(s): at least two are needed")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = np.concatenate([~np.isfinite(x[s : s + 262144]).all(1) for s in range(0, len(x), 262144)])
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(x)} embedding rows hold NaN or infinite values "
            f"(first: row {int(np.flatnonzero(bad)[0])})"
        )
    if pairs and np.unique(y, return_counts=True)[1].max() < 2:
        raise ValueError("every class has fewer than two samples: no query has a same-class image to retrieve")
    return x, y


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return ks


def _query_rows(queries, n: int) -> np.ndarray:
    """Row numbers of a ``queries`` selection: None (all), a slice, a boolean mask or an index array."""
    if queries is None:
        return np.arange(n)
    if isinstance(queries, slice):
        return np.arange(n)[queries]
    rows = np.asarray(queries)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ValueError(f"a boolean queries mask must have shape ({n},), got {rows.shape}")
        return np.flatnonzero(rows)
    if rows.ndim != 1 or (len(rows) and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"queries must be a slice, a boolean mask or a 1-D array of row numbers, got {rows.dtype}")
    rows = rows.astype(np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"queries hold row numbers outside 0..{n - 1}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError("queries hold a row more than once")
    return rows


# ------------------------------------------------------------------------------------------------ search


def _searcher(gallery: np.ndarray, depth: int, use_gpu: bool | None):
    """``fn(queries, k) -> (distances, rows)`` over ``gallery``: a faiss GPU flat index when faiss has GPUs
    (and use_gpu is not False), else faiss's exact CPU kernel straight on the array (the one
    ``IndexFlatL2.search`` runs, without IndexFlatL2's copy of the gallery)."""
    faiss = _faiss()
    gpu = _use_gpu(faiss, use_gpu)
    if gpu and depth <= GPU_MAX_K:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(res, gallery.shape[1])
        index.add(gallery)

        def on_gpu(q, k, _keep=(res, index)):
            return _sort_ties(*index.search(q, k))

        return on_gpu
    if gpu:
        logging.getLogger(__name__).warning("search depth %d > %d: searching on the CPU", depth, GPU_MAX_K)
    return lambda q, k: faiss.knn(q, gallery, k)


def _sort_ties(dist: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of equal distance put in gallery order (only rows with such a tie out of order are re-sorted)."""
    bad = ((dist[:, 1:] == dist[:, :-1]) & (rows[:, 1:] < rows[:, :-1])).any(1)
    for i in np.flatnonzero(bad):
        order = np.lexsort((rows[i], dist[i]))
        dist[i], rows[i] = dist[i][order], rows[i][order]
    return dist, rows


def _drop_self(dist: np.ndarray, rows: np.ndarray, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k + 1 neighbours -> k: the query's own row removed, or the last where ties pushed it out."""
    own = rows == query_ids[:, None]
    own[~own.any(1), -1] = True
    n, k = len(rows), rows.shape[1] - 1
    return dist[~own].reshape(n, k), rows[~own].reshape(n, k)


def _search_blocks(
    queries: np.ndarray | None, gallery: np.ndarray, k: int, query_ids: np.ndarray | None, block: int | None, use_gpu
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first query of the block, distances, rows) for consecutive blocks of ``queries``; ``queries=None``:
    the gallery rows ``query_ids``, gathered block by block (never a second copy of the embeddings)."""
    depth = k + (query_ids is not None)
    block = block or block_rows(depth)
    fn = _searcher(gallery, depth, use_gpu)
    n = len(query_ids) if queries is None else len(queries)
    for s in range(0, n, block):
        q = gallery[query_ids[s : s + block]] if queries is None else queries[s : s + block]
        dist, rows = fn(np.ascontiguousarray(q), depth)
        if query_ids is not None:
            dist, rows = _drop_self(dist, rows, query_ids[s : s + block])
        yield s, dist, rows


def search(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    query_ids: np.ndarray | None = None,
    block: int | None = None,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest gallery rows of each query: (squared distances float32, rows int64), both Q x k,
    nearest first, ties in gallery-row order (module docstring).

    ``query_ids`` (the gallery row of each query) leaves each query out of its own list. Queries go through
    faiss in blocks of ``block`` rows (default: as many as keep a block's output under ``SEARCH_BYTES``), so
    the search's own memory is bounded; the Q x k result is the caller's. ``use_gpu``: None = a faiss GPU
    index when faiss has GPUs, True = require one, False = CPU."""
    q = np.asarray(queries)
    g = np.asarray(gallery)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {q.shape} and gallery {g.shape} must be 2-D with the same width")
    q = np.ascontiguousarray(q, dtype=np.float32)
    g = np.ascontiguousarray(g, dtype=np.float32)
    if query_ids is not None:
        query_ids = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        if len(query_ids) != len(q):
            raise ValueError(f"{len(query_ids)} query_ids for {len(q)} queries")
        if len(q) and (query_ids.min() < 0 or query_ids.max() >= len(g)):
            raise ValueError(f"query_ids must be gallery rows 0..{len(g) - 1}")
    available = len(g) - (query_ids is not None)
    if int(k) != k or not 1 <= k <= available:
        raise ValueError(f"k={k} neighbours asked, the gallery offers 1..{available}")
    if block is not None and block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    k = int(k)
    dist = np.empty((len(q), k), np.float32)
    rows = np.empty((len(q), k), np.int64)
    for s, d, r in _search_blocks(q, g, k, query_ids, block, use_gpu):
        dist[s : s + len(d)], rows[s : s + len(d)] = d, r
    return dist, rows


# ------------------------------------------------------------------------------------------ retrieval metrics


def _recall_hits(same: np.ndarray, ks: Sequence[int]) -> dict[int, int]:
    """Queries with a same-class item in their first K (K capped at the list length), per K."""
    return {k: int(same[:, :k].any(1).sum()) for k in ks}


def _r_sums(same: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """Sums over queries of R-Precision and MAP@R, each query's list cut at its own ``r`` (>= 1)."""
    m = int(r.max())
    pos = np.arange(1, m + 1)
    relevant = same[:, :m] & (pos <= r[:, None])
    hits = np.cumsum(relevant, axis=1, dtype=np.int32)
    r_precision = hits[np.arange(len(r)), r - 1] / r
    average_precision = np.where(relevant, hits / pos, 0.0).sum(1) / r
    return float(r_precision.sum()), float(average_precision.sum())


def recall_from_neighbours(
    neighbour_labels: np.ndarray, query_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@K from ranked neighbour label lists (Q x M, nearest first): the fraction of queries with a
    same-label item in their first K; K beyond M is capped at M. Every row counts as a query, so pass only
    queries that have a same-class item in the gallery (as :func:`retrieval_metrics` counts them)."""
    nl = np.asarray(neighbour_labels)
    ql = np.asarray(query_labels).reshape(-1)
    if nl.ndim != 2 or len(nl) != len(ql):
        raise ValueError(f"neighbour labels {nl.shape} must be Q x M for {len(ql)} query labels")
    if nl.size == 0:
        raise ValueError(f"no neighbours to score (neighbour labels of shape {nl.shape})")
    hits = _recall_hits(nl == ql[:, None], _check_ks(ks))
    return {f"recall@{k}": v / len(ql) for k, v in hits.items()}


def retrieval_sums(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    r_cap: int = DEFAULT_R_CAP,
    block: int | None = None,
    queries=None,
    use_gpu: bool | None = None,
) -> dict[str, float]:
    """The additive parts of :func:`retrieval_metrics` for the rows ``queries`` (None = all, a slice, a
    boolean mask or row numbers), every row staying in the gallery.

    Every value is a sum, so partial results (one per rank, each with its own queries) add up key by key:
    all-reduce every entry with SUM, then :func:`finish_sums`. ``parts`` counts the partial results added, so
    the entries every part holds whole (``images``, ``classes``, ``r_cap``) come out right after division by
    it. The search depth depends on the labels only (never on ``queries``), so a split of the queries over
    ranks gives exactly the figures of the whole."""
    x, y = _check_split(embeddings, labels)
    ks = _check_ks(ks)
    if int(r_cap) != r_cap or r_cap < 1:
        raise ValueError(f"r_cap must be a positive integer, got {r_cap}")
    r_cap = int(r_cap)
    rows = _query_rows(queries, len(x))
    _, cls, counts = np.unique(y, return_inverse=True, return_counts=True)
    cls = cls.reshape(-1)
    r_all = np.minimum(counts - 1, r_cap)  # R per class, capped
    depth = min(len(x) - 1, max(ks[-1], int(r_all.max())))
    counted = rows[counts[cls[rows]] > 1]
    sums = {
        "parts": 1,
        "images": len(x),
        "classes": len(counts),
        "r_cap": r_cap,
        "queries": len(counted),
        "singletons": len(rows) - len(counted),
        **{f"hits@{k}": 0 for k in ks},
        "r_precision": 0.0,
        "map@r": 0.0,
    }
    if not len(counted):
        return sums
    block = block or block_rows(depth + 1)
    for s, _, nn in _search_blocks(None, x, depth, counted, block, use_gpu):
        q_cls = cls[counted[s : s + len(nn)]]
        same = cls[nn] == q_cls[:, None]
        for k, v in _recall_hits(same, ks).items():
            sums[f"hits@{k}"] += v
        rp, ap = _r_sums(same, r_all[q_cls])
        sums["r_precision"] += rp
        sums["map@r"] += ap
    return sums


def finish_sums(sums: dict) -> dict[str, float]:
    """The metrics of (summed) :func:`retrieval_sums` results: ``recall@K``, ``r_precision``, ``map@r`` (NaN
    when no query counted) and the counts ``queries``, ``singletons``, ``r_cap``, ``images``, ``classes``."""
    need = {"parts", "images", "classes", "r_cap", "queries", "singletons", "r_precision", "map@r"}
    missing = need - set(sums)
    if missing:
        raise ValueError(f"not retrieval_sums output: {sorted(missing)} missing")
    parts = float(sums["parts"])
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    q = float(sums["queries"])
    ks = sorted(int(key.split("@")[1]) for key in sums if key.startswith("hits@"))
    out = {f"recall@{k}": float(sums[f"hits@{k}"]) / q if q else math.nan for k in ks}
    out["r_precision"] = float(sums["r_precision"]) / q if q else math.nan
    out["map@r"] = float(sums["map@r"]) / q if q else math.nan
    out["queries"] = round(q)
    out["singletons"] = round(float(sums["singletons"]))
    for key in ("r_cap", "images", "classes"):
        out[key] = round(float(sums[key]) / parts)
    return out


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    r_cap: int = DEFAULT_R_CAP,
    block: int | None = None,
    queries=None,
    use_gpu: bool | None = None,
) -> dict[str, float]:
    """Recall@K, R-Precision and MAP@R, each image a query against all the others.

    - Queries: every row of ``queries`` (default all) whose class has another member; singletons are left
      out of every metric (as pytorch-metric-learning's ``AccuracyCalculator`` does) and counted.
    - Recall@K: a same-class image among the K nearest; K above N - 1 is capped at N - 1 (the whole gallery).
    - R = the query's class size - 1, capped at ``r_cap`` (default 1000: a giant class would need a search
      that deep). R-Precision = same-class images in the first min(R, r_cap) / min(R, r_cap); MAP@R = the
      mean over those positions of precision-at-i where position i is same-class, normalised by
      min(R, r_cap). Uncapped, both equal pytorch-metric-learning's r_precision and
      mean_average_precision_at_r.
    - Cost: one exact search of depth max(max(ks), min(max R, r_cap)) (N^2 D multiply-adds), in blocks.

    Returns ``recall@K`` (the ks asked), ``r_precision``, ``map@r``, ``queries``, ``singletons``, ``r_cap``,
    ``images``, ``classes``."""
    sums = retrieval_sums(embeddings, labels, ks, r_cap=r_cap, block=block, queries=queries, use_gpu=use_gpu)
    return finish_sums(sums)


# ------------------------------------------------------------------------------------------------ clustering


def clustering_nmi(
    embeddings: np.ndarray, labels: np.ndarray, *, seed: int = 0, niter: int = 20, use_gpu: bool | None = None
) -> float:
    """NMI between the labels and a faiss k-means with as many clusters as classes, as pytorch-metric-learning
    computes it (``faiss.Kmeans(niter=20)``, then scikit-learn's ``normalized_mutual_info_score`` with the
    arithmetic mean); seeded and deterministic. faiss trains on at most 256 points per cluster (a seeded
    sample), then assigns every point. Its k-means starts from random points and runs once, so it can merge
    well-separated classes (three tight classes score 0.67 for some seeds): NMI measures k-means' luck as well
    as the embedding, which is why it is seeded and reported beside the retrieval figures, not instead.
    ``use_gpu`` as in :func:`search` (the GPU's float rounding may assign a few points differently)."""
    x, y = _check_split(embeddings, labels)
    from sklearn.metrics import normalized_mutual_info_score

    faiss = _faiss()
    gpu = _use_gpu(faiss, use_gpu)
    n_classes = len(np.unique(y))
    # min_points_per_centroid only silences faiss's "please provide more points" warning on small splits.
    km = faiss.Kmeans(
        x.shape[1],
        n_classes,
        niter=niter,
        seed=seed,
        min_points_per_centroid=1,
        verbose=False,
        gpu=gpu,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return float(normalized_mutual_info_score(y, assign[:, 0]))


# ------------------------------------------------------------------------------------------------ transfer


def support_split(labels: np.ndarray, support: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of the support rows: per class, ``support`` rows drawn at random (seeded: rows ranked by
    one uniform draw per row, the first ``support`` of each class by that rank)."""
    y = np.asarray(labels).reshape(-1)
    _, cls = np.unique(y, return_inverse=True)
    key = np.random.default_rng(seed).random(len(y))
    order = np.lexsort((key, cls.reshape(-1)))
    sorted_cls = cls.reshape(-1)[order]
    rank = np.arange(len(y)) - np.searchsorted(sorted_cls, sorted_cls, side="left")
    mask = np.zeros(len(y), bool)
    mask[order[rank < support]] = True
    return mask


def _rank_by_votes(cand: np.ndarray, k: int, top: int) -> np.ndarray:
    """Per row of ranked neighbour classes (Q x m): the ``top`` classes by votes among the first k, then by
    the position of the class's nearest support image; -1 where fewer classes appear."""
    n, m = cand.shape
    order = np.argsort(cand * m + np.arange(m), axis=1)  # by class, then position
    sc = np.take_along_axis(cand, order, 1)
    first = np.ones_like(sc, bool)
    first[:, 1:] = sc[:, 1:] != sc[:, :-1]
    group = np.cumsum(first.ravel()) - 1
    votes = np.bincount(group, weights=(order < k).ravel())[group].reshape(n, m)
    score = np.where(first, votes * (m + 1) + (m - order), -1)
    best = np.argsort(-score, axis=1, kind="stable")[:, :top]
    return np.where(np.take_along_axis(score, best, 1) >= 0, np.take_along_axis(sc, best, 1), -1)


def transfer_accuracy(
    embeddings: np.ndarray, labels: np.ndarray, *, support: int, seed: int = 0, k: int = 5
) -> dict[str, float]:
    """Classification of unseen classes from a few labelled images: per class, ``support`` images drawn at
    random (seeded, :func:`support_split`) are labelled, the rest are queries.

    - Nearest class mean (``ncm_top1``, ``ncm_top5``): classes ranked by the distance to the mean of their
      support embeddings. When every embedding is a unit vector (norms within 1e-3 of 1) the means are
      L2-normalised too (the class direction, as cosine retrieval would use it); otherwise raw means.
    - k-NN (``knn_top1``, ``knn_top5``): classes ranked by votes among the ``k`` nearest support images, a
      tie (and classes without a vote) by how near the class's nearest support image is (gallery row order on
      exact ties). The search is max(k, 5 x support) deep, so five classes always appear for top-5.
    - With fewer than 5 classes, top-5 is top-all (1.0).

    Returns the four accuracies and ``support``, ``queries``, ``classes``, ``k``."""
    x, y = _check_split(embeddings, labels, pairs=False)
    if int(support) != support or support < 1:
        raise ValueError(f"--support must be a positive integer, got {support}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    support, k = int(support), int(k)
    names, cls, counts = np.unique(y, return_inverse=True, return_counts=True)
    cls = cls.reshape(-1)
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
        raise ValueError(
            f"class {names[smallest].item()!r} has {counts[smallest]} image: transfer needs at least 2 per class "
            "(support + query)"
        )
    if counts[smallest] <= support:
        raise ValueError(
            f"--support {support} larger than a class: class {names[smallest].item()!r} has {counts[smallest]} images, "
            f"needs at least {support + 1} (support + 1 query)"
        )
    mask = support_split(y, support, seed)
    s_rows = np.flatnonzero(mask)
    s_rows = s_rows[np.argsort(cls[s_rows], kind="stable")]  # grouped by class, `support` each
    q_rows = np.flatnonzero(~mask)
    n_cls = len(counts)
    top = min(5, n_cls)

    means = x[s_rows].reshape(n_cls, support, -1).mean(1, dtype=np.float64)
    norms = np.concatenate([np.linalg.norm(x[s : s + 262144], axis=1) for s in range(0, len(x), 262144)])
    if np.all(np.abs(norms - 1) < 1e-3):
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    means = np.ascontiguousarray(means, dtype=np.float32)

    gallery = np.ascontiguousarray(x[s_rows])
    depth = min(len(s_rows), max(k, 5 * support))
    block = block_rows(depth)
    hits = np.zeros(4, np.int64)  # ncm top1, ncm top5, knn top1, knn top5
    faiss = _faiss()
    for s in range(0, len(q_rows), block):
        rows = q_rows[s : s + block]
        truth = cls[rows][:, None]
        q = np.ascontiguousarray(x[rows])
        _, ncm = faiss.knn(q, means, top)
        _, nn = faiss.knn(q, gallery, depth)
        knn = _rank_by_votes(cls[s_rows][nn], k, top)
        hits += [
            (ncm[:, :1] == truth).sum(),
            (ncm == truth).any(1).sum(),
            (knn[:, :1] == truth).sum(),
            (knn == truth).any(1).sum(),
        ]
    n_q = len(q_rows)
    return {
        "ncm_top1": hits[0] / n_q,
        "ncm_top5": hits[1] / n_q,
        "knn_top1": hits[2] / n_q,
        "knn_top5": hits[3] / n_q,
        "support": support,
        "queries": n_q,
        "classes": n_cls,
        "k": k,
    }
