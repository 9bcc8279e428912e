"""A single-process training loop over images held in memory: the CPU demo, tests and loss comparisons.

It composes the same pieces as the distributed trainer (P x K batches, an embedding net, a pluggable
criterion) without Ray, DeepSpeed or shards, so a loss can be judged on real images in a minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.sampler import ClassBalancedBatches
from ..evaluate import embed, recall_at_k

#: ``criterion(embeddings, labels) -> loss`` or ``(loss, stats)`` (stats a dict of 0-d tensors).
Criterion = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, object]"]


@dataclass
class FitResult:
    recall_before: dict[int, float]
    recall_after: dict[int, float]
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    curve: dict[int, dict] = field(default_factory=dict)  # step -> ``evaluate(model)`` at the ``eval_at`` steps


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> float ``(N, C, H, W)`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def fit_in_memory(
    model: nn.Module,
    criterion: nn.Module | Criterion,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    steps: int = 300,
    classes_per_batch: int = 16,
    images_per_class: int = 4,
    lr: float = 1e-3,
    head_lr: float | None = None,
    backbone_lr: float | None = None,
    weight_decay: float = 1e-4,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    cosine: bool = False,
    augment: Callable[[Tensor], Tensor] | None = None,
    eval_at: tuple[int, ...] = (),
    evaluate: Callable[[nn.Module], dict] | None = None,
    recall_before: bool = True,
    recall_after: bool = True,
    device: str | torch.device | None = None,
) -> FitResult:
    """Train ``model`` with ``criterion`` on P x K batches; Recall@K on the test set before and after.

    The criterion's own parameters (a PDDM unit, say) train at ``head_lr`` (default ``lr``); with
    ``backbone_lr``, a model with ``param_groups()`` (:class:`~distpddm.model.EmbeddingNet`) trains its
    (pretrained) backbone at that rate and its new embedding layer at ``lr``. ``cosine``
    decays every rate to zero at ``steps``; ``augment`` maps a training batch before the network;
    ``evaluate(model)`` runs at the ``eval_at`` steps (the convergence curve). A criterion with
    ``set_step`` (PDDMLoss: its ``metric_grad_after`` and memory warm-up) is told the step before each call.
    ``device`` (default: where the model's parameters are) receives the model, the criterion and the training
    images, so a GPU run copies nothing per step but the batch indices.
    """
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    x_train, x_test = images_to_tensor(train_images).to(device), images_to_tensor(test_images)
    y_train = torch.from_numpy(np.asarray(train_labels, dtype=np.int64)).to(device)
    if backbone_lr is not None:
        if not hasattr(model, "param_groups"):
            raise ValueError("backbone_lr needs a model with param_groups() (an EmbeddingNet)")
        backbone, new = model.param_groups()
        groups = [{"params": backbone, "lr": backbone_lr}, {"params": new, "lr": lr}]
    else:
        groups = [{"params": list(model.parameters()), "lr": lr}]
    if isinstance(criterion, nn.Module) and any(True for _ in criterion.parameters()):
        groups.append({"params": list(criterion.parameters()), "lr": head_lr or lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    batches = ClassBalancedBatches(train_labels, classes_per_batch, images_per_class, seed=seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) if cosine else 1.0
    )
    curve: dict[int, dict] = {}

    before = recall_at_k(embed(model, x_test), test_labels, ks) if recall_before else {}
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="train", unit="step", leave=False)
    model.train()
    for step in bar:
        idx = torch.from_numpy(batches.next()).to(device)
        if hasattr(criterion, "set_step"):
            criterion.set_step(step)
        x = x_train[idx] if augment is None else augment(x_train[idx])
        out = criterion(model(x), y_train[idx])
        loss, stats = out if isinstance(out, tuple) else (out, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if evaluate is not None and step in eval_at:
            curve[step] = evaluate(model)
            model.train()
        if step % log_every == 0 or step == steps:
            row = {"step": float(step), "loss": float(loss.detach())}
            if stats is not None:
                row.update({k: float(v) for k, v in stats.items()})
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", spread=f"{row.get('spread', float('nan')):.3f}")
    seconds = time.perf_counter() - start
    after = recall_at_k(embed(model, x_test), test_labels, ks) if recall_after else {}
    return FitResult(before, after, steps, seconds, history, curve)
