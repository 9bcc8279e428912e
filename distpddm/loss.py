"""PDDMLoss: gather with gradient, mine hard quadruplets, double-header hinge loss.

Drop it into any loop the way a pytorch-metric-learning loss is used::

    criterion = PDDMLoss(dim=128)
    loss, stats = criterion(embeddings, labels)

Its own parameters (the PDDM unit, or the Mahalanobis matrix) belong in the optimiser with the network's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DISTANCES, METRICS, REDUCTIONS
from .gather import GlobalBatch, all_gather_no_grad, all_reduce_sum, gather_batch, rank_and_world
from .metrics import Euclidean, Mahalanobis
from .mining import MODES, Quadruplets, check_quadruplets_per_anchor, mine_quadruplets
from .pddm import PDDM


@dataclass(frozen=True)
class LossStats:
    """What one call saw on this worker. Tensors (no gradient), so logging decides when to sync."""

    quadruplets: Tensor  # quadruplets on this worker
    skipped: Tensor  # anchors of this worker with no positive or no negative in the global pool
    active_metric: Tensor  # fraction of metric-head hinges (E_m) above zero
    active_embedding: Tensor  # fraction of embedding-head hinges (E_e) above zero
    metric_loss: Tensor  # mean E_m over this worker's quadruplets
    embedding_loss: Tensor  # mean E_e over this worker's quadruplets
    pos_score: Tensor  # mean S_ij of mined positive pairs
    neg_score: Tensor  # mean of S_ik and S_jl of mined negative pairs
    spread: Tensor  # mean distance of this worker's normalised embeddings to their centroid; ~0 = collapse

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _mean(x: Tensor) -> Tensor:
    return x.detach().float().mean() if x.numel() else x.new_zeros((), dtype=torch.float32)


class PDDMLoss(nn.Module):
    """Double-header hinge loss on quadruplets mined for this worker's anchors against the global batch.

    ``E_m = [alpha + S_ik - S_ij]_+ + [alpha + S_jl - S_ij]_+`` trains the metric (``metric``: ``"pddm"``,
    ``"euclidean"`` or ``"mahalanobis"``; the same similarity mines). ``E_e`` is the same hinge on embedding
    distances with margin ``beta``; the loss is ``E_m + lam * E_e`` averaged over quadruplets.

    ``distance="euclidean"`` (default) uses ``||f_i - f_j||``; ``"squared"`` the paper's squared distance,
    whose gradient vanishes as embeddings collapse onto one point (see ``docs/collapse.md``).
    ``candidates=c`` mines approximately and cheaper: the metric scores all positives but only the ``c``
    negatives nearest by dot product (``None``: every pair, exact). ``chunk`` bounds pairs scored at once.
    ``metric_grad=False`` stops E_m's gradient at the embeddings: the metric head then trains the metric only.
    ``metric_grad_after=s`` (with ``metric_grad=False``) turns it on after step ``s``: the metric head leaves
    the embedding alone while it is contracted and untrained, and trains it jointly afterwards.

    ``memory=m`` keeps a cross-batch memory (Wang et al., CVPR 2020): a FIFO of the last ``m`` gathered,
    detached embeddings and their labels, mined against (positives and negatives) beside the global batch
    after ``memory_warmup`` steps; the loss's gradient reaches only the current batch. Every worker holds the
    same memory (it enqueues the gathered batch). The memory is not checkpointed: after a resume it refills.
    Steps are counted by calls, or set by the trainer with :meth:`set_step`.

    ``positives="all"`` / ``negatives=n`` mine more than one quadruplet per anchor (every positive of it,
    each with the ``n`` hardest negatives of ``i`` and of ``j``; see :func:`~distpddm.mining.mine_quadruplets`);
    the mean is then over all of them. With ``"all"`` a pair of two anchors comes twice, as ``(i, j, k, l)``
    and ``(j, i, l, k)``, equal terms for a symmetric metric: every in-batch pair has the same weight (twice
    the work, not a bias), but memory rows, never anchors, count once. ``semihard=True`` takes, for each
    positive pair, the negatives of i and j that the metric scores highest *below* ``S_ij`` (else the least
    similar; exact scoring only). ``soft=t`` replaces the embedding head's hinge by the smooth
    ``t log(1 + exp(x / t))`` (0: the hard hinge of the paper).

    ``reduction="nonzero"`` averages each header over the quadruplets where it is non-zero (as
    pytorch-metric-learning's ``AvgNonZeroReducer`` does for its triplet loss) instead of over every
    quadruplet: the gradient does not fade as more margins hold. Counted over the global batch. With
    ``soft > 0`` the embedding header is never zero, so it is then averaged over every quadruplet.

    Across N workers the returned loss is ``N * sum(local E) / (global count)``, so that the average the
    data-parallel engine takes over workers equals the mean over every quadruplet of the global batch, even
    when workers mined different numbers; with one worker it is the plain mean. In ``mode="batch"`` the
    single hardest quadruplet of the global batch is kept, on the worker that owns its anchor.
    """

    def __init__(
        self,
        dim: int,
        *,
        mode: str = "anchor",
        metric: str = "pddm",
        alpha: float = 0.5,
        beta: float = 1.0,
        lam: float = 0.5,
        chunk: int | None = None,
        candidates: int | None = None,
        hidden: int | None = None,
        distance: str = "euclidean",
        metric_grad: bool = True,
        metric_grad_after: int | None = None,
        memory: int = 0,
        memory_warmup: int = 0,
        positives: str = "hardest",
        negatives: int = 1,
        semihard: bool = False,
        soft: float = 0.0,
        reduction: str = "mean",
        group=None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("lam", lam)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if candidates is not None and candidates < 1:
            raise ValueError(f"candidates must be >= 1 or None, got {candidates}")
        if metric_grad_after is not None and (metric_grad or metric_grad_after < 0):
            raise ValueError(
                f"metric_grad_after={metric_grad_after} switches metric_grad on after that step: it needs "
                "metric_grad=False and a step >= 0"
            )
        check_quadruplets_per_anchor(mode, positives, negatives, semihard, candidates)
        if not 0 <= soft < float("inf"):
            raise ValueError(f"soft must be finite and >= 0 (0: the hard hinge), got {soft}")
        if candidates is not None and candidates < negatives:
            raise ValueError(f"negatives={negatives} needs candidates >= {negatives} (or None), got {candidates}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.positives, self.negatives, self.soft, self.reduction = positives, negatives, soft, reduction
        self.semihard = bool(semihard)
        if memory < 0 or memory_warmup < 0:
            raise ValueError(f"memory and memory_warmup must be >= 0, got {memory} and {memory_warmup}")
        self.metric_grad_after, self.memory, self.memory_warmup = metric_grad_after, memory, memory_warmup
        self.step = 1  # the step of the next call (1-based), advanced by every call or set by set_step
        self.memory_features: Tensor | None = None  # the FIFO, oldest first (no gradient; not in the state dict)
        self.memory_labels: Tensor | None = None
        self.dim, self.mode, self.metric, self.distance = dim, mode, metric, distance
        self.alpha, self.beta, self.lam, self.chunk, self.group = alpha, beta, lam, chunk, group
        self.candidates, self.metric_grad = candidates, metric_grad
        # Set ``timed`` to have each call record its wall-clock split (device-synchronised) in ``timings``.
        self.timed, self.timings = False, {}
        if metric == "pddm":
            self.pddm = PDDM(dim, hidden)
        elif metric == "mahalanobis":
            self.mahalanobis = Mahalanobis(dim)
        else:
            self.euclidean = Euclidean()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, mode={self.mode!r}, metric={self.metric!r}, distance={self.distance!r}, "
            f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, positives={self.positives!r}, "
            f"negatives={self.negatives}" + (f", soft={self.soft}" if self.soft else "")
            + (f", reduction={self.reduction!r}" if self.reduction != "mean" else "")
            + (", semihard=True" if self.semihard else "")
        )  # fmt: skip

    def set_step(self, step: int) -> None:
        """The training step of the next call (1-based): ``metric_grad_after`` and ``memory_warmup`` count it."""
        self.step = int(step)

    def metric_grad_now(self) -> bool:
        """Whether E_m's gradient reaches the embedding at the current step."""
        return self.metric_grad or (self.metric_grad_after is not None and self.step > self.metric_grad_after)

    def memory_now(self) -> bool:
        """Whether this step mines against the cross-batch memory (it is filled from the first step on)."""
        return self.memory > 0 and self.memory_features is not None and self.step > self.memory_warmup

    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        """Append a (gathered) batch to the memory, dropping the oldest rows beyond ``memory``."""
        if self.memory <= 0:
            return
        f, y = features.detach(), labels.detach().reshape(-1)
        if self.memory_features is not None:
            f, y = torch.cat([self.memory_features, f]), torch.cat([self.memory_labels, y])
        self.memory_features, self.memory_labels = f[-self.memory :].clone(), y[-self.memory :].clone()

    @property
    def scorer(self) -> nn.Module:
        """The module scoring pairs: ``scorer(a, b)`` aligned, ``scorer.pairwise(rows, pool)``."""
        return getattr(self, self.metric)

    def mine(self, pool: Tensor, labels: Tensor, offset: int = 0, count: int | None = None) -> Quadruplets:
        """Quadruplets for ``pool[offset:offset+count]`` with this loss's metric and mode (no gradient)."""
        return mine_quadruplets(
            self.scorer,
            pool.detach(),
            labels,
            offset,
            count,
            self.mode,
            chunk=self.chunk,
            candidates=self.candidates,
            positives=self.positives,
            negatives=self.negatives,
            semihard=self.semihard,
        )

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        sq = (a - b).pow(2).sum(-1)
        if self.distance == "squared":
            return sq
        # Clamped so that identical embeddings get a zero gradient, not the infinite one of sqrt at 0.
        return sq.clamp_min(1e-12).sqrt()

    def _hinge(self, x: Tensor) -> Tensor:
        """``[x]_+``, or with ``soft = t > 0`` its smooth upper bound ``t log(1 + e^(x/t))``, which keeps
        pushing (ever more gently) once the margin holds, as the soft-margin triplet loss does."""
        return F.relu(x) if self.soft == 0 else self.soft * F.softplus(x / self.soft)

    def _global_hardest(self, q: Quadruplets) -> Quadruplets:
        """Batch mode across workers: keep only the globally hardest positive pair (first rank on ties)."""
        rank, world = rank_and_world(self.group)
        if world == 1:
            return q
        mine = q.score.min().reshape(1) if len(q) else q.score.new_full((1,), float("inf"))
        winner = int(all_gather_no_grad(mine.float(), self.group).reshape(-1).argmin())
        return q if rank == winner else q.take(torch.zeros(len(q), dtype=torch.bool, device=q.i.device))

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, LossStats]:
        """Gather, mine and score in fp32 (or fp64), whatever the caller's dtype or autocast: argmin / argmax over bf16
        scores break ties differently, and the hinges' margins are small."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"PDDMLoss expects embeddings of shape (n, {self.dim}), got {tuple(embeddings.shape)}")
        labels = labels.reshape(-1).to(embeddings.device)
        device = embeddings.device
        with torch.autocast(device.type, enabled=False):
            t0 = time.perf_counter()
            wide = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))  # fp32 at least
            batch = gather_batch(F.normalize(wide, dim=1), labels, self.group)
            t1 = _synced(device) if self.timed else t0
            current = batch
            if self.memory_now():  # the memory's rows after the batch's: anchors keep their offsets
                batch = GlobalBatch(
                    torch.cat([batch.features, self.memory_features.to(batch.features)]),
                    torch.cat([batch.labels, self.memory_labels.to(batch.labels)]),
                    batch.offset,
                    batch.local_size,
                )
            loss, stats = self.pool_loss(batch)
            self.enqueue(current.features, current.labels)
            self.step += 1
            if self.timed:
                self.timings = {"gather": t1 - t0, "mining_loss": _synced(device) - t1}
        return loss, stats

    def pool_loss(self, batch: GlobalBatch) -> tuple[Tensor, LossStats]:
        """The loss for this worker's block of an already gathered, normalised global batch."""
        q = self.mine(batch.features, batch.labels, batch.offset, batch.local_size)
        if self.mode == "batch":
            q = self._global_hardest(q)
        feats = batch.features[batch.offset : batch.offset + batch.local_size]
        pool, n = batch.features, len(q)
        # The three pairs of every quadruplet, (i, j), (i, k), (j, l), scored in one call, with gradient.
        left, right = pool[torch.cat([q.i, q.i, q.j])], pool[torch.cat([q.j, q.k, q.l])]
        if self.metric_grad_now():
            s = self.scorer(left, right).reshape(3, n)
        else:  # E_m trains the metric only; the embedding learns from E_e
            s = self.scorer(left.detach(), right.detach()).reshape(3, n)
        d = self._distance(left, right).reshape(3, n)
        hinge_m = F.relu(self.alpha + s[1:] - s[0])  # (2, n)
        margin_e = self.beta + d[0] - d[1:]  # (2, n); > 0: the margin is violated
        hinge_e = self._hinge(margin_e)
        e_m, e_e = hinge_m.sum(0), hinge_e.sum(0)

        _, world = rank_and_world(self.group)
        count_dtype = torch.promote_types(feats.dtype, torch.float32)  # exact counts even under bf16
        n_local = torch.tensor(float(n), dtype=count_dtype, device=feats.device)
        with torch.no_grad():  # quadruplets, and those each header still pushes: one all-reduce for the three
            counts = torch.stack([n_local, (e_m > 0).sum().to(count_dtype), (e_e > 0).sum().to(count_dtype)])
        n_global, m_global, e_global = all_reduce_sum(counts, self.group).clamp_min(1.0).unbind()
        if self.reduction == "mean":
            loss = (e_m + self.lam * e_e).sum() * (world / n_global)
        else:  # "nonzero": each header's mean over the quadruplets it still has a loss on
            loss = (e_m.sum() / m_global + self.lam * e_e.sum() / e_global) * world

        with torch.no_grad():
            spread = (feats - feats.mean(0)).norm(dim=1).mean() if len(feats) else feats.new_zeros(())
            stats = LossStats(
                quadruplets=n_local,
                skipped=q.skipped.float(),
                active_metric=_mean((hinge_m > 0).float()),
                active_embedding=_mean((margin_e > 0).float()),
                metric_loss=_mean(e_m),
                embedding_loss=_mean(e_e),
                pos_score=_mean(s[0]),
                neg_score=_mean(s[1:]),
                spread=spread.detach(),
            )
        return loss, stats
