"""The invariant: N workers on slices of a global batch == one process on the whole batch."""

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distpddm.miners import HardQuadrupletMiner
from distpddm.train.launch import free_port
from tests.dist_workers import (
    PML_CASES,
    agree_worker,
    bf16_engine_step,
    deepspeed_step,
    loss_and_grads,
    memory_worker,
    pml_edge_case,
    pml_edge_worker,
    pml_loss,
    problem,
    validate_worker,
)

WORLD = 2


def _single_process(metric, mode):
    """The one-process reference: PDDMLoss on the whole batch, or pytorch-metric-learning's own call."""
    model, crit, x, y = problem(metric, mode)
    if metric == "pml":
        loss_fn, miner = pml_loss(mode)
        emb = model(x)
        loss = loss_fn(emb, y, miner(emb, y) if miner is not None else None)
        _, stats = crit(emb, y)
    else:
        loss, stats = crit(model(x), y)
    loss.backward()
    grads = {n: p.grad for n, p in [*model.named_parameters(), *crit.named_parameters()]}
    if mode == "nonzero":  # the case is only a case if some hinges are zero (else it equals "mean")
        assert 0 < float(stats["active_embedding"]) < 1, metric
    if mode.startswith("contrastive"):  # ... the same for pytorch-metric-learning's AvgNonZeroReducer
        assert 0 < float(stats["neg_loss_active"]) < 1 and 0 < float(stats["pos_loss_active"]) < 1
    if mode == "triplet_all":
        assert 0 < float(stats["loss_active"]) < 1
    if metric == "pml":  # PMLLoss alone, on one process, is pytorch-metric-learning's loss
        torch.testing.assert_close(crit(model(x), y)[0], loss, rtol=1e-12, atol=1e-14)
    if mode == "semihard":  # ... and only if some semi-hard negatives are not the hardest
        semi = crit.mine(model(x).detach(), y)
        crit.miner = HardQuadrupletMiner("all")
        hard = crit.mine(model(x).detach(), y)
        assert not (torch.equal(semi.k, hard.k) and torch.equal(semi.l, hard.l)), metric
    return loss.detach(), grads, int(stats.get("quadruplets", -1))


CASES = [
    *((metric, mode) for metric in ("pddm", "euclidean", "mahalanobis")
      for mode in ("anchor", "batch", "several", "nonzero", "semihard")),
    *(("pml", case) for case in PML_CASES),
]  # fmt: skip


