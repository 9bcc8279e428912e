"""Embedding networks. ``SmallCNN`` trains on a laptop CPU; torchvision backbones come with the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """Four conv blocks, global average + max pooling, a linear embedding layer.

    ``norm="group"`` (or ``"none"``) has no cross-sample layer, so an N-worker step equals a one-process
    step on the concatenated batch exactly; batch norm would need synchronising for that.
    """

    def __init__(self, embed_dim: int = 64, in_channels: int = 1, width: int = 32, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        chans = [in_channels, width, width * 2, width * 4, width * 4]
        blocks = []
        for n, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU()]
            if n < len(chans) - 2:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.embed = nn.Linear(2 * chans[-1], embed_dim)
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        pooled = F.adaptive_avg_pool2d(h, 1).flatten(1), F.adaptive_max_pool2d(h, 1).flatten(1)
        return self.embed(torch.cat(pooled, dim=1))
