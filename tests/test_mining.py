import pytest
import torch

from distpddm import PDDM, Euclidean, Mahalanobis
from distpddm.miners import BatchHardestQuadrupletMiner, HardQuadrupletMiner, SemiHardQuadrupletMiner
from distpddm.pool import Pool
from tests.reference import brute_force_mine, naive_pddm_matrix

METRICS = ["pddm", "euclidean", "mahalanobis"]


def mine_quadruplets(
    scorer,
    pool,
    labels,
    offset=0,
    count=None,
    mode="anchor",
    *,
    positives="hardest",
    negatives=1,
    candidates=None,
    semihard=False,
    chunk=None,
):
    """The miner each policy names, on ``pool[offset : offset + count]`` against the pool."""
    if semihard:
        miner = SemiHardQuadrupletMiner(positives, chunk=chunk)
    elif mode == "batch":
        miner = BatchHardestQuadrupletMiner(candidates, chunk=chunk)
    else:
        miner = HardQuadrupletMiner(positives, negatives, candidates, chunk=chunk)
    return miner(scorer, Pool(pool, labels, offset, count))


def _scorer(metric, dim, seed=0):
    torch.manual_seed(seed)
    if metric == "pddm":
        return PDDM(dim, 5).double()
    if metric == "mahalanobis":
        m = Mahalanobis(dim).double()
        with torch.no_grad():
            m.L.copy_(torch.randn(dim, dim, dtype=torch.float64))
        return m
    return Euclidean()


def _reference_scores(scorer, pool):
    if isinstance(scorer, PDDM):
        return naive_pddm_matrix(scorer, pool, pool)
    L = scorer.L.detach() if isinstance(scorer, Mahalanobis) else torch.eye(pool.shape[1], dtype=pool.dtype)
    n = len(pool)
    return torch.tensor([[-float(((L @ (pool[a] - pool[b])) ** 2).sum()) for b in range(n)] for a in range(n)])


def _pool(labels, dim=6, seed=1, duplicates=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(len(labels), dim, generator=g, dtype=torch.float64), dim=1)
    for src, dst in duplicates:
        x[dst] = x[src]
    return x, torch.tensor(labels)


def _check(scorer, pool, labels, offset, count, mode, exact=True):
    got = mine_quadruplets(scorer, pool, labels, offset, count, mode)
    S = _reference_scores(scorer, pool)
    ref, skipped = brute_force_mine(S, labels, offset, count, mode)
    assert int(got.skipped) == skipped
    assert len(got) == len(ref)
    quads = list(zip(got.i.tolist(), got.j.tolist(), got.k.tolist(), got.l.tolist(), strict=True))
    for (i, j, k, l), (ri, rj, rk, rl) in zip(quads, ref, strict=True):
        assert i == ri
        assert labels[j] == labels[i] and j != i and labels[k] != labels[i] and labels[l] != labels[j]
        if exact:
            assert (j, k, l) == (rj, rk, rl)
        else:  # ties (duplicated embeddings): any index with the extreme score is right
            assert S[i, j] == pytest.approx(float(S[ri, rj]), abs=1e-9)
            assert S[i, k] == pytest.approx(float(S[ri, rk]), abs=1e-9)
            assert S[j, l] == pytest.approx(float(S[rj, rl]), abs=1e-9)
    return got


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["anchor", "batch"])
def test_matches_brute_force_on_random_batches(metric, mode):
    scorer = _scorer(metric, 6)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4]
    for seed in range(3):
        pool, y = _pool(labels, seed=seed)
        got = _check(scorer, pool, y, 0, len(labels), mode)
        assert len(got) == (len(labels) if mode == "anchor" else 1)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["anchor", "batch"])
def test_anchors_at_an_offset_in_the_pool(metric, mode):
    """A worker's block in the middle of the global pool; positives may live on other workers."""
    scorer = _scorer(metric, 6)
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 4, 4, 0, 1, 2, 3, 4, 5]
    pool, y = _pool(labels, seed=4)
    _check(scorer, pool, y, offset=4, count=6, mode=mode)
    _check(scorer, pool, y, offset=12, count=4, mode=mode)


@pytest.mark.parametrize("metric", METRICS)
def test_single_sample_class_is_skipped_and_counted(metric):
    scorer = _scorer(metric, 6)
    labels = [0, 0, 1, 2, 2, 3]  # classes 1 and 3 have one sample each
    pool, y = _pool(labels, seed=5)
    got = _check(scorer, pool, y, 0, len(labels), "anchor")
    assert int(got.skipped) == 2 and len(got) == 4
    assert set(got.i.tolist()) == {0, 1, 3, 4}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["anchor", "batch"])
def test_batch_of_one_class_has_no_negatives(metric, mode):
    scorer = _scorer(metric, 6)
    pool, y = _pool([7] * 5, seed=6)
    got = mine_quadruplets(scorer, pool, y, mode=mode)
    assert len(got) == 0 and int(got.skipped) == 5


