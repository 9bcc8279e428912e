"""pytorch-metric-learning's pair-based losses as pool losses, so that :class:`~distpddm.wrappers.CrossDevice`
makes them exact across workers as it does PDDMLoss.

The miner runs on the whole pool, as one process would run it on the concatenated batch; the tuples whose
anchor is this worker's are kept, and the loss's ``compute_loss`` scores them against the pool (anchors as
``embeddings``, the pool as ``ref_emb``). Its reducer becomes the global-count form of the same reducer
(``MeanReducer`` or ``AvgNonZeroReducer``; others have no exact form across workers and are refused).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .pool import Pool, PoolLoss, Terms, spread
from .reducers import AvgNonZeroReducer, MeanReducer, Reducer, TermwiseReducer


def global_reducer(pml_reducer) -> Reducer:
    """The distpddm reducer that averages as ``pml_reducer`` does, over the global batch."""
    from pytorch_metric_learning import reducers

    if isinstance(pml_reducer, reducers.MultipleReducers):
        rules = {name: global_reducer(r) for name, r in pml_reducer.reducers.items()}
        default = global_reducer(pml_reducer.default_reducer)
        kinds = {type(r) for r in [*rules.values(), default]}
        return default if len(kinds) == 1 else TermwiseReducer(rules, default)
    if isinstance(pml_reducer, reducers.AvgNonZeroReducer):
        return AvgNonZeroReducer()
    if type(pml_reducer) is reducers.MeanReducer:
        return MeanReducer()
    raise ValueError(
        f"{type(pml_reducer).__name__} has no exact form across workers: give the loss a MeanReducer or an "
        "AvgNonZeroReducer (reducer: mean | nonzero)"
    )


def block_pairs(labels: Tensor, offset: int, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every positive and negative pair of the anchors ``offset .. offset + count`` against the pool, anchors
    numbered from 0 (an anchor is never its own positive): what a loss without a miner uses."""
    rows = torch.arange(count, device=labels.device)
    same = labels[offset : offset + count, None] == labels[None, :]
    diff = ~same
    same[rows, rows + offset] = False
    a1, p = same.nonzero(as_tuple=True)
    a2, n = diff.nonzero(as_tuple=True)
    return a1, p, a2, n


def anchored(tuples: tuple[Tensor, ...], offset: int, count: int) -> tuple[Tensor, ...]:
    """The tuples of a miner's output (``(a, p, n)`` or ``(a1, p, a2, n)`` over the pool) whose anchor lies
    in the block, anchors renumbered from 0."""

    def keep(anchor: Tensor, *others: Tensor) -> list[Tensor]:
        mine = (anchor >= offset) & (anchor < offset + count)
        return [anchor[mine] - offset, *(o[mine] for o in others)]

    if len(tuples) == 3:
        return tuple(keep(*tuples))
    if len(tuples) == 4:
        a1, p, a2, n = tuples
        return (*keep(a1, p), *keep(a2, n))
    raise ValueError(f"a miner returned {len(tuples)} index tensors; expected 3 (triplets) or 4 (pairs)")


#: pytorch-metric-learning losses whose terms are per anchor (a row of the anchors x pool matrix, or one of its
#: pairs or triplets), so that the anchors of each worker give exactly the one-process loss (tested 1 vs N)
EXACT = ("MultiSimilarityLoss", "ContrastiveLoss", "TripletMarginLoss", "NTXentLoss")


