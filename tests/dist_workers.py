"""Worker bodies for the multi-process tests (spawned; importable by the child processes)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distpddm import PDDMLoss
from distpddm.miners import BatchHardestQuadrupletMiner, HardQuadrupletMiner, SemiHardQuadrupletMiner
from distpddm.model import SmallCNN
from distpddm.reducers import AvgNonZeroReducer
from distpddm.wrappers import CrossBatchMemory, CrossDevice

PML_CASES = ("multi_similarity", "contrastive", "contrastive_termwise", "triplet_batch_hard", "triplet_all", "ntxent")


def pml_loss(case: str):
    """(pytorch-metric-learning loss, miner or None) of a case."""
    from pytorch_metric_learning import losses, miners, reducers

    return {
        "multi_similarity": (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()),
        # every pair; margins inside the spread of this problem's distances, so that some pairs have no loss and
        # the AvgNonZeroReducer of each sub-loss counts
        "contrastive": (losses.ContrastiveLoss(pos_margin=0.3, neg_margin=0.3), None),
        # a reducer per sub-loss (pytorch-metric-learning's MultipleReducers): the mean of the positive pairs,
        # the non-zero mean of the negative ones
        "contrastive_termwise": (
            losses.ContrastiveLoss(
                pos_margin=0.3,
                neg_margin=0.3,
                reducer=reducers.MultipleReducers({"pos_loss": reducers.MeanReducer()}, reducers.AvgNonZeroReducer()),
            ),
            None,
        ),
        "triplet_batch_hard": (losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()),
        "triplet_all": (losses.TripletMarginLoss(margin=0.05), None),  # every triplet; some already hold
        "ntxent": (losses.NTXentLoss(temperature=0.1), None),
    }[case]


def criterion(metric: str, mode: str, dtype=torch.float64):
    """The pool loss of a case: PDDMLoss with ``metric`` and the parts ``mode`` names, or (metric "pml") the
    pytorch-metric-learning loss ``mode`` names."""
    if metric == "pml":
        from distpddm.pml import PMLLoss

        return PMLLoss(*pml_loss(mode))
    # "several": every positive of an anchor, each with its 2 hardest negatives, under the soft hinge;
    # "nonzero": every positive, each header averaged over its non-zero quadruplets (global counts); margins
    # small enough that some embedding hinges are zero under every metric, so "nonzero" differs from "mean"
    # "semihard": every positive, each with i's and j's best-scored negative below S_ij (else the hardest)
    extra = {
        "anchor": {"miner": HardQuadrupletMiner("hardest", chunk=5)},
        "batch": {"miner": BatchHardestQuadrupletMiner(chunk=5)},
        "several": {"miner": HardQuadrupletMiner("all", 2, chunk=5), "soft": 0.05},
        "nonzero": {"miner": HardQuadrupletMiner("all"), "reducer": AvgNonZeroReducer(), "alpha": 0.01, "beta": 0.01},
        "semihard": {"miner": SemiHardQuadrupletMiner("all", chunk=5)},
    }[mode]
    return PDDMLoss(12, metric=metric, metric_grad=True, **extra).to(dtype)  # E_m's gradient reaches the embedding


def problem(metric: str, mode: str, dtype=torch.float64):
    """A fixed model, criterion and global batch. Labels make ranks mine unequal counts (class 9 has one
    sample: its anchor is skipped) and put positives on the other rank (classes 0 and 1 straddle)."""
    torch.manual_seed(0)
    model = SmallCNN(embed_dim=12, width=8, norm="group").to(dtype)
    crit = criterion(metric, mode, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 12, 12, generator=g, dtype=dtype)
    y = torch.tensor([0, 2, 2, 3, 3, 1, 9, 0, 1, 4, 4, 5, 5, 0, 6, 6])
    return model, crit, x, y


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),  # a rank on another host: the first host's
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))


def _finish() -> None:
    # gloo's threads can abort the interpreter at exit after the work is done: leave without teardown.
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def loss_and_grads(rank: int, world: int, port: int, metric: str, mode: str, out: str) -> None:
    """One forward/backward on this rank's slice; averages grads as a data-parallel engine would."""
    _init(rank, world, port)
    model, crit, x, y = problem(metric, mode)
    b = len(x) // world
    mine = slice(rank * b, (rank + 1) * b)
    loss, stats = CrossDevice(crit)(model(x[mine]), y[mine])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {}
    for name, p in [*model.named_parameters(), *crit.named_parameters()]:
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g / world
    quads = torch.tensor([float(stats.get("quadruplets", -1))])
    dist.all_reduce(quads)
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grads": grads, "quadruplets": int(quads)}, out)
    _finish()