@pytest.mark.parametrize("metric", METRICS)
def test_duplicated_embeddings(metric):
    scorer = _scorer(metric, 6)
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    pool, y = _pool(labels, seed=7, duplicates=[(0, 1), (0, 3), (6, 7)])
    got = _check(scorer, pool, y, 0, len(labels), "anchor", exact=False)
    assert (got.i != got.j).all()  # a duplicate of itself is fine, itself is not


def test_never_pairs_a_sample_with_itself_when_it_is_most_similar():
    # Euclidean: every sample is closest to itself (distance 0); the miner must still pick another.
    pool, y = _pool([0, 0, 1, 1], seed=8)
    got = mine_quadruplets(Euclidean(), pool, y)
    assert (got.i != got.j).all()
    assert got.j.tolist() == [1, 0, 3, 2]


def test_bad_arguments_are_named():
    pool, y = _pool([0, 0, 1, 1], seed=9)
    with pytest.raises(ValueError, match="block"):
        mine_quadruplets(Euclidean(), pool, y, offset=3, count=2)
    with pytest.raises(ValueError, match="labels"):
        mine_quadruplets(Euclidean(), pool, y[:3])
    with pytest.raises(ValueError, match="chunk"):
        HardQuadrupletMiner(chunk=0)


def test_mining_builds_no_graph():
    unit = PDDM(6)
    pool = torch.randn(8, 6, requires_grad=True)
    got = mine_quadruplets(unit, pool, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert not got.score.requires_grad


@pytest.mark.parametrize("metric", METRICS)
def test_candidates_covering_every_negative_is_exact(metric):
    scorer = _scorer(metric, 6)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4]
    pool, y = _pool(labels, seed=11)
    exact = mine_quadruplets(scorer, pool, y, 2, 9)
    approx = mine_quadruplets(scorer, pool, y, 2, 9, candidates=len(labels))
    for a, b in zip((exact.i, exact.j, exact.k, exact.l), (approx.i, approx.j, approx.k, approx.l), strict=True):
        assert torch.equal(a, b)


def test_candidates_are_the_nearest_negatives_by_dot_product():
    # A scorer that disagrees with the dot product: with one candidate the miner must keep the dot-nearest.
    pool, y = _pool([0, 0, 1, 1, 2, 2], seed=12)
    far = Euclidean()
    dots = pool @ pool.T
    got = mine_quadruplets(far, pool, y, candidates=1)
    for i, k in zip(got.i.tolist(), got.k.tolist(), strict=True):
        negs = [q for q in range(6) if y[q] != y[i]]
        assert k == max(negs, key=lambda q: float(dots[i, q]))
    exact = mine_quadruplets(far, pool, y)
    assert torch.equal(got.j, exact.j)  # positives are always all scored
    with pytest.raises(ValueError, match="candidates"):
        mine_quadruplets(far, pool, y, candidates=0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("positives", ["hardest", "all"])
@pytest.mark.parametrize("negatives", [1, 3])
def test_several_quadruplets_per_anchor_match_brute_force(metric, positives, negatives):
    """Every (anchor, positive) pair of the block, each with the n hardest negatives of i and of j, ranked."""
    scorer = _scorer(metric, 6)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4]  # class 3 has no positive: skipped as an anchor
    pool, y = _pool(labels, seed=3)
    offset, count = 2, 7  # a block in the middle: some j's lie outside it
    got = mine_quadruplets(scorer, pool, y, offset, count, positives=positives, negatives=negatives)
    S = _reference_scores(scorer, pool)
    want = []
    for i in range(offset, offset + count):
        pos = [j for j in range(len(y)) if y[j] == y[i] and j != i]
        neg = [k for k in range(len(y)) if y[k] != y[i]]
        if not pos:
            continue
        if positives == "hardest":
            pos = [min(pos, key=lambda j: float(S[i, j]))]
        for j in pos:
            ks = sorted(neg, key=lambda k: -float(S[i, k]))[:negatives]
            ls = sorted(neg, key=lambda k: -float(S[j, k]))[:negatives]
            want += [(i, j, k, l) for k, l in zip(ks, ls, strict=True)]
    quads = list(zip(got.i.tolist(), got.j.tolist(), got.k.tolist(), got.l.tolist(), strict=True))
    assert sorted(quads) == sorted(want)
    assert int(got.skipped) == 1
    assert torch.allclose(got.score, S[got.i, got.j].to(got.score))


def test_more_negatives_than_exist_keep_the_ones_there_are():
    pool, y = _pool([0, 0, 1], seed=4)
    got = mine_quadruplets(Euclidean(), pool, y, positives="all", negatives=5)
    # anchors 0 and 1 each have one positive and one negative: one quadruplet each; anchor 2 is skipped
    assert sorted(zip(got.i.tolist(), got.j.tolist(), got.k.tolist(), got.l.tolist(), strict=True)) == [
        (0, 1, 2, 2),
        (1, 0, 2, 2),
    ]


