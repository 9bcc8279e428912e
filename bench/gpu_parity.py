"""PDDMLoss on a device against the CPU: the same batch, the same weights, fp32; loss, gradients, quadruplets.

A fixed batch (``--n`` random unit embeddings of ``--dim`` numbers, ``--classes`` classes of n / classes
images, seeded) goes through two copies of one ``PDDMLoss`` in the paper's setting, one on the CPU and one on
``--device``. Compared: the loss, the gradient with respect to the embeddings and to every PDDM parameter
(``|a - b| <= atol + rtol * |b|``, b the CPU's), and the mined quadruplets ``(i, j, k, l)``, which must be
identical. TF32 is switched off for the CUDA matmuls (it rounds inputs to 10 bits of mantissa).

The JSON also gives ``min_margin``, the smallest gap, on the CPU, between a mined choice's score and the
runner-up's (over every anchor's j, k and l), beside ``score_max_abs_diff``, the largest difference between
the two devices' pair scores: identical quadruplets are guaranteed while the margin exceeds twice that. At
random init PDDM scores lie close together: the default batch (seed 0) has a margin of 5e-6, about 270
times fp32's rounding of these scores (2e-8 against fp64); seed 1 has a near-tie of 6e-9, which any
rounding difference may flip. With ``--device cpu`` both copies run on the CPU (trivially equal; the same
code path, for machines without a GPU). Usage::

    python bench/gpu_parity.py [--device cuda] [--n 256 --dim 128 --classes 64] [--out parity.json]

Prints one JSON object; exits 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distpddm import PDDMLoss  # noqa: E402
from distpddm.loss import PAPER_SETTING  # noqa: E402
from distpddm.miners import HardQuadrupletMiner  # noqa: E402


def _paper(dim: int) -> PDDMLoss:
    """The paper's setting, not the defaults: every anchor's j is an argmax too, and E_m's gradient reaches the
    embeddings, so the comparison covers every choice and every gradient path (the figures above are its)."""
    return PDDMLoss(dim, metric="pddm", miner=HardQuadrupletMiner("hardest"), **PAPER_SETTING)


def _batch(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n % classes:
        raise SystemExit(f"--n {n} is not a multiple of --classes {classes}")
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(n // classes)
    order = torch.randperm(n, generator=g)  # classes interleaved, as a real batch after gathering
    return feats[order].contiguous(), labels[order].contiguous()


def _run(crit: PDDMLoss, feats: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    x = feats.detach().clone().to(device).requires_grad_()  # a fresh leaf on each device
    crit.zero_grad(set_to_none=True)
    loss, stats = crit(x, labels.to(device))
    loss.backward()
    with torch.no_grad():
        q = crit.mine(F.normalize(x.detach(), dim=1), labels.to(device))
    out = {
        "loss": loss.detach().cpu().clone(),
        "grad/embeddings": x.grad.detach().cpu().clone(),
        "quadruplets": torch.stack([q.i, q.j, q.k, q.l]).cpu(),
        "count": int(stats["quadruplets"]),
    }
    for name, p in crit.named_parameters():
        out[f"grad/{name}"] = p.grad.detach().cpu().clone()
    return out


def _scores(crit: PDDMLoss, feats: torch.Tensor, device: str) -> torch.Tensor:
    """Every pair's score, as the miner computes them, back on the CPU."""
    with torch.no_grad():
        pool = F.normalize(feats.to(device), dim=1)
        return crit.scorer.pairwise(pool, pool).cpu()


def _margin(s: torch.Tensor, labels: torch.Tensor) -> float:
    """Smallest gap between the chosen and the second-best score of every anchor's j, k and l."""
    with torch.no_grad():
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(len(labels), dtype=torch.bool)
        # j: the lowest-scoring positive; k (and l, j's own k): the highest-scoring negative.
        low = s.masked_fill(~pos, float("inf")).topk(2, dim=1, largest=False).values
        high = s.masked_fill(same, float("-inf")).topk(2, dim=1).values
        gaps = torch.cat([low[:, 1] - low[:, 0], high[:, 0] - high[:, 1]])
    return float(gaps.min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls stay fp32 (TF32 rounds to 10 bits)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False

    feats, labels = _batch(args.n, args.dim, args.classes, args.seed)
    torch.manual_seed(args.seed)
    ref = _paper(args.dim)
    dev = _paper(args.dim).to(args.device)
    dev.load_state_dict(ref.state_dict())
    a = _run(ref, feats, labels, "cpu")
    b = _run(dev, feats, labels, args.device)

    compared = {}
    ok = True
    for key in [k for k in a if k == "loss" or k.startswith("grad/")]:
        want, got = a[key].double(), b[key].double()
        diff = (got - want).abs()
        bound = args.atol + args.rtol * want.abs()
        within = bool((diff <= bound).all())
        ok &= within
        compared[key] = {
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / want.abs().clamp_min(1e-12)).max()),
            "max_abs": float(want.abs().max()),
            "ok": within,
        }
    scores_cpu, scores_dev = _scores(ref, feats, "cpu"), _scores(dev, feats, args.device)
    score_diff = float((scores_dev.double() - scores_cpu.double()).abs().max())
    margin = _margin(scores_cpu, labels)
    qa, qb = a["quadruplets"], b["quadruplets"]
    same_shape = qa.shape == qb.shape
    same_q = same_shape and bool(torch.equal(qa, qb))
    differing = int((qa != qb).any(0).sum()) if same_shape else max(qa.shape[1], qb.shape[1])
    ok &= same_q and a["count"] == b["count"]
    result = {
        "check": "parity",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "reference": "cpu",
        "trivial": not args.device.startswith("cuda"),
        "note": (
            "CPU against CPU: trivially equal (up to the order of threaded sums), the same code path as the GPU check"
            if not args.device.startswith("cuda")
            else "GPU against CPU, fp32, TF32 off"
        ),
        "batch": {"n": args.n, "dim": args.dim, "classes": args.classes, "seed": args.seed},
        "metric": "pddm",
        "tolerance": {"rtol": args.rtol, "atol": args.atol, "rule": "|dev - cpu| <= atol + rtol * |cpu|"},
        "loss_cpu": float(a["loss"]),
        "loss_device": float(b["loss"]),
        "quadruplets": a["count"],
        "quadruplets_identical": same_q,
        "quadruplets_differing": differing,
        "min_margin": margin,
        "score_max_abs_diff": score_diff,
        "margin_over_score_diff": margin / score_diff if score_diff else None,
        "max_abs_diff": max(c["max_abs_diff"] for c in compared.values()),
        "compared": compared,
        "passed": ok,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
