import pytest
import torch

from distpddm import PDDM
from tests.reference import naive_pddm_matrix, naive_pddm_score


def _unit(dim=6, hidden=5, seed=0):
    torch.manual_seed(seed)
    return PDDM(dim, hidden).double()


def _feats(n, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)


def test_forward_matches_naive_reference():
    unit = _unit()
    a, b = _feats(9, 6, 1), _feats(9, 6, 2)
    expected = torch.stack([naive_pddm_score(unit, x, y) for x, y in zip(a, b, strict=True)])
    torch.testing.assert_close(unit(a, b), expected, rtol=1e-10, atol=1e-12)


def test_pairwise_matches_naive_reference():
    unit = _unit()
    rows, pool = _feats(4, 6, 3), _feats(7, 6, 4)
    torch.testing.assert_close(unit.pairwise(rows, pool), naive_pddm_matrix(unit, rows, pool), rtol=1e-10, atol=1e-12)


def test_symmetric():
    unit = _unit()
    a, b = _feats(10, 6, 5), _feats(10, 6, 6)
    torch.testing.assert_close(unit(a, b), unit(b, a), rtol=0, atol=1e-12)
    s = unit.pairwise(a, a)
    torch.testing.assert_close(s, s.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 7, 40, 10_000])
def test_chunked_equals_unchunked(chunk):
    unit = _unit()
    rows, pool = _feats(5, 6, 7), _feats(11, 6, 8)
    full = unit.pairwise(rows, pool, chunk=10**9)
    torch.testing.assert_close(unit.pairwise(rows, pool, chunk=chunk), full, rtol=1e-12, atol=1e-12)


def test_pairwise_without_grad_equals_with_grad():
    """Mining uses the in-place no-grad kernel; it must agree with the autograd one."""
    torch.manual_seed(0)
    unit = PDDM(24, 16)
    rows, pool = torch.randn(9, 24), torch.randn(70, 24)
    with torch.no_grad():
        fast = unit.pairwise(rows, pool, chunk=50)
    slow = unit.pairwise(rows, pool, chunk=50)
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
    unit64 = _unit()
    r64, p64 = _feats(4, 6, 3), _feats(7, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            unit64.pairwise(r64, p64), naive_pddm_matrix(unit64, r64, p64), rtol=1e-10, atol=1e-12
        )


def test_pairwise_equals_forward_on_every_pair_float32():
    torch.manual_seed(0)
    unit = PDDM(32)
    rows, pool = torch.randn(16, 32), torch.randn(50, 32)
    aligned = unit(rows[:, None].expand(-1, 50, -1), pool[None].expand(16, -1, -1))
    torch.testing.assert_close(unit.pairwise(rows, pool, chunk=100), aligned, rtol=1e-5, atol=1e-5)


def test_gradcheck_forward_and_pairwise():
    unit = _unit(4, 3)
    a = _feats(3, 4, 9).requires_grad_()
    b = _feats(3, 4, 10).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: unit(x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: unit.pairwise(x, y, chunk=2), (a, b))
    params = list(unit.parameters())
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(
            unit, dict(zip(dict(unit.named_parameters()), ps, strict=True)), (a.detach(), b.detach())
        ),
        tuple(p.detach().clone().requires_grad_() for p in params),
    )


def test_hidden_defaults_to_dim_and_bad_shapes_are_named():
    unit = PDDM(8)
    assert unit.hidden == 8
    with pytest.raises(ValueError, match="last dimension 8"):
        unit(torch.randn(2, 7), torch.randn(2, 7))
    with pytest.raises(ValueError, match="chunk"):
        unit.pairwise(torch.randn(2, 8), torch.randn(3, 8), chunk=0)
    with pytest.raises(ValueError, match="dim"):
        PDDM(0)
    assert unit.pairwise(torch.randn(0, 8), torch.randn(3, 8)).shape == (0, 3)