def deepspeed_step(rank: int, world: int, port: int, metric: str, out: str) -> None:
    """One ZeRO stage-1 DeepSpeed step on this rank's slice, with a torch optimiser (no op compile)."""
    _init(rank, world, port)
    import deepspeed

    model, crit, x, y = problem(metric, "anchor", dtype=torch.float32)
    wrapper = torch.nn.ModuleDict({"net": model, "crit": crit})
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    b = len(x) // world
    config = {
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config, dist_init_required=False)
    mine = slice(rank * b, (rank + 1) * b)
    loss, _ = CrossDevice(engine.module["crit"])(engine.module["net"](x[mine]), y[mine])
    engine.backward(loss)
    engine.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in wrapper.state_dict().items()}, out)
    _finish()


def bf16_engine_step(rank: int, world: int, port: int, deepspeed_json: str, out: str) -> None:
    """One step of the trainer's own engine (``build_engine``) under ``train.precision: bf16``: what the loss
    mined, with which dtypes, and what the export holds."""
    _init(rank, world, port)
    import copy

    import torch.nn.functional as F

    from distpddm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from distpddm.model import export_model
    from distpddm.train.trainer import build_engine

    cfg = RunConfig(
        data=DataConfig(classes_per_batch=16, images_per_class=4),
        model=ModelConfig(embed_dim=16, small_cnn_width=8),
        train=TrainConfig(precision="bf16", deepspeed=deepspeed_json),
    )
    engine, optimizer, _, _ = build_engine(cfg, torch.device("cpu"), world)
    net, crit = engine.module.net, engine.module.criterion
    fp32_twin = copy.deepcopy(crit)  # the same PDDM unit, before the step
    seen = {}
    miner = crit.miner

    def spy(scorer, pool):
        q = miner(scorer, pool)
        seen.update(pool=pool.features.detach().clone(), labels=pool.labels.clone(), quads=q)
        return q

    crit.miner = spy
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.arange(16).repeat_interleave(4)
    emb = net(x)
    loss, _ = crit(emb, y)
    engine.backward(loss)
    engine.step()

    reference = fp32_twin.mine(F.normalize(emb.detach(), dim=1), y)
    rounded = copy.deepcopy(fp32_twin).to(torch.bfloat16)  # what DeepSpeed's bf16 mode would have mined with
    control = rounded.mine(F.normalize(emb.detach(), dim=1).to(torch.bfloat16), y)
    with torch.no_grad():
        net.backbone_dtype = None
        fp32_out = net(x)
        net.backbone_dtype = torch.bfloat16
    export_model(net, f"{out}.model.pt")
    torch.save(
        {
            "emb_dtype": emb.dtype,
            "pool_dtype": seen["pool"].dtype,
            "param_dtypes": {n: p.dtype for n, p in engine.module.named_parameters()},
            "quads": [t.clone() for t in (seen["quads"].i, seen["quads"].j, seen["quads"].k, seen["quads"].l)],
            "reference": [t.clone() for t in (reference.i, reference.j, reference.k, reference.l)],
            "control": [t.clone() for t in (control.i, control.j, control.k, control.l)],
            "backbone_bf16_gap": float((fp32_out - emb.detach()).abs().max()),
            "weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "communication_dtype": engine.communication_data_type,
            "groups": [(grp["name"], grp["weight_decay"]) for grp in optimizer.param_groups],
        },
        out,
    )
    _finish()


