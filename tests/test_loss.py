import pytest
import torch
import torch.nn.functional as F

from distpddm import PDDMLoss
from distpddm.miners import BatchHardestQuadrupletMiner, HardQuadrupletMiner, SemiHardQuadrupletMiner
from distpddm.pool import Pool
from distpddm.reducers import AvgNonZeroReducer
from distpddm.wrappers import CrossBatchMemory

ALL = HardQuadrupletMiner("all")


def _batch(n_classes=5, k=3, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_classes * k, dim, generator=g, dtype=dtype)
    y = torch.arange(n_classes).repeat_interleave(k)
    return x, y


def _reference_loss(crit, x, y):
    """E_m + lam * E_e, written out quadruplet by quadruplet from docs/method.md."""
    f = F.normalize(x, dim=1)
    q = crit.mine(f, y)
    e_ms, e_es = [], []
    for i, j, k, l in zip(q.i.tolist(), q.j.tolist(), q.k.tolist(), q.l.tolist(), strict=True):
        S = lambda a, b: crit.scorer(f[a][None], f[b][None])[0]  # noqa: E731
        D = lambda a, b: (f[a] - f[b]).norm() if crit.distance == "euclidean" else ((f[a] - f[b]) ** 2).sum()  # noqa: E731
        e_ms.append(F.relu(crit.alpha + S(i, k) - S(i, j)) + F.relu(crit.alpha + S(j, l) - S(i, j)))
        h = (lambda v: crit.soft * torch.log1p(torch.exp(v / crit.soft))) if crit.soft else F.relu  # noqa: E731
        e_es.append(h(crit.beta + D(i, j) - D(i, k)) + h(crit.beta + D(i, j) - D(j, l)))
    if isinstance(crit.reducer, AvgNonZeroReducer):  # each header over the quadruplets it is non-zero on
        m, e = (max(1, sum(float(v) > 0 for v in vs)) for vs in (e_ms, e_es))
        return sum(e_ms) / m + crit.lam * sum(e_es) / e
    return (sum(e_ms) + crit.lam * sum(e_es)) / len(q)


@pytest.mark.parametrize("metric", ["pddm", "euclidean", "mahalanobis"])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("mode", ["anchor", "batch"])
def test_loss_equals_written_out_formula(metric, distance, mode):
    torch.manual_seed(0)
    miner = BatchHardestQuadrupletMiner() if mode == "batch" else HardQuadrupletMiner("hardest")
    crit = PDDMLoss(8, metric=metric, distance=distance, miner=miner, metric_grad=True).double()
    x, y = _batch()
    loss, stats = crit(x, y)
    torch.testing.assert_close(loss, _reference_loss(crit, x, y), rtol=1e-10, atol=1e-10)
    assert int(stats["quadruplets"]) == (15 if mode == "anchor" else 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"miner": ALL},
        {"miner": HardQuadrupletMiner("hardest", negatives=3)},
        {"miner": HardQuadrupletMiner("all", 2), "soft": 0.1},
        {"soft": 0.05},
        {"reducer": AvgNonZeroReducer()},
        {"miner": HardQuadrupletMiner("all", 2), "reducer": AvgNonZeroReducer()},
        {"miner": SemiHardQuadrupletMiner("all")},
    ],
)
def test_several_quadruplets_per_anchor_and_the_soft_hinge_equal_the_written_out_formula(kwargs):
    torch.manual_seed(0)
    crit = PDDMLoss(8, alpha=0.1, beta=0.2, **kwargs).double()
    x, y = _batch()
    loss, stats = crit(x, y)
    torch.testing.assert_close(loss, _reference_loss(crit, x, y), rtol=1e-10, atol=1e-10)
    miner = crit.miner
    per_anchor = (2 if getattr(miner, "positives", "") == "all" else 1) * getattr(miner, "negatives", 1)  # 5 x 3
    assert int(stats["quadruplets"]) == 15 * per_anchor
    if isinstance(miner, SemiHardQuadrupletMiner):  # the reference mines through crit.mine too: check it took effect
        semi = crit.mine(x, y)
        crit.miner = ALL
        hard = crit.mine(x, y)
        assert not (torch.equal(semi.k, hard.k) and torch.equal(semi.l, hard.l))


