"""Evaluation as a product: ``distpddm eval`` (distributed extraction, retrieval metrics, clustering,
transfer to unseen classes, PDDM re-ranking, a report). The metrics themselves are in :mod:`.retrieval`,
re-ranking in :mod:`.rerank`, the page in :mod:`.report`; the trainer's periodic validation, which reads and
measures the same way, in :mod:`.validation`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .dist import agree, barrier, init_device, rank_and_world
from .durable import atomic_write_text
from .errors import DeterministicError


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 2, 4, 8)) -> dict[int, float]:
    """``{K: Recall@K}`` with every image a query against all the others (:func:`retrieval.retrieval_metrics`;
    singletons are not queries)."""
    from .retrieval import retrieval_metrics

    try:
        figures = retrieval_metrics(embeddings, labels, ks)
    except ValueError as e:
        raise ValueError(f"Recall@K: {e}") from None
    return {int(k): figures[f"recall@{k}"] for k in ks}


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Embeddings of ``images`` in eval mode, L2-normalised (as at search time)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [
        torch.nn.functional.normalize(model(images[s : s + batch_size].to(device)), dim=1).float().cpu()
        for s in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------- distpddm eval

RECALL_KS = (1, 2, 4, 8, 16, 32)
SOURCE = "source.json"  # in an extraction folder: which model and split it came from


class EvalError(DeterministicError, ValueError):
    """Evaluation input that cannot be used (the message is one line and names it)."""


def resolve_model(run_or_model: str | Path) -> tuple[Path, Path | None]:
    """(model.pt, the run folder or None) for a run folder or a model file."""
    p = Path(run_or_model)
    if p.is_dir():
        model = p / "model.pt"
        if not model.is_file():
            raise EvalError(
                f"{p}: no exported model (model.pt is written when a run finishes; a checkpoint folder's "
                "model.pt also works)"
            )
        return model, p
    if not p.is_file():
        raise EvalError(f"{p}: neither a run folder nor a model file")
    return p, (p.parent if (p.parent / "metrics.jsonl").is_file() else None)


def _checkpoint_run(model: Path) -> tuple[Path, str] | None:
    """(the run folder, the checkpoint's name) for a model.pt inside a run's checkpoint folder
    (``checkpoints/step-N`` of ``--local``, Ray's ``checkpoint_<time>``), whose folder pruning deletes."""
    folder = model.parent
    if folder.parent.name == "checkpoints" and folder.name.startswith("step-"):
        return folder.parent.parent, folder.name
    if folder.name.startswith("checkpoint_"):
        return folder.parent, folder.name
    return None


def default_out(model: Path, run: Path | None, shards: str) -> Path:
    """Where ``distpddm eval`` writes without ``--out``: ``eval-<split>`` in the run folder (for a checkpoint's
    model, in the run folder beside it, ``eval-<split>-<checkpoint>``: pruning would delete it inside); when
    that folder holds the results of another split of the same name, a name with the split's digest."""
    import hashlib

    split = Path(str(shards).rstrip("/")).name
    inside = _checkpoint_run(Path(model).resolve())
    base, name = (inside[0], f"eval-{split}-{inside[1]}") if inside else ((run or model.parent), f"eval-{split}")
    out = Path(base) / name
    where = str(shards) if "://" in str(shards) else str(Path(shards).resolve())
    source = out / SOURCE
    if source.is_file() and json.loads(source.read_text()).get("shards") not in (None, where):
        out = out.with_name(f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}")
    return out


FAILED = "failed.json"  # in the output folder: the workers' agreed error, for the driver to raise in one line


def _eval_worker(config: dict) -> None:
    """One rank of a distributed extraction (a Ray Train worker, or the only process with ``--local``). An
    error a retry cannot fix is agreed by every rank; on Ray, rank 0 leaves it in :data:`FAILED` and the
    workers return, so Ray spends no retry on it and the driver says it in one line."""
    import pickle

    rank, world = rank_and_world()
    device = init_device(config["gpu"])
    error = None
    try:
        _embed_part(config, rank, world, device)
    except DeterministicError as e:
        error = e
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:  # a model or split this rank cannot read
        error = EvalError(f"{type(e).__name__}: {e}")
    try:
        agree(error, device)
    except DeterministicError as e:
        if not config.get("on_ray"):
            raise
        if rank == 0:
            atomic_write_text(Path(config["out"]) / FAILED, json.dumps({"error": type(e).__name__, "message": str(e)}))
        return
    barrier()


def _embed_part(config: dict, rank: int, world: int, device: torch.device) -> None:
    from .data.evalset import eval_dataset
    from .extract import embed_split, part_path
    from .model import load_exported

    net = load_exported(config["model"]).to(device)
    if config.get("bf16"):
        net.backbone_dtype = torch.bfloat16
    dataset = eval_dataset(
        config["shards"], config["image_size"], config["max_skip_rate"], limit=config["limit"], rank=rank, world=world
    )
    part = embed_split(
        net,
        dataset,
        device=device,
        batch_size=config["batch_size"],
        workers=config["loader_workers"],
        progress=config["progress"] and rank == 0,
    )
    part.save(part_path(config["out"], rank))


def extract(
    model: Path,
    shards: str,
    out: Path,
    *,
    local: bool = True,
    workers: int = 2,
    gpu: bool = False,
    address: str | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    loader_workers: int = 2,
    limit: int | None = None,
    max_skip_rate: float = 0.01,
    progress: bool = True,
) -> int:
    """Embed every sample of ``shards`` once (this process, or ``workers`` Ray workers) into ``out``."""
    from .data.stream import resolve_shards
    from .extract import merge_parts, write_json
    from .model import exported_image_size

    out.mkdir(parents=True, exist_ok=True)
    if "://" not in str(shards):  # Ray workers start in other directories, and source.json outlives the cwd
        shards = str(Path(shards).expanduser().resolve())
    split = resolve_shards(shards)
    if split.counts is None and not split.foreign:
        raise EvalError(f"{shards}: not a split folder with index.json (build it with `distpddm shards build`)")
    size = image_size or exported_image_size(model)
    if size is None:
        raise EvalError(f"{model} does not record its image size: pass --image-size")
    config = {
        "model": str(Path(model).resolve()),
        "shards": str(shards),
        "out": str(out.resolve()),
        "gpu": gpu,
        "bf16": gpu,
        "image_size": int(size),
        "batch_size": batch_size,
        "loader_workers": loader_workers,
        "limit": limit,
        "max_skip_rate": max_skip_rate,
        "progress": progress,
    }
    for stale in [*out.glob("part-*.npz"), out / FAILED]:
        stale.unlink(missing_ok=True)
    if local:
        _eval_worker(config)
        world = 1
    else:
        world = _extract_on_ray(config, workers, gpu, address)
    n = merge_parts(out, world)
    write_json(out / SOURCE, {"model": config["model"], "shards": str(shards), "image_size": int(size), "rows": n})
    return n


def _extract_on_ray(config: dict, workers: int, gpu: bool, address: str | None) -> int:
    import ray

    from .ray_cluster import connect_ray, fit, torch_trainer

    started_here = connect_ray(address, workers)
    trainer = torch_trainer(
        _eval_worker, config | {"on_ray": True}, name="extract", storage_path=str(Path(config["out"]) / "ray"),
        num_workers=workers, use_gpu=gpu,
    )  # fmt: skip
    try:
        fit(trainer)
    finally:
        if started_here:
            ray.shutdown()
    failed = Path(config["out"]) / FAILED
    if failed.is_file():
        raise EvalError(json.loads(failed.read_text())["message"])
    return workers


def check_embeddings(emb: np.ndarray, labels: np.ndarray) -> None:
    """One-line errors for embeddings no metric can be computed on."""
    if len(emb) != len(labels):
        raise EvalError(f"{len(emb)} embedding rows but {len(labels)} labels")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise EvalError(
            f"{int(bad.sum())} of {len(emb)} embeddings hold NaN or infinite values "
            f"(first row {int(np.flatnonzero(bad)[0])})"
        )
    if len(emb) < 2:
        raise EvalError(f"{len(emb)} sample(s): retrieval needs at least two")
    if np.bincount(np.unique(labels, return_inverse=True)[1]).max() < 2:
        raise EvalError("every class has fewer than two samples: no image has a same-class match to retrieve")


def evaluate_folder(
    folder: Path,
    out: Path,
    *,
    ks: Sequence[int] = RECALL_KS,
    r_cap: int | None = None,
    support: int | None = None,
    rerank_n: int | None = 8,
    nmi: bool = True,
    report: bool = True,
    grid: int = 12,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Metrics (and the report) of an extraction folder: ``out/metrics.json``, ``out/report.html``."""
    from . import retrieval
    from .extract import load_embeddings, write_json
    from .model import load_exported_metric

    emb, labels, keys = load_embeddings(folder)
    check_embeddings(emb, labels)
    source = json.loads((folder / SOURCE).read_text()) if (folder / SOURCE).is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(progress)
    kwargs = {} if r_cap is None else {"r_cap": r_cap}
    with steps("retrieval"):
        metrics = retrieval.retrieval_metrics(emb, labels, ks, **kwargs)
    if nmi:
        with steps("clustering (NMI)"):
            metrics["nmi"] = float(retrieval.clustering_nmi(emb, labels, seed=seed))
    if support:
        with steps("transfer"):
            try:
                transfer = retrieval.transfer_accuracy(emb, labels, support=support, seed=seed)
            except ValueError as e:
                raise EvalError(str(e)) from None
            # Its counts are its own (queries = images beyond the support): kept apart from retrieval's.
            metrics |= {k if k.startswith(("ncm_", "knn_")) else f"transfer_{k}": v for k, v in transfer.items()}
    scorer = None
    model = source.get("model")
    if model and Path(model).is_file():
        scorer = load_exported_metric(model)
    if scorer is not None and type(scorer).__name__ == "Euclidean":
        scorer = None  # trained with the Euclidean metric: nothing learned to re-rank with
    if rerank_n:
        rerank_n = min(rerank_n, len(emb) - 1)
    if scorer is not None and rerank_n:
        from .rerank import rerank

        with steps(f"re-ranking the top {rerank_n} with the learned metric"):
            metrics |= rerank(emb, labels, scorer, top_n=rerank_n, ks=[k for k in ks if k <= rerank_n])
    metrics["settings"] = {
        "embeddings": str(folder),
        "model": model,
        "shards": source.get("shards"),
        "ks": list(ks),
        "support": support,
        "rerank": rerank_n if scorer is not None else None,
        "seed": seed,
    }
    write_json(out / "metrics.json", metrics)
    if report:
        with steps("report"):
            _write_report(out, metrics, emb, labels, keys, scorer, source, ks, rerank_n, grid, seed)
    return metrics


def _write_report(out, metrics, emb, labels, keys, scorer, source, ks, rerank_n, grid, seed) -> None:
    from .report import write_report
    from .rerank import pair_similarities
    from .retrieval import search

    curves = {"euclidean": {k: metrics[f"recall@{k}"] for k in ks if f"recall@{k}" in metrics}}
    if scorer is not None and rerank_n:
        curves[f"rerank@{rerank_n} (learned metric)"] = {
            k: metrics[f"rerank@{rerank_n}/recall@{k}"] for k in ks if f"rerank@{rerank_n}/recall@{k}" in metrics
        }
    similarities = pair_similarities(emb, labels, scorer, seed=seed)
    retrievals = None
    shards = source.get("shards")
    if shards and grid:
        from .data.evalset import read_images
        from .data.stream import resolve_shards

        names = resolve_shards(shards).classes or []

        rng = np.random.default_rng(seed)
        counts = np.bincount(np.unique(labels, return_inverse=True)[1])[np.unique(labels, return_inverse=True)[1]]
        candidates = np.flatnonzero(counts > 1)
        queries = np.sort(rng.choice(candidates, size=min(grid, len(candidates)), replace=False))
        dists, nn_idx = search(emb[queries], emb, min(8, len(emb) - 1), query_ids=queries)
        positions = np.load(Path(metrics["settings"]["embeddings"]) / "positions.npy")
        wanted = np.concatenate([queries, nn_idx.reshape(-1)])
        images = dict(zip(wanted.tolist(), read_images(shards, positions[wanted]), strict=True))
        retrievals = [
            {
                "query": {"image": images[int(q)], "label": _name(names, labels[q]), "key": str(keys[q])},
                "neighbours": [
                    {
                        "image": images[int(n)],
                        "label": _name(names, labels[n]),
                        "correct": bool(labels[n] == labels[q]),
                        "distance": float(np.sqrt(max(d, 0.0))),
                    }  # fmt: skip
                    for n, d in zip(nn_idx[i], dists[i], strict=True)
                ],
            }
            for i, q in enumerate(queries)
        ]
    run = Path(source["model"]).parent if source.get("model") else None
    training = run / "metrics.jsonl" if run is not None and (run / "metrics.jsonl").is_file() else None
    write_report(
        out,
        metrics,
        recall_curves=curves,
        similarities=similarities,
        retrievals=retrievals,
        training_metrics=training,
    )


def _name(names: list, label) -> str:
    return str(names[int(label)]) if 0 <= int(label) < len(names) else str(label)


class _Steps:
    """Names each stage of an evaluation as it starts and says how long it took (stderr)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, name: str):
        import contextlib
        import sys
        import time

        @contextlib.contextmanager
        def step():
            t0 = time.perf_counter()
            if self.enabled:
                print(f"eval: {name} ...", file=sys.stderr, flush=True)
            yield
            if self.enabled:
                print(f"eval: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

        return step()
