"""The optimiser's parameter groups and the learning-rate schedule, both computed from the config.

The learning rate of a group at update ``s`` (0-based) is ``base_lr x multiplier(s)``; ``base_lr`` is always
the current config's (``optim.lr``, ``optim.head_lr``), the multiplier a :class:`Schedule`. A resumed run with
the same schedule settings continues the saved schedule exactly. One whose settings changed (``train.steps``,
``optim.warmup_steps``, ``optim.min_lr_ratio``) recomputes the rest from the config at the resumed step,
without a jump: a cosine from the multiplier the saved schedule had reached, down to the new floor at the new
last step (inside the new warm-up: a ramp from that multiplier to 1 at its end, then the cosine). Weight
decay and betas are re-applied from the config too (a checkpoint's optimiser state would otherwise bring the
old ones back).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from ..config import RunConfig

# timm's and open_clip's convention: biases, norm scales and shifts, and embeddings that are offsets rather
# than projections take no weight decay.
NO_DECAY_NAMES = (
    "pos_embedding",
    "class_token",
    "cls_token",
    "pos_embed",
    "relative_position_bias_table",
    "layer_scale",
)


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then cosine decay to ``floor`` at ``total``. After a ``restart`` (step, multiplier): a
    cosine from that multiplier to ``floor`` at ``total``; or, when the restart falls inside the warm-up, a
    linear ramp from that multiplier to 1 at the end of the warm-up, then the cosine."""

    warmup: int
    total: int
    floor: float
    restart: tuple[int, float] | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Schedule:
        return cls(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if self.restart is not None and step >= self.restart[0]:
            start, value = self.restart
            if start < self.warmup:  # resumed during warm-up: a ramp from where it stood, then the cosine
                if step < self.warmup:
                    return value + (1 - value) * (step - start) / (self.warmup - start)
            else:
                progress = min(1.0, (step - start) / max(1, self.total - start))
                return self.floor + (value - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def resumed(self, cfg: RunConfig, step: int) -> Schedule:
        """The schedule for a run resumed at ``step`` under ``cfg``, this one having been saved."""
        fresh = Schedule.from_config(cfg)
        if (fresh.warmup, fresh.total, fresh.floor) == (self.warmup, self.total, self.floor):
            return self  # unchanged: exactly the uninterrupted run's schedule
        return Schedule(fresh.warmup, fresh.total, fresh.floor, restart=(step, self(step)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        restart = d.get("restart")
        return cls(int(d["warmup"]), int(d["total"]), float(d["floor"]), tuple(restart) if restart else None)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES)


def param_groups(cfg: RunConfig, net: nn.Module, criterion: nn.Module) -> list[dict]:
    """Backbone at ``optim.lr``, new layers (embedding, PDDM unit) at ``optim.head_lr`` (10 x lr), each split
    into weights (``optim.weight_decay``) and biases / norm parameters (no decay). Every group is named and
    carries its ``base_lr``; empty groups are left out."""
    head_lr = cfg.optim.head_lr or 10 * cfg.optim.lr
    backbone = [(f"backbone.{n}", p) for n, p in net.backbone.named_parameters() if p.requires_grad]
    heads = [(f"embed.{n}", p) for n, p in net.embed.named_parameters() if p.requires_grad]
    heads += [(f"criterion.{n}", p) for n, p in criterion.named_parameters() if p.requires_grad]
    groups = []
    for part, lr, named in (("backbone", cfg.optim.lr, backbone), ("heads", head_lr, heads)):
        for kind, decay in (("decay", cfg.optim.weight_decay), ("no_decay", 0.0)):
            params = [p for n, p in named if _no_decay(n, p) == (kind == "no_decay")]
            if params:
                groups.append(
                    {"params": params, "name": f"{part}/{kind}", "lr": lr, "base_lr": lr, "weight_decay": decay}
                )
    return groups


def apply_config(optimizer, groups: list[dict], cfg: RunConfig) -> None:
    """Put the config's base learning rates, weight decay and betas into ``optimizer``'s groups (after a
    checkpoint's optimiser state replaced them with the saved run's)."""
    by_name = {g["name"]: g for g in groups}
    for group in optimizer.param_groups:
        mine = by_name[group["name"]]
        group.update(base_lr=mine["base_lr"], weight_decay=mine["weight_decay"], betas=tuple(cfg.optim.betas))


def set_learning_rates(optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