def test_the_soft_hinge_keeps_pushing_once_the_margin_holds():
    """Far-apart classes satisfy every margin: the hard hinge gives no gradient, the soft one still does."""
    x = torch.tensor([[1.0, 0.02], [1.0, -0.02], [-1.0, 0.02], [-1.0, -0.02]], dtype=torch.float64)
    x.requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1])
    for soft, moves in ((0.0, False), (0.1, True)):
        crit = PDDMLoss(2, metric="euclidean", beta=0.2, lam=1.0, alpha=0.0, soft=soft).double()
        x.grad = None
        loss, stats = crit(x, y)
        loss.backward()
        assert float(stats["active_embedding"]) == 0.0  # margins hold either way
        assert bool((x.grad.abs() > 1e-8).any()) == moves


@pytest.mark.parametrize("metric", ["pddm", "mahalanobis"])
def test_gradcheck_through_the_loss(metric):
    torch.manual_seed(1)
    crit = PDDMLoss(5, metric=metric, alpha=0.5, beta=1.0, lam=0.5, metric_grad=True).double()
    x, y = _batch(n_classes=3, k=2, dim=5, seed=2)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: crit(e, y)[0], (x,))
    names = [n for n, _ in crit.named_parameters()]

    def of_params(*ps):
        return torch.func.functional_call(crit, dict(zip(names, ps, strict=True)), (x.detach(), y))[0]

    assert torch.autograd.gradcheck(of_params, tuple(p.detach().clone().requires_grad_() for p in crit.parameters()))


def test_parameters_reach_an_optimiser_and_change():
    torch.manual_seed(0)
    crit = PDDMLoss(8)
    x, y = _batch(dtype=torch.float32)
    x.requires_grad_()
    opt = torch.optim.SGD(list(crit.parameters()) + [x], lr=0.1)
    before = [p.detach().clone() for p in crit.parameters()]
    loss, _ = crit(x, y)
    loss.backward()
    assert all(p.grad is not None for p in crit.parameters())
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, crit.parameters(), strict=True))


def test_no_quadruplets_gives_zero_loss_that_still_backpropagates():
    crit = PDDMLoss(4)
    x = torch.randn(4, 4, requires_grad=True)
    loss, stats = crit(x, torch.zeros(4, dtype=torch.long))  # one class: no negatives
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(stats["quadruplets"]) == 0 and int(stats["skipped"]) == 4
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_stats_report_collapse_as_zero_spread():
    crit = PDDMLoss(4, metric="euclidean")
    same = torch.ones(8, 4)
    _, stats = crit(same, torch.arange(4).repeat_interleave(2))
    assert float(stats["spread"]) == pytest.approx(0.0, abs=1e-6)
    _, stats = crit(torch.randn(8, 4), torch.arange(4).repeat_interleave(2))
    assert float(stats["spread"]) > 0.3
    assert set(stats) >= {
        "quadruplets",
        "skipped",
        "active_metric",
        "active_embedding",
        "pos_score",
    }