def agree_worker(rank: int, world: int, port: int, failing: list[int], out: str) -> None:
    """Ranks in ``failing`` bring a BadDataError to :func:`agree`; every rank records what it raised."""
    _init(rank, world, port)
    from distpddm.dist import agree
    from distpddm.errors import BadDataError, DeterministicError

    error = BadDataError(f"shard-{rank} is unreadable") if rank in failing else None
    try:
        agree(error, torch.device("cpu"))
        result = "passed"
    except DeterministicError as e:
        result = f"{type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)
    _finish()


def validate_worker(rank: int, world: int, port: int, split: str, limit, out: str) -> None:
    """The trainer's validation on ``world`` ranks; rank 0 saves the figures. No loader workers: in a spawned
    process they would be spawned too (seconds of imports each), and reading is tested in test_evalset."""
    _init(rank, world, port)
    from distpddm.config import DataConfig, ModelConfig, RunConfig
    from distpddm.model import create_model
    from distpddm.validation import validate

    torch.manual_seed(0)
    net = create_model(ModelConfig(embed_dim=8, small_cnn_width=8))
    cfg = RunConfig(
        data=DataConfig(train_shards=split, val_shards=split, image_size=16, loader_workers=0, val_max_images=limit),
        model=ModelConfig(embed_dim=8, small_cnn_width=8),
    )
    result = validate(cfg, net, torch.device("cpu"))
    if rank == 0:
        torch.save(result, out)
    _finish()


def memory_worker(rank: int, world: int, port: int, out: str) -> None:
    """Two steps with a cross-batch memory on this rank's slice; every rank saves what its memory holds."""
    _init(rank, world, port)
    _, _, x, y = problem("pddm", "anchor")
    feats = torch.randn(len(x), 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    memory = CrossBatchMemory(PDDMLoss(12).double(), 24)
    crit = CrossDevice(memory)
    b = len(x) // world
    mine = slice(rank * b, (rank + 1) * b)
    crit(feats[mine], y[mine])
    crit(feats[mine].flip(0), y[mine].flip(0))
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the loss alone, inside the process group
        warnings.simplefilter("always")
        PDDMLoss(12).double()(feats[mine], y[mine])
    torch.save(
        {"features": memory.features, "labels": memory.labels, "warned": [str(w.message) for w in caught]},
        f"{out}.{rank}",
    )
    _finish()


def pml_edge_case(case: str):
    """(features, labels, per-rank sizes, loss, miner) of a batch where a worker's block is degenerate:
    "no_tuples": the second worker's two classes are tight and far from everything, so the MultiSimilarity
    miner keeps no tuple of its anchors; "one_pair": the second worker holds one sample, whose batch-hard
    triplet is one positive and one negative pair (pytorch-metric-learning's own test would zero it)."""
    from pytorch_metric_learning import losses, miners

    if case == "no_tuples":
        x = torch.tensor(
            [[1, 0.1, 0, 0], [1, -0.1, 0, 0], [1, 0, 0.1, 0], [1, 0, -0.1, 0],
             [0, 0, 0, 1], [0, 0.01, 0, 1], [-1, 0, 0, 0], [-1, 0.01, 0, 0]],
            dtype=torch.float64,
        )  # fmt: skip
        y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        return x, y, [4, 4], losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    return x, y, [7, 1], losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8), miners.BatchHardMiner()


def pml_edge_worker(rank: int, world: int, port: int, case: str, out: str) -> None:
    """CrossDevice(PMLLoss) on this rank's rows of a degenerate batch; rank 0 saves the engine-averaged loss
    and the gradient of every row."""
    _init(rank, world, port)
    from distpddm.pml import PMLLoss

    x, y, sizes, loss_fn, miner = pml_edge_case(case)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    rows = x[mine].clone().requires_grad_()
    loss, stats = CrossDevice(PMLLoss(loss_fn, miner))(rows, y[mine])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    from distpddm.dist import all_gather_rows

    grads, _ = all_gather_rows(rows.grad / world)  # the engine's average of what each rank holds for its rows
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grad": grads, "tuples": float(stats["tuples"])}, out)
    _finish()
