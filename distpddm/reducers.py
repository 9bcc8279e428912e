"""Reducers: a loss's per-element terms to one number, averaged over the global batch.

Each worker holds the terms of its own anchors; the denominators (how many elements, or how many non-zero)
are summed over the workers in one all-reduce, and each worker returns ``world * (its sum) / (global
count)``. The data-parallel engine averages over workers, which then gives exactly the mean a single process
would take over the concatenated batch, however unequally the workers mined. As pytorch-metric-learning's
``MeanReducer`` and ``AvgNonZeroReducer``, with global rather than local counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dist import all_reduce_sum
from .pool import Pool, Terms


class Reducer:
    """Base: :meth:`count` says how many elements a term's values stand for; :meth:`total` what they add up to."""

    name = "reducer"

    def count(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def total(self, values: Tensor) -> Tensor:
        return values.sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def rule(self, term: str) -> Reducer:
        """The reducer of one term (this one for every term; see :class:`TermwiseReducer`)."""
        return self

    def __call__(self, terms: Terms, pool: Pool) -> Tensor:
        """Collective when ``pool.world > 1``: every worker must bring the same term names (a term with no
        elements here is a plain 0, and still takes part in the count)."""
        names = sorted(terms.losses)
        real = {n: _has_elements(n, terms.losses[n], terms.kinds.get(n)) for n in names}
        device, dtype = pool.features.device, pool.features.dtype
        with torch.no_grad():  # one all-reduce for every term's denominator; float64 counts stay exact
            local = torch.stack(
                [
                    self.rule(n).count(terms.losses[n]).to(device, torch.float64)
                    if real[n]
                    else torch.zeros((), dtype=torch.float64, device=device)
                    for n in names
                ]
            ) if names else torch.zeros(0, dtype=torch.float64, device=device)  # fmt: skip
            counts = all_reduce_sum(local, pool.group) if pool.world > 1 else local
            scale = (pool.world / counts.clamp_min(1.0)).to(dtype)
        parts = [
            terms.weight(n) * self.rule(n).total(terms.losses[n]) * scale[i] for i, n in enumerate(names) if real[n]
        ]
        if not parts:
            return _zero(pool)
        loss = sum(parts)
        return loss if loss.requires_grad or not pool.features.requires_grad else loss + _zero(pool)


class MeanReducer(Reducer):
    """The mean over every element of the global batch."""

    name = "mean"

    def count(self, values: Tensor) -> Tensor:
        return torch.tensor(values.numel(), device=values.device)


class AvgNonZeroReducer(Reducer):
    """The mean over the elements above zero in the global batch (those still pushing): the gradient does not
    fade as more margins hold."""

    name = "nonzero"

    def count(self, values: Tensor) -> Tensor:
        return (values.detach() > 0).sum()

    def total(self, values: Tensor) -> Tensor:
        return values.clamp_min(0).sum()


class TermwiseReducer(Reducer):
    """A reducer per term (``rules``; ``default`` for the others), as pytorch-metric-learning's
    ``MultipleReducers`` gives each sub-loss its own."""

    def __init__(self, rules: dict[str, Reducer], default: Reducer | None = None):
        self.rules, self.default = dict(rules), default if default is not None else MeanReducer()

    def __repr__(self) -> str:
        return f"TermwiseReducer({self.rules!r}, default={self.default!r})"

    def rule(self, term: str) -> Reducer:
        return self.rules.get(term, self.default)


REDUCERS = {cls.name: cls for cls in (MeanReducer, AvgNonZeroReducer)}


def _has_elements(name: str, values, kind: str | None) -> bool:
    """Tensors of per-element values; pytorch-metric-learning's 'no loss' (a plain 0) is none. An already
    reduced tensor cannot be averaged over workers."""
    if not torch.is_tensor(values):
        if values == 0:
            return False
        raise TypeError(f"term {name!r} is a {type(values).__name__}, not a tensor of per-element values")
    if kind == "already_reduced":
        raise ValueError(
            f"term {name!r} comes already reduced: it has no exact form across workers (give per-element values)"
        )
    return True


def _zero(pool: Pool) -> Tensor:
    """A zero that is still connected to the anchors, so that backward runs (and finds nothing to do)."""
    return pool.features[pool.anchors].sum() * 0
