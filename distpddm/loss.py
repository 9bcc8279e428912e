"""PDDMLoss: the method's double-header hinge loss on mined quadruplets (``docs/method.md``).

It holds what the paper defines -- the metric (a PDDM unit, or a Euclidean / Mahalanobis baseline), the margins
``alpha`` and ``beta``, the weight ``lam`` and the embedding distance -- and takes its mining policy and its
reduction as parts (:mod:`.miners`, :mod:`.reducers`). Used as a pytorch-metric-learning loss is::

    criterion = PDDMLoss(128)                           # the measured defaults (docs/results.md)
    loss, stats = criterion(embeddings, labels)        # one process: this batch is the pool
    loss, stats = CrossDevice(criterion)(embeddings, labels)  # N workers: the gathered batch is

Its own parameters (the PDDM unit, or the Mahalanobis matrix) belong in the optimiser with the network's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import Euclidean, Mahalanobis
from .miners import HardQuadrupletMiner, QuadrupletMiner, Quadruplets
from .pddm import PDDM
from .pool import Pool, PoolLoss, Terms, spread
from .reducers import MeanReducer, Reducer

METRICS = ("pddm", "euclidean", "mahalanobis")
DISTANCES = ("euclidean", "squared")
#: the paper's margins, weight and end-to-end gradient (with ``HardQuadrupletMiner("hardest")``): the defaults
#: before the protocol chose on validation classes, and the pretrained configs' setting
PAPER_SETTING = {"alpha": 0.5, "beta": 1.0, "lam": 0.5, "metric_grad": True}


def _mean(x: Tensor) -> Tensor:
    return x.detach().float().mean() if x.numel() else x.new_zeros((), dtype=torch.float32)


class PDDMLoss(PoolLoss):
    """``E_m + lam * E_e`` over the quadruplets ``miner`` picks for the pool's anchors, reduced by ``reducer``.

    ``E_m = [alpha + S_ik - S_ij]_+ + [alpha + S_jl - S_ij]_+`` trains the metric (``metric``), which also
    mines; ``E_e`` is the same hinge on embedding distances with margin ``beta`` (``distance="euclidean"``:
    ``||f_i - f_j||``; ``"squared"``: the paper's squared distance, whose gradient vanishes as embeddings
    collapse, ``docs/collapse.md``). ``soft=t`` makes E_e's hinge the smooth ``t log(1 + exp(x / t))``.
    ``metric_grad=False`` stops E_m's gradient at the embeddings (the metric head then trains the metric
    only); ``metric_grad_after=s`` turns it on after step ``s``. Steps are counted by calls, or set by the
    trainer (:meth:`set_step`). Defaults: the setting chosen on validation classes from scratch (alpha .25, beta .5,
    every positive, metric_grad off; docs/results.md), :class:`MeanReducer`; the paper's is ``alpha=0.5, beta=1.0,
    metric_grad=True, miner=HardQuadrupletMiner("hardest")``.
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "pddm",
        alpha: float = 0.25,
        beta: float = 0.5,
        lam: float = 0.5,
        distance: str = "euclidean",
        hidden: int | None = None,
        metric_grad: bool = False,
        metric_grad_after: int | None = None,
        soft: float = 0.0,
        miner: QuadrupletMiner | None = None,
        reducer: Reducer | None = None,
    ):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("lam", lam)):
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if not 0 <= soft < float("inf"):
            raise ValueError(f"soft must be finite and >= 0 (0: the hard hinge), got {soft}")
        if metric_grad_after is not None and (metric_grad or metric_grad_after < 0):
            raise ValueError(
                f"metric_grad_after={metric_grad_after} switches metric_grad on after that step: it needs "
                "metric_grad=False and a step >= 0"
            )
        if miner is not None and not isinstance(miner, QuadrupletMiner):
            raise ValueError(f"PDDMLoss mines quadruplets: miner must be a QuadrupletMiner, got {type(miner).__name__}")
        if reducer is not None and not isinstance(reducer, Reducer):
            raise ValueError(f"reducer must be a distpddm Reducer, got {type(reducer).__name__}")
        self.dim, self.metric, self.distance = dim, metric, distance
        self.alpha, self.beta, self.lam, self.soft = alpha, beta, lam, soft
        self.metric_grad, self.metric_grad_after = metric_grad, metric_grad_after
        self.miner = miner if miner is not None else HardQuadrupletMiner()
        self.reducer = reducer if reducer is not None else MeanReducer()
        self.step = 1  # the step of the next call (1-based)
        if metric == "pddm":
            self.pddm = PDDM(dim, hidden)
        elif metric == "mahalanobis":
            self.mahalanobis = Mahalanobis(dim)
        else:
            self.euclidean = Euclidean()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, metric={self.metric!r}, distance={self.distance!r}, alpha={self.alpha}, "
            f"beta={self.beta}, lam={self.lam}, miner={self.miner!r}, reducer={self.reducer!r}"
            + (f", soft={self.soft}" if self.soft else "") + ("" if self.metric_grad else ", metric_grad=False")
        )  # fmt: skip

    @property
    def scorer(self) -> nn.Module:
        """The module scoring pairs: ``scorer(a, b)`` aligned, ``scorer.pairwise(rows, pool)``."""
        return getattr(self, self.metric)

    def set_step(self, step: int) -> None:
        """The training step of the next call (1-based), which ``metric_grad_after`` counts."""
        self.step = int(step)

    def metric_grad_now(self) -> bool:
        """Whether E_m's gradient reaches the embedding at the current step."""
        return self.metric_grad or (self.metric_grad_after is not None and self.step > self.metric_grad_after)

    def mine(self, features: Tensor, labels: Tensor) -> Quadruplets:
        """The quadruplets this loss would train on for ``features`` as one pool (no gradient)."""
        return self.miner(self.scorer, Pool(F.normalize(features.detach(), dim=1), labels.reshape(-1)))

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        sq = (a - b).pow(2).sum(-1)
        if self.distance == "squared":
            return sq
        return sq.clamp_min(1e-12).sqrt()  # identical embeddings: a zero gradient, not sqrt's infinite one

    def _hinge(self, x: Tensor) -> Tensor:
        return F.relu(x) if self.soft == 0 else self.soft * F.softplus(x / self.soft)

    def terms(self, pool: Pool) -> Terms:
        """Per quadruplet of the pool's anchors: E_m and E_e (with gradient), and the stats of the call."""
        if pool.features.shape[1] != self.dim:
            raise ValueError(f"PDDMLoss expects embeddings of dimension {self.dim}, got {pool.features.shape[1]}")
        feats = F.normalize(pool.features, dim=1)
        pool = Pool(feats, pool.labels, pool.offset, pool.count, pool.world, pool.group)
        q = self.miner(self.scorer, pool)
        n = len(q)
        # The three pairs of every quadruplet, (i, j), (i, k), (j, l), scored in one call, with gradient.
        left, right = feats[torch.cat([q.i, q.i, q.j])], feats[torch.cat([q.j, q.k, q.l])]
        if self.metric_grad_now():
            s = self.scorer(left, right).reshape(3, n)
        else:  # E_m trains the metric only; the embedding learns from E_e
            s = self.scorer(left.detach(), right.detach()).reshape(3, n)
        d = self._distance(left, right).reshape(3, n)
        hinge_m = F.relu(self.alpha + s[1:] - s[0])  # (2, n)
        margin_e = self.beta + d[0] - d[1:]  # (2, n); > 0: the margin is violated
        e_m, e_e = hinge_m.sum(0), self._hinge(margin_e).sum(0)
        self.step += 1
        with torch.no_grad():
            stats = {
                "quadruplets": torch.tensor(float(n), device=feats.device),  # on this worker
                "skipped": q.skipped.float(),  # anchors with no positive or no negative in the pool
                "active_metric": _mean((hinge_m > 0).float()),  # fraction of E_m hinges above zero
                "active_embedding": _mean((margin_e > 0).float()),
                "metric_loss": _mean(e_m),
                "embedding_loss": _mean(e_e),
                "pos_score": _mean(s[0]),  # mean S_ij of the mined positive pairs
                "neg_score": _mean(s[1:]),  # mean S_ik, S_jl of the mined negatives
                "spread": spread(feats[pool.anchors]),  # ~0: the embedding has collapsed
            }
        return Terms(
            losses={"metric": e_m, "embedding": e_e},
            weights={"metric": 1.0, "embedding": self.lam},
            kinds={"metric": "quadruplet", "embedding": "quadruplet"},
            stats=stats,
        )