def test_duplicated_embeddings_give_finite_gradients():
    crit = PDDMLoss(4)
    x = torch.randn(6, 4)
    x[1] = x[0]
    x.requires_grad_()
    loss, _ = crit(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "cosine"}, "metric"),
        ({"distance": "l1"}, "distance"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": float("nan")}, "beta"),
        ({"metric_grad": True, "metric_grad_after": 5}, "needs metric_grad=False"),
        ({"metric_grad": False, "metric_grad_after": -1}, "step >= 0"),
        ({"soft": -1.0}, "soft"),
        ({"soft": float("inf")}, "soft"),
        ({"miner": "hard"}, "QuadrupletMiner"),
        ({"reducer": "nonzero"}, "Reducer"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PDDMLoss(4, **kwargs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: HardQuadrupletMiner(chunk=0), "chunk"),
        (lambda: HardQuadrupletMiner("easiest"), "positives"),
        (lambda: HardQuadrupletMiner(negatives=0), "negatives"),
        (lambda: HardQuadrupletMiner(negatives=2.0), "negatives"),
        (lambda: HardQuadrupletMiner(negatives=4, candidates=3), "candidates must be >= negatives"),
        (lambda: CrossBatchMemory(PDDMLoss(4), -1), "memory size"),
        (lambda: CrossBatchMemory(PDDMLoss(4), 8, warmup=-1), "memory warmup"),
    ],
)
def test_each_part_names_its_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_is_named():
    crit = PDDMLoss(4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        crit(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        crit(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


def test_metric_grad_false_trains_the_metric_but_not_the_embedding_through_it():
    torch.manual_seed(0)
    x, y = _batch(dtype=torch.float32)
    x.requires_grad_()
    # With lam = 0 only E_m remains: the embedding must get no gradient, the PDDM unit must.
    crit = PDDMLoss(8, lam=0.0, metric_grad=False)
    loss, _ = crit(x, y)
    loss.backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    assert torch.count_nonzero(crit.pddm.wu.weight.grad) > 0
    x.grad = None
    joint = PDDMLoss(8, lam=0.0, metric_grad=True)
    joint.load_state_dict(crit.state_dict())
    loss2, _ = joint(x, y)
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    assert torch.count_nonzero(x.grad) > 0


def _embedding_grad(crit, x, y, step):
    x = x.clone().requires_grad_()
    crit.set_step(step)
    loss, _ = crit(x, y)
    loss.backward()
    return x.grad


def test_metric_grad_after_switches_the_metric_head_into_the_embedding_after_that_step():
    """Through step s the embedding's gradient is metric_grad=False's, from s + 1 on metric_grad=True's."""
    torch.manual_seed(0)
    x, y = _batch()
    sched = PDDMLoss(8, metric_grad=False, metric_grad_after=2).double()
    off, on = PDDMLoss(8, metric_grad=False).double(), PDDMLoss(8, metric_grad=True).double()
    off.load_state_dict(sched.state_dict())
    on.load_state_dict(sched.state_dict())
    g_off, g_on = _embedding_grad(off, x, y, 1), _embedding_grad(on, x, y, 1)
    assert not torch.allclose(g_off, g_on)
    for step, want in ((1, g_off), (2, g_off), (3, g_on), (50, g_on)):
        torch.testing.assert_close(_embedding_grad(sched, x, y, step), want, msg=f"step {step}")
    counted = PDDMLoss(8, metric_grad=False, metric_grad_after=1)  # without set_step, calls are counted
    seen = []
    for _ in range(3):
        seen.append(counted.metric_grad_now())
        counted(x.float(), y)
    assert seen == [False, True, True]


def _plain_loss(loss, features, labels, count):
    """``loss`` on the pool ``features`` (no memory), the first ``count`` rows its anchors."""
    pool = Pool(features, labels, 0, count)
    return loss.reducer(loss.terms(pool), pool)


def test_cross_batch_memory_is_a_fifo_of_detached_pooled_embeddings_with_their_labels():
    x1, y1 = _batch(seed=1)
    x2, y2 = _batch(seed=2)
    y2 = y2 + 10  # new classes, so memory rows are told apart by label
    inner = PDDMLoss(8).double()
    crit = CrossBatchMemory(inner, 20, warmup=1)
    pools = []
    real_miner = inner.miner
    inner.miner = lambda scorer, pool: (
        pools.append((pool.features.shape[0], pool.labels.clone())) or real_miner(scorer, pool)
    )
    x1.requires_grad_()
    crit(x1, y1)  # step 1: warm-up, mined against the batch alone; then enqueued
    assert pools[-1][0] == 15
    torch.testing.assert_close(crit.features, x1.detach())
    assert not crit.features.requires_grad and torch.equal(crit.labels, y1)
    x2.requires_grad_()
    loss, _ = crit(x2, y2)  # step 2: batch + the 15 remembered rows, after the batch's own rows
    assert pools[-1][0] == 30 and torch.equal(pools[-1][1], torch.cat([y2, y1]))
    # The same loss as one call on the pool [batch; memory] with the memory as constants: gradient to x2 only.
    plain = PDDMLoss(8).double()
    plain.load_state_dict(inner.state_dict())
    ref = _plain_loss(plain, torch.cat([x2, x1.detach()]), torch.cat([y2, y1]), 15)
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss, x2)
    (g_ref,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(g, g_ref)
    assert x1.grad is None  # nothing flows into the remembered batch
    # FIFO: 20 rows kept, the oldest 10 dropped, in order.
    torch.testing.assert_close(crit.features, torch.cat([x1.detach(), x2.detach()])[-20:])
    assert torch.equal(crit.labels, torch.cat([y1, y2])[-20:])
    assert not any("features" in k for k in crit.state_dict())  # not checkpointed: refills after a resume


def test_memory_gives_anchors_positives_from_earlier_batches():
    """With one image per class in the batch no anchor has a positive; the memory supplies them."""
    x, y = _batch(n_classes=6, k=1, seed=3)
    crit = CrossBatchMemory(PDDMLoss(8).double(), 12)
    _, first = crit(x, y)
    _, second = crit(_batch(n_classes=6, k=1, seed=4)[0], y)
    assert int(first["quadruplets"]) == 0 and int(second["quadruplets"]) == 6


def test_memory_with_every_positive_and_several_negatives():
    """positives all x 2 negatives with a memory: remembered rows serve as positives and negatives, each memory
    positive counts once (only the batch holds anchors), and the loss is the plain loss on [batch; memory]."""
    opts = {"miner": HardQuadrupletMiner("all", 2), "alpha": 0.1, "beta": 0.1}
    crit = CrossBatchMemory(PDDMLoss(8, **opts).double(), 12)
    y = _batch(n_classes=6, k=1, seed=3)[1]
    old = [F.normalize(_batch(n_classes=6, k=1, seed=s)[0], dim=1) for s in (5, 6)]
    for x_old in old:
        crit(x_old, y)
    x = _batch(n_classes=6, k=1, seed=7)[0].requires_grad_()
    loss, stats = crit(x, y)
    assert int(stats["quadruplets"]) == 6 * 2 * 2  # 6 anchors x 2 remembered positives x 2 negatives
    plain = PDDMLoss(8, **opts).double()
    plain.load_state_dict(crit.loss.state_dict())
    ref = _plain_loss(plain, torch.cat([x, *(o.detach() for o in old)]), torch.cat([y, y, y]), 6)
    torch.testing.assert_close(loss, ref)


def test_nonzero_reduction_averages_over_the_quadruplets_still_pushing():
    """Where some margins hold, "nonzero" is larger than "mean" by the share of zero terms, header by header;
    where none holds the two agree."""
    noise, y = _batch(n_classes=6, k=4)
    centres = _batch(n_classes=6, k=1, seed=9)[0]
    x = centres[y] + 0.6 * noise  # loose clusters: some quadruplets meet both margins, some do not
    mean = PDDMLoss(8, metric="euclidean", alpha=0.0, beta=0.2, lam=1.0).double()
    nonzero = PDDMLoss(8, metric="euclidean", alpha=0.0, beta=0.2, lam=1.0, reducer=AvgNonZeroReducer()).double()
    loss_mean, stats = mean(x, y)
    loss_nonzero, _ = nonzero(x, y)
    assert 0 < float(stats["active_embedding"]) < 1  # share of E_e's hinge terms violated: some, not all
    assert float(loss_nonzero) > float(loss_mean) > 0
    torch.testing.assert_close(loss_nonzero, _reference_loss(nonzero, x, y), rtol=1e-10, atol=1e-10)
    wide = PDDMLoss(8, metric="euclidean", alpha=5.0, beta=5.0, lam=1.0, reducer=AvgNonZeroReducer()).double()
    same = PDDMLoss(8, metric="euclidean", alpha=5.0, beta=5.0, lam=1.0).double()
    torch.testing.assert_close(wide(x, y)[0], same(x, y)[0])  # margins of 5: every one violated
