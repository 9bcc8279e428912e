"""Mining + loss cost against a ResNet-50 step, side by side in one run.

64 local anchors against pools of 64, 512 and 4096 (world sizes 1, 8, 64), forward + backward of mining +
PDDMLoss, compared with (a) dense mining of every pool x pool pair, (b) pytorch-metric-learning's
BatchHardMiner + TripletMarginLoss on the same pool, (c) a torchvision ResNet-50 forward + backward at batch
64, 224 px. Every case runs in a fresh forked process so its peak memory (RSS growth on CPU, allocator peak
on GPU) is its own. Usage::

    python bench/mining.py [--dims 128 64] [--pools 64 512 4096] [--device cpu] [--out docs/mining.json]
                           [--resnet-batch 64] [--resnet-size 224]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distpddm import HardQuadrupletMiner, PDDMLoss, Pool  # noqa: E402
from distpddm.loss import PAPER_SETTING  # noqa: E402

ANCHORS = 64
K = 4  # images per class in the pool


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pool(n: int, dim: int, device: str):
    g = torch.Generator().manual_seed(n * 1000 + dim)
    feats = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    labels = torch.arange(n, device=device) // K
    return feats.requires_grad_(), labels


def _timed(fn, device: str, reps: int) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def case_distpddm(dim, pool, device, reps, count=ANCHORS, candidates=None, metric="pddm", functional=False):
    if functional:  # the straightforward chunked version: the autograd kernel, also for mining
        from distpddm.pddm import PDDM

        PDDM._block_no_grad = PDDM._block
    torch.manual_seed(0)
    # the paper's hardest positive and joint gradient, as when docs/mining.json was measured
    miner = HardQuadrupletMiner("hardest", candidates=candidates)
    crit = PDDMLoss(dim, metric=metric, miner=miner, **PAPER_SETTING).to(device)
    feats, labels = _pool(pool, dim, device)
    batch = Pool(feats, labels, 0, count)

    def step():
        loss = crit.reducer(crit.terms(batch), batch)
        loss.backward()

    out = {"seconds": _timed(step, device, reps)}
    if candidates is not None:  # how often the cheap miner finds the exact hardest quadruplet
        exact = PDDMLoss(dim, metric=metric, miner=HardQuadrupletMiner("hardest"), **PAPER_SETTING).to(device)
        exact.load_state_dict(crit.state_dict())
        a = crit.miner(crit.scorer, Pool(feats.detach(), labels, 0, count))
        b = exact.miner(exact.scorer, Pool(feats.detach(), labels, 0, count))
        same_k = (a.k == b.k).float().mean().item()
        same_q = ((a.j == b.j) & (a.k == b.k) & (a.l == b.l)).float().mean().item()
        out.update(exact_negative=same_k, exact_quadruplet=same_q)
    return out


def case_pml(dim, pool, device, reps):
    from pytorch_metric_learning import losses, miners

    miner, loss_fn = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.2)
    feats, labels = _pool(pool, dim, device)

    def step():
        loss_fn(feats, labels, miner(feats, labels)).backward()

    return {"seconds": _timed(step, device, reps)}


def case_resnet50(device, reps, batch=64, size=224):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device)
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()

    return {"seconds": _timed(step, device, reps)}


def _child(conn, name, kwargs):
    device = kwargs["device"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CASES[name](**kwargs)
    if device.startswith("cuda"):
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    conn.send(result)
    conn.close()


CASES = {"distpddm": case_distpddm, "pml": case_pml, "resnet50": case_resnet50}


def run(name: str, **kwargs) -> dict:
    ctx = mp.get_context("fork" if not kwargs["device"].startswith("cuda") else "spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, name, kwargs))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--pools", type=int, nargs="+", default=[64, 512, 4096])
    p.add_argument("--candidates", type=int, default=64, help="candidate-mode negatives (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--resnet-reps", type=int, default=2)
    p.add_argument("--resnet-batch", type=int, default=64, help="the ResNet-50 reference step's batch")
    p.add_argument("--resnet-size", type=int, default=224, help="the ResNet-50 reference step's image side")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    dev = args.device
    print(
        f"device {dev} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}",
        flush=True,
    )

    resnet = run("resnet50", device=dev, reps=args.resnet_reps, batch=args.resnet_batch, size=args.resnet_size)
    print(
        f"ResNet-50 fwd+bwd, batch {args.resnet_batch}, {args.resnet_size} px: {resnet['seconds'] * 1e3:.0f} ms, "
        f"peak {resnet['peak_mib']:.0f} MiB"
    )
    rows = []
    for dim in args.dims:
        for pool in args.pools:
            local = run("distpddm", dim=dim, pool=pool, device=dev, reps=args.reps)
            dense = run("distpddm", dim=dim, pool=pool, device=dev, reps=1, count=pool)
            pml = run("pml", dim=dim, pool=pool, device=dev, reps=args.reps)
            row = {
                "dim": dim,
                "pool": pool,
                "world": pool // ANCHORS,
                "local": local,
                "dense": dense,
                "pml": pml,
                "functional": run("distpddm", dim=dim, pool=pool, device=dev, reps=args.reps, functional=True),
            }
            if args.candidates:
                row["cand"] = run(
                    "distpddm", dim=dim, pool=pool, device=dev, reps=args.reps, candidates=args.candidates
                )
            rows.append(row)
            print(json.dumps(row), flush=True)

    def ms(x):
        return f"{x['seconds'] * 1e3:.1f}"

    header = (
        "| dim | pool (world) | distpddm ms | % of ResNet-50 | us/anchor | peak MiB | dense ms | dense / local "
        "| PML BatchHard+Triplet ms | functional kernel ms (% of ResNet-50) |"
    )
    if args.candidates:
        header += f" candidates={args.candidates} ms | % of ResNet-50 | exact hardest neg / quadruplet |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        loc = r["local"]
        line = (
            f"| {r['dim']} | {r['pool']} ({r['world']}) | {ms(loc)} | {100 * loc['seconds'] / resnet['seconds']:.2f}% "
            f"| {loc['seconds'] / ANCHORS * 1e6:.0f} | {loc['peak_mib']:.0f} | {ms(r['dense'])} "
            f"| {r['dense']['seconds'] / loc['seconds']:.0f}x | {ms(r['pml'])} "
            f"| {ms(r['functional'])} ({100 * r['functional']['seconds'] / resnet['seconds']:.2f}%) |"
        )
        if args.candidates:
            c = r["cand"]
            line += (
                f" {ms(c)} | {100 * c['seconds'] / resnet['seconds']:.2f}% "
                f"| {100 * c['exact_negative']:.0f}% / {100 * c['exact_quadruplet']:.0f}% |"
            )
        lines.append(line)
    print(f"\nResNet-50 step: {resnet['seconds'] * 1e3:.0f} ms\n")
    print("\n".join(lines))
    for dim in args.dims:
        per = {r["pool"]: r["local"]["seconds"] / ANCHORS for r in rows if r["dim"] == dim}
        pools = sorted(per)
        growth = [(per[b] / per[a]) / (b / a) for a, b in zip(pools, pools[1:], strict=False)]
        print(
            f"dim {dim}: per-anchor cost growth / pool growth between pools {pools}: "
            + ", ".join(f"{g:.2f}" for g in growth)
            + " (<= 1 means at most linear)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"resnet50": resnet, "rows": rows, "device": dev}, indent=1))


if __name__ == "__main__":
    main()
