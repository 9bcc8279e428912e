"""The PDDM unit: a learned similarity that depends on where a pair sits in feature space.

See ``docs/method.md`` (Huang, Loy, Tang, NIPS 2016). Inputs are expected to be L2-normalised embeddings;
:class:`distpddm.loss.PDDMLoss` normalises before scoring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Default number of pairs scored at once by :meth:`PDDM.pairwise`: one block of ``pairs x hidden``
#: activations then stays in a CPU core's L2 cache (measured best of 4k-16k pairs, bench/mining.py), yet
#: is large enough to amortise the per-block Python overhead.
DEFAULT_CHUNK = 4096
ROW_BLOCK = 64


class PDDM(nn.Module):
    """Position-Dependent Deep Metric unit: ``S(f_i, f_j)`` from ``|f_i - f_j|`` and ``(f_i + f_j) / 2``.

    Symmetric by construction. ``hidden`` defaults to ``dim``.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"PDDM dim must be >= 1, got {dim}")
        hidden = dim if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"PDDM hidden must be >= 1, got {hidden}")
        self.dim, self.hidden = dim, hidden
        self.wu = nn.Linear(dim, hidden)
        self.wv = nn.Linear(dim, hidden)
        self.wc = nn.Linear(2 * hidden, hidden)
        self.ws = nn.Linear(hidden, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"

    def _head(self, u_pre: Tensor, v_pre: Tensor) -> Tensor:
        u = F.normalize(F.relu(u_pre), dim=-1)
        v = F.normalize(F.relu(v_pre), dim=-1)
        # W_c [u; v] == W_cu u + W_cv v: two matmuls avoid materialising the concatenation.
        hidden = self.hidden
        c = F.linear(u, self.wc.weight[:, :hidden], self.wc.bias) + F.linear(v, self.wc.weight[:, hidden:])
        return F.linear(F.relu(c), self.ws.weight, self.ws.bias).squeeze(-1)

    def forward(self, fa: Tensor, fb: Tensor) -> Tensor:
        """Scores of aligned pairs: ``fa[n]`` with ``fb[n]``; shapes ``(..., dim)`` -> ``(...)``."""
        self._check(fa, "fa")
        self._check(fb, "fb")
        return self._head(self.wu((fa - fb).abs()), self.wv((fa + fb) * 0.5))

    def pairwise(self, rows: Tensor, pool: Tensor, chunk: int | None = None) -> Tensor:
        """Scores of every row against every pool member, ``(R, dim) x (P, dim) -> (R, P)``.

        At most ``chunk`` pairs (default :data:`DEFAULT_CHUNK`) are expanded to ``pairs x dim`` at a
        time. The v branch is linear, so ``W_v v`` is computed once per sample and added pairwise;
        only the u branch (``|f_i - f_j|``) costs a matmul per pair. Without autograd (mining) each block
        runs in place, in 2 GEMMs and a few passes over its buffers.
        """
        self._check(rows, "rows", ndim=2)
        self._check(pool, "pool", ndim=2)
        chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        n_rows, n_pool = rows.shape[0], pool.shape[0]
        if n_rows == 0 or n_pool == 0:
            return rows.new_zeros(n_rows, n_pool)
        half_w = self.wv.weight * 0.5
        v_rows = F.linear(rows, half_w)
        v_pool = F.linear(pool, half_w, self.wv.bias)
        # Blocks of at most 64 rows: the usual 64 local anchors are one row block, and dense (pool x pool)
        # scoring gets square-ish blocks rather than thousands of one-column slivers.
        row_step = max(1, min(n_rows, ROW_BLOCK, chunk))
        col_step = max(1, chunk // row_step)
        spans = [
            (slice(r0, r0 + row_step), slice(c0, c0 + col_step))
            for r0 in range(0, n_rows, row_step)
            for c0 in range(0, n_pool, col_step)
        ]
        if not torch.is_grad_enabled():  # mining: write blocks in place into one output
            out = rows.new_empty(n_rows, n_pool)
            for r, c in spans:
                out[r, c] = self._block_no_grad(rows[r], pool[c], v_rows[r], v_pool[c])
            return out
        blocks = [self._block(rows[r], pool[c], v_rows[r], v_pool[c]) for r, c in spans]
        n_cols = -(-n_pool // col_step)
        return torch.cat([torch.cat(blocks[i : i + n_cols], dim=1) for i in range(0, len(blocks), n_cols)], dim=0)

    def _block(self, rows: Tensor, pool: Tensor, v_rows: Tensor, v_pool: Tensor) -> Tensor:
        u_pre = self.wu((rows[:, None, :] - pool[None, :, :]).abs())
        return self._head(u_pre, v_rows[:, None, :] + v_pool[None, :, :])

    def _block_no_grad(self, rows: Tensor, pool: Tensor, v_rows: Tensor, v_pool: Tensor) -> Tensor:
        n, h = rows.shape[0] * pool.shape[0], self.hidden
        diff = torch.sub(rows[:, None, :], pool[None, :, :]).abs_().reshape(n, -1)
        u = torch.addmm(self.wu.bias, diff, self.wu.weight.T).relu_()
        u.div_(torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min_(1e-12))
        v = torch.add(v_rows[:, None, :], v_pool[None, :, :]).reshape(n, h).relu_()
        v.div_(torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min_(1e-12))
        c = torch.addmm(self.wc.bias, u, self.wc.weight[:, :h].T)
        c.addmm_(v, self.wc.weight[:, h:].T).relu_()
        return torch.addmv(self.ws.bias, c, self.ws.weight[0]).reshape(rows.shape[0], pool.shape[0])

    def _check(self, x: Tensor, name: str, ndim: int | None = None) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"PDDM expects {name} with last dimension {self.dim}, got shape {tuple(x.shape)}")
        if ndim is not None and x.dim() != ndim:
            raise ValueError(f"PDDM expects {name} of shape (n, {self.dim}), got shape {tuple(x.shape)}")
