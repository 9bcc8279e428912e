"""bench/foreign_memory.py measures the product's reader on a split it writes itself: that split must be one
the product reads as `distpddm shards index` would have written it, with the classes and shards asked for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench" / "foreign_memory.py"


def test_the_synthetic_split_is_read_by_the_product_as_asked(tmp_path):
    from distpddm.data.foreign import ForeignPKDataset

    spec = importlib.util.spec_from_file_location("foreign_memory_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counts = bench.long_tail(3000, 40)
    assert counts.sum() == 3000 and counts.min() >= 1 and counts.max() > 5 * np.median(counts)  # long-tailed
    split = bench.write_split(tmp_path / "s", 3000, 40, 7)
    ds = ForeignPKDataset(str(split), 4, 2, image_size=16, seed=0)
    assert len(ds.split) == 3000 and len(ds.split.names) == 7
    assert ds.split.class_counts.tolist() == counts.tolist()
    batch = next(iter(ds))  # real bytes read and decoded
    assert batch.images.shape == (8, 3, 16, 16) and len(set(batch.labels.tolist())) == 4
