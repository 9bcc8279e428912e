"""The invariant: N workers on slices of a global batch == one process on the whole batch."""

import pytest
import torch
import torch.multiprocessing as mp

from distpddm.train.launch import free_port
from tests.dist_workers import deepspeed_step, loss_and_grads, problem

WORLD = 2


def _single_process(metric, mode):
    model, crit, x, y = problem(metric, mode)
    loss, stats = crit(model(x), y)
    loss.backward()
    grads = {n: p.grad for n, p in [*model.named_parameters(), *crit.named_parameters()]}
    return loss.detach(), grads, int(stats.quadruplets)


@pytest.mark.parametrize("metric", ["pddm", "euclidean", "mahalanobis"])
@pytest.mark.parametrize("mode", ["anchor", "batch"])
def test_two_processes_equal_one(tmp_path, metric, mode):
    out = tmp_path / "rank0.pt"
    mp.spawn(loss_and_grads, args=(WORLD, free_port(), metric, mode, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    loss, grads, quads = _single_process(metric, mode)
    assert got["quadruplets"] == quads == (15 if mode == "anchor" else 1)
    torch.testing.assert_close(got["loss"], loss, rtol=1e-9, atol=1e-12)
    assert grads.keys() == got["grads"].keys()
    for name, g in grads.items():
        # S's output bias cancels in every hinge (S_ik - S_ij), so its gradient is 0 by construction.
        assert g is not None and (torch.count_nonzero(g) > 0 or name == "pddm.ws.bias"), name
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("metric", ["pddm", "euclidean"])
def test_deepspeed_zero1_step_equals_single_process_step(tmp_path, metric):
    out = tmp_path / "params.pt"
    mp.spawn(deepspeed_step, args=(WORLD, free_port(), metric, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)

    model, crit, x, y = problem(metric, "anchor", dtype=torch.float32)
    wrapper = torch.nn.ModuleDict({"net": model, "crit": crit})
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    loss, _ = crit(model(x), y)
    loss.backward()
    opt.step()
    changed = 0
    for name, p in wrapper.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(before[name], p)
    assert changed > 0
