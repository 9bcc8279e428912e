"""The in-memory trainer that the demo and the quality study use: its rate groups."""

import numpy as np
import pytest
import torch

from distpddm import HardQuadrupletMiner, PDDMLoss
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
    crit = PDDMLoss(8, alpha=0.1, beta=0.1, miner=HardQuadrupletMiner("all"))
    fit_in_memory(model, crit, x, y, x, y, steps=3, classes_per_batch=3, images_per_class=4, backbone_lr=0.0,
                  weight_decay=0.0, progress=False, recall_before=False, recall_after=False)  # fmt: skip
    assert all(torch.equal(a, b.detach()) for a, b in zip(back0, model.param_groups()[0], strict=True))
    assert not torch.equal(embed0, model.embed.weight.detach())


def test_backbone_lr_needs_a_model_with_rate_groups():
    x, y = _data()
    with pytest.raises(ValueError, match="param_groups"):
        fit_in_memory(SmallCNN(8, in_channels=1, width=4), PDDMLoss(8), x, y, x, y, steps=1, classes_per_batch=3,
                      backbone_lr=1e-4, progress=False)  # fmt: skip


def _fit(device, steps=4):
    torch.manual_seed(0)
    model = SmallCNN(8, in_channels=1, width=4)
    crit = PDDMLoss(8, alpha=0.1, beta=0.1, miner=HardQuadrupletMiner("all"))
    x, y = _data()
    res = fit_in_memory(model, crit, x, y, x, y, steps=steps, classes_per_batch=3, log_every=1, progress=False,
                        recall_before=False, recall_after=False, device=device)  # fmt: skip
    return model, crit, res


def test_device_receives_model_and_criterion():
    """``device`` moves the model and the PDDM unit; on the CPU an explicit device trains exactly as the default."""
    model, crit, res = _fit("cpu")
    _, _, default = _fit(None)
    assert next(model.parameters()).device.type == "cpu" and next(crit.parameters()).device.type == "cpu"
    assert [r["loss"] for r in res.history] == [r["loss"] for r in default.history]
    assert len(res.history) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_trains_there():
    model, crit, res = _fit("cuda")
    assert next(model.parameters()).is_cuda and next(crit.parameters()).is_cuda
    _, _, cpu = _fit("cpu")
    assert np.allclose([r["loss"] for r in res.history][:1], [r["loss"] for r in cpu.history][:1], rtol=1e-3)
