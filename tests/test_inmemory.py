"""The in-memory trainer that the demo and the quality study use: its rate groups."""

import numpy as np
import pytest
import torch

from distpddm import PDDMLoss
from distpddm.config import ModelConfig
from distpddm.model import SmallCNN, create_model
from distpddm.train.inmemory import fit_in_memory


def _data(n_classes=6, k=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_classes * k, size, size), dtype=np.uint8)
    return images, np.repeat(np.arange(n_classes), k)


def test_backbone_lr_trains_the_backbone_at_its_own_rate():
    """A pretrained backbone at backbone_lr (0 here: it must not move), the new embedding layer at lr."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="small_cnn", embed_dim=8, small_cnn_width=4, in_channels=1))
    back0 = [p.detach().clone() for p in model.param_groups()[0]]
    embed0 = model.embed.weight.detach().clone()
    x, y = _data()
    crit = PDDMLoss(8, alpha=0.1, beta=0.1, positives="all")
    fit_in_memory(model, crit, x, y, x, y, steps=3, classes_per_batch=3, images_per_class=4, backbone_lr=0.0,
                  weight_decay=0.0, progress=False, recall_before=False, recall_after=False)  # fmt: skip
    assert all(torch.equal(a, b.detach()) for a, b in zip(back0, model.param_groups()[0], strict=True))
    assert not torch.equal(embed0, model.embed.weight.detach())


def test_backbone_lr_needs_a_model_with_rate_groups():
    x, y = _data()
    with pytest.raises(ValueError, match="param_groups"):
        fit_in_memory(SmallCNN(8, in_channels=1, width=4), PDDMLoss(8), x, y, x, y, steps=1, classes_per_batch=3,
                      backbone_lr=1e-4, progress=False)  # fmt: skip
