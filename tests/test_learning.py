"""PDDMLoss learns from random initialisation on real images (glyphs of real fonts, fonts disjoint)."""

import numpy as np
import pytest
import torch

from distpddm import HardQuadrupletMiner, PDDMLoss
from distpddm.data.glyphs import load_glyphs
from distpddm.evaluate import recall_at_k
from distpddm.loss import PAPER_SETTING
from distpddm.model import SmallCNN
from distpddm.train.inmemory import fit_in_memory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def glyphs():
    train, test = load_glyphs(max_fonts=160).split(0.5, seed=0)
    raw = recall_at_k(test.images.reshape(len(test), -1).astype(np.float32), test.labels)[1]
    return train, test, raw


@pytest.mark.parametrize(
    "kwargs",
    [{}, {**PAPER_SETTING, "miner": HardQuadrupletMiner("hardest")}],
    ids=["defaults", "paper-settings"],
)
def test_recall_rises_above_untrained_network_and_raw_pixels(glyphs, kwargs):
    train, test, raw = glyphs
    torch.manual_seed(0)
    torch.set_num_threads(2)
    criterion = PDDMLoss(64, **kwargs)
    result = fit_in_memory(
        SmallCNN(64),
        criterion,
        train.images,
        train.labels,
        test.images,
        test.labels,
        steps=400,
        progress=False,
        log_every=50,
    )
    before, after = result.recall_before[1], result.recall_after[1]
    assert after > max(before, raw) + 0.05, (before, raw, after)
    assert result.history[-1]["spread"] > 0.3  # the embedding did not collapse onto a point