class PMLLoss(PoolLoss):
    """``loss`` (one of the pytorch-metric-learning losses in :data:`EXACT`), mined by ``miner`` (a
    ``pytorch_metric_learning.miners`` miner, or None: every pair), as a pool loss; ``reducer`` overrides
    the global form of the loss's own reducer. The loss is equal to ``loss(embeddings, labels, miner(...))``
    on one process, and across workers (:class:`~distpddm.wrappers.CrossDevice`) to that on the concatenated
    batch; a miner must then pick the same tuples on every worker (a deterministic one)."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None, reducer: Reducer | None = None):
        super().__init__()
        from pytorch_metric_learning.losses import BaseMetricLossFunction
        from pytorch_metric_learning.miners import BaseMiner

        if not isinstance(loss, BaseMetricLossFunction):
            raise ValueError(f"PMLLoss takes a pytorch-metric-learning loss, got {type(loss).__name__}")
        if type(loss).__name__ not in EXACT:
            raise ValueError(
                f"{type(loss).__name__} is not known to give the one-process loss when each worker takes its own "
                f"anchors (its terms may depend on the whole batch); supported: {', '.join(EXACT)}"
            )
        if miner is not None and not isinstance(miner, BaseMiner):
            raise ValueError(f"miner must be a pytorch-metric-learning miner, got {type(miner).__name__}")
        if getattr(loss, "swap", False):
            raise ValueError("TripletMarginLoss(swap=True) scores positive-negative pairs: it needs the square matrix")
        if miner is None and getattr(loss, "triplets_per_anchor", "all") != "all":
            raise ValueError(
                "random triplets (triplets_per_anchor != 'all') have no exact form across workers: use 'all' or a miner"
            )
        self.loss, self.miner = loss, miner
        self.reducer = reducer if reducer is not None else global_reducer(loss.reducer)

    def extra_repr(self) -> str:
        return f"reducer={self.reducer!r}"

    def terms(self, pool: Pool) -> Terms:
        feats, labels = pool.features, pool.labels.reshape(-1)
        if self.miner is None:
            tuples, whole = block_pairs(labels, pool.offset, pool.count), _pair_counts(labels)
        else:
            with torch.no_grad():
                mined = self.miner(feats.detach(), labels)  # on the whole pool, as one process would
            tuples, whole = anchored(mined, pool.offset, pool.count), _pair_counts(labels, mined)
        anchors, anchor_labels = feats[pool.anchors], labels[pool.anchors]
        loss_dict = self._compute(anchors, anchor_labels, tuples, feats, labels, tiny=max(whole) <= 1)
        self.loss.add_embedding_regularization_to_loss_dict(loss_dict, anchors)
        names = self.loss.sub_loss_names()  # the same terms on every worker, in the same order
        terms = Terms(
            losses={n: loss_dict[n]["losses"] if n in loss_dict else 0 for n in names},
            kinds={n: loss_dict[n]["reduction_type"] for n in names if n in loss_dict},
        )
        with torch.no_grad():
            found = torch.tensor(float(len(tuples[0])), device=feats.device)
            terms.stats = {"tuples": found, "spread": spread(anchors)}
            for name, values in terms.losses.items():
                if torch.is_tensor(values) and values.dim() == 1:
                    terms.stats[f"{name}_active"] = (values > 0).float().mean() if len(values) else values.new_zeros(())
        return terms

    def _compute(self, anchors, anchor_labels, tuples, feats, labels, tiny: bool) -> dict:
        """``compute_loss`` of the anchors against the pool. A pair loss gives no loss when the *whole* pool
        holds at most one pair of each kind, as on one process; its own test would look at this block alone."""
        from pytorch_metric_learning.losses import GenericPairLoss
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        if not isinstance(self.loss, GenericPairLoss):
            return self.loss.compute_loss(anchors, anchor_labels, tuples, feats, labels)
        if tiny:
            return self.loss.zero_losses()
        pairs = lmu.convert_to_pairs(tuples, anchor_labels, labels)
        return self.loss.loss_method(self.loss.distance(anchors, feats), pairs)


def _pair_counts(labels: Tensor, mined: tuple[Tensor, ...] | None = None) -> tuple[int, int]:
    """(positive, negative) pairs of the whole pool: the miner's, or every pair of distinct samples."""
    if mined is not None:
        a, *_ = mined
        return (len(a), len(a)) if len(mined) == 3 else (len(mined[0]), len(mined[2]))
    counts = torch.unique(labels, return_counts=True)[1]
    n = len(labels)
    return int((counts * (counts - 1)).sum()), int(n * n - (counts * counts).sum())