def test_bad_counts_are_refused():
    pool, y = _pool([0, 0, 1, 1])
    with pytest.raises(TypeError):  # the batch miner has one quadruplet per batch: no counts to set
        BatchHardestQuadrupletMiner(negatives=2)
    with pytest.raises(ValueError, match="positives"):
        SemiHardQuadrupletMiner("easiest")
    with pytest.raises(ValueError, match="positives"):
        mine_quadruplets(Euclidean(), pool, y, positives="easiest")
    with pytest.raises(ValueError, match="negatives"):
        mine_quadruplets(Euclidean(), pool, y, negatives=0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("candidates", [3, 14])
def test_candidates_with_several_quadruplets_per_anchor(metric, candidates):
    """Every positive x 2 negatives under ``candidates``: each sample's negatives come from its own ``c``
    dot-nearest ones (all of them when c covers the pool: then it is the exact miner)."""
    scorer = _scorer(metric, 6)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4]
    pool, y = _pool(labels, seed=21)
    offset, count = 2, 9
    got = mine_quadruplets(scorer, pool, y, offset, count, candidates=candidates, positives="all", negatives=2)
    S, dots = _reference_scores(scorer, pool), pool @ pool.T

    def hardest(a):  # the 2 best-scored among a's `candidates` dot-nearest negatives
        near = sorted((q for q in range(len(y)) if y[q] != y[a]), key=lambda q: -float(dots[a, q]))[:candidates]
        return sorted(near, key=lambda q: -float(S[a, q]))[:2]

    want = [
        (i, j, k, l)
        for i in range(offset, offset + count)
        for j in range(len(y))
        if y[j] == y[i] and j != i
        for k, l in zip(hardest(i), hardest(j), strict=True)
    ]
    quads = list(zip(got.i.tolist(), got.j.tolist(), got.k.tolist(), got.l.tolist(), strict=True))
    assert sorted(quads) == sorted(want)
    if candidates >= len(labels):
        exact = mine_quadruplets(scorer, pool, y, offset, count, positives="all", negatives=2)
        cols = (exact.i.tolist(), exact.j.tolist(), exact.k.tolist(), exact.l.tolist())
        assert sorted(quads) == sorted(zip(*cols, strict=True))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("positives", ["hardest", "all"])
def test_semihard_negatives_match_brute_force(metric, positives):
    """Per pair, i's and j's best-scored negative strictly below S_ij, else the least similar negative; j's
    outside the block too. Sample 3 (class 1) duplicates sample 2 (class 0): a negative tied with a positive."""
    scorer = _scorer(metric, 6)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 0, 2]
    pool, y = _pool(labels, seed=7, duplicates=[(2, 3)])
    offset, count = 2, 7
    got = mine_quadruplets(scorer, pool, y, offset, count, positives=positives, semihard=True)
    S = _reference_scores(scorer, pool)
    seen = {"semi-hard": 0, "fallback": 0, "tie": 0}

    def semihard(a, s_ij):
        neg = [q for q in range(len(y)) if y[q] != y[a]]
        below = [q for q in neg if float(S[a, q]) < s_ij]
        hardest = max(neg, key=lambda q: float(S[a, q]))
        pick = max(below, key=lambda q: float(S[a, q])) if below else min(neg, key=lambda q: float(S[a, q]))
        seen["tie"] += any(float(S[a, q]) == s_ij for q in neg)
        if not below:
            seen["fallback"] += 1
        elif pick != hardest:
            seen["semi-hard"] += 1
        return pick

    want = []
    for i in range(offset, offset + count):
        pos = [j for j in range(len(y)) if y[j] == y[i] and j != i]
        if not pos:
            continue
        for j in [min(pos, key=lambda j: float(S[i, j]))] if positives == "hardest" else pos:
            want.append((i, j, semihard(i, float(S[i, j])), semihard(j, float(S[i, j]))))
    quads = list(zip(got.i.tolist(), got.j.tolist(), got.k.tolist(), got.l.tolist(), strict=True))
    assert sorted(quads) == sorted(want)
    # the case is a case: picks that are not the hardest, pairs with no negative below (the fallback), and
    # (every positive) a negative scored exactly S_ij, which must not count as below
    assert seen["semi-hard"] > 0 and seen["fallback"] > 0 and (seen["tie"] > 0 or positives == "hardest"), seen
    assert int(got.skipped) == 1
    with pytest.raises(TypeError):  # one negative of i and of j per pair, every negative scored: no such options
        SemiHardQuadrupletMiner(positives, negatives=2)
    with pytest.raises(TypeError):
        SemiHardQuadrupletMiner(positives, candidates=4)