@pytest.mark.parametrize(("metric", "mode"), CASES)
def test_two_processes_equal_one(tmp_path, metric, mode):
    """CrossDevice(loss) on 2 gloo ranks == the loss on the whole batch in one process: loss and gradients."""
    out = tmp_path / "rank0.pt"
    mp.spawn(loss_and_grads, args=(WORLD, free_port(), metric, mode, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    loss, grads, quads = _single_process(metric, mode)
    # 15 anchors with a positive; "several": 2 per (anchor, positive) pair, 3 x 2 (class 0) + 6 x 2 = 18 pairs
    if metric != "pml":  # pytorch-metric-learning's losses count no quadruplets
        want = {"anchor": 15, "batch": 1, "several": 2 * 18, "nonzero": 18, "semihard": 18}[mode]
        assert got["quadruplets"] == quads == want
    torch.testing.assert_close(got["loss"], loss, rtol=1e-9, atol=1e-12)
    assert grads.keys() == got["grads"].keys()
    for name, g in grads.items():
        # S's output bias cancels in every hinge (S_ik - S_ij), so its gradient is 0 by construction.
        assert g is not None and (torch.count_nonzero(g) > 0 or name == "pddm.ws.bias"), name
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["no_tuples", "one_pair"])
def test_a_worker_whose_block_mines_nothing_or_one_pair_still_gives_the_one_process_loss(tmp_path, case):
    """Degenerate blocks must neither skip the reducer's all-reduce (the others would hang) nor be zeroed by
    pytorch-metric-learning's per-call test of at most one pair (one process scores those pairs)."""
    out = tmp_path / "edge.pt"
    mp.spawn(pml_edge_worker, args=(WORLD, free_port(), case, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    x, y, sizes, loss_fn, miner = pml_edge_case(case)
    x = x.clone().requires_grad_()
    mined = miner(x, y)
    if case == "no_tuples":  # the case is a case: no tuple anchored on the second worker's rows
        assert not bool((mined[0] >= sizes[0]).any() or (mined[2] >= sizes[0]).any())
    else:
        assert int((mined[0] >= sizes[0]).sum()) == 1  # one triplet there: one positive, one negative pair
    want = loss_fn(x, y, mined)
    want.backward()
    assert float(want.detach()) > 0
    torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["grad"], x.grad, rtol=1e-7, atol=1e-10)


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


def test_bf16_trains_the_backbone_only_in_bf16_and_mines_and_exports_in_fp32(tmp_path):
    out = tmp_path / "bf16.pt"
    ds = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero1_cpu.json")
    mp.spawn(bf16_engine_step, args=(1, free_port(), ds, str(out)), nprocs=1, join=True)
    got = torch.load(out, weights_only=False)
    assert got["backbone_bf16_gap"] > 1e-4  # the backbone did compute in bf16 ...
    assert got["emb_dtype"] == got["pool_dtype"] == torch.float32  # ... and the miner saw fp32 embeddings
    assert set(got["param_dtypes"].values()) == {torch.float32}  # master weights, PDDM unit included
    for mined, ref in zip(got["quads"], got["reference"], strict=True):
        assert torch.equal(mined, ref)  # the quadruplets fp32 mining picks from the same embeddings
    # The test can tell: mining these embeddings in bf16 (the engine's old whole-module cast) picks others.
    assert any(not torch.equal(c, r) for c, r in zip(got["control"], got["reference"], strict=True))
    assert got["communication_dtype"] == torch.float32
    blob = torch.load(f"{out}.model.pt", weights_only=True)
    for name, w in blob["state_dict"].items():
        assert w.dtype == got["weights"][name].dtype and torch.equal(w, got["weights"][name]), name
    assert {w.dtype for w in blob["state_dict"].values() if w.is_floating_point()} == {torch.float32}
    assert {name for name, _ in got["groups"]} == {
        "backbone/decay",
        "backbone/no_decay",
        "heads/decay",
        "heads/no_decay",
    }
    assert all((wd == 0.0) == name.endswith("no_decay") for name, wd in got["groups"])


@pytest.mark.parametrize("failing", [[1], [0, 1], []])
def test_a_deterministic_failure_on_any_rank_stops_every_rank_together(tmp_path, failing):
    mp.spawn(agree_worker, args=(WORLD, free_port(), failing, str(tmp_path / "r")), nprocs=WORLD, join=True)
    results = [(tmp_path / f"r.{rank}").read_text() for rank in range(WORLD)]
    if not failing:
        assert results == ["passed", "passed"]
    elif failing == [1]:
        assert results[1] == "BadDataError: shard-1 is unreadable"  # its own error, unchanged
        assert results[0] == "DeterministicError: rank 1: BadDataError: shard-1 is unreadable"
    else:
        for r in results:
            assert "rank 0: BadDataError: shard-0 is unreadable; rank 1: BadDataError: shard-1" in r


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    from distpddm.data.shards import BuildOptions, build
    from distpddm.data.sources import read_source
    from tests import fixtures

    root = tmp_path_factory.mktemp("val")
    fixtures.make_folder(root / "src", fixtures.glyph_images(8, 6, root / "cache"))
    build(read_source("folder", root / "src"), root / "out", BuildOptions(shard_bytes=6_000, progress=False))
    return str(root / "out" / "train")


def test_validation_on_two_ranks_equals_one_process_search(tmp_path, val_split):
    limit = 25  # a global cap, odd: not a multiple of the ranks
    import numpy as np

    from distpddm.data.evalset import EvalDataset
    from distpddm.extract import embed_split
    from distpddm.model import ModelConfig, create_model
    from distpddm.retrieval import retrieval_metrics

    split = val_split
    out = tmp_path / "val.pt"
    mp.spawn(validate_worker, args=(WORLD, free_port(), split, limit, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    torch.manual_seed(0)
    net = create_model(ModelConfig(embed_dim=8, small_cnn_width=8))
    part = embed_split(net, EvalDataset(split, 16, limit=limit, rank=0, world=1), device=torch.device("cpu"), workers=0)
    want = retrieval_metrics(part.embeddings, part.labels, (1, 2, 4, 8))
    assert got["val_images"] == len(part.labels) == limit
    for key in ("recall@1", "recall@8", "r_precision", "map@r"):
        assert got[f"val_{key}"] == pytest.approx(want[key], abs=1e-9), key
    assert np.isfinite(got["val_map@r"])


def test_cross_batch_memory_holds_the_gathered_batch_on_every_rank(tmp_path):
    """Each rank enqueues the global batch (in rank order), so the memories agree and span every worker."""
    _, _, x, y = problem("pddm", "anchor")
    mp.spawn(memory_worker, args=(WORLD, free_port(), str(tmp_path / "m")), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"m.{r}") for r in range(WORLD)]
    feats = torch.randn(len(x), 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b = len(x) // WORLD
    second = torch.cat([feats[r * b : (r + 1) * b].flip(0) for r in range(WORLD)])
    labels2 = torch.cat([y[r * b : (r + 1) * b].flip(0) for r in range(WORLD)])
    want = torch.cat([feats, second])[-24:]
    for g in got:
        torch.testing.assert_close(g["features"], want)
        assert torch.equal(g["labels"], torch.cat([y, labels2])[-24:])
        # PDDMLoss called alone in a process group mines this worker's batch only, and says so
        assert any("mines this worker's batch alone; wrap it in distpddm.CrossDevice" in m for m in g["warned"])
