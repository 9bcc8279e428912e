"""Evaluation reading and extraction: every sample once, balanced by samples, merged back in split order."""

import logging

import numpy as np
import pytest
import torch

from distpddm.data.epochs import split_ranges
from distpddm.data.evalset import EvalDataset
from distpddm.data.shards import BuildOptions, build
from distpddm.data.sources import read_source
from distpddm.data.stream import resolve_shards
from distpddm.data.tarindex import idx_name, load_shard_index
from distpddm.extract import embed_split, load_embeddings, merge_parts, part_path
from tests import fixtures


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    images = fixtures.glyph_images(9, 7, root / "cache")  # 63 samples: not divisible by 2, 4 or 8
    fixtures.make_folder(root / "src", images)
    build(read_source("folder", root / "src"), root / "out", BuildOptions(shard_bytes=9_000, progress=False))
    return root / "out" / "train"


def _truth(split_dir):
    s = resolve_shards(split_dir)
    return np.concatenate([load_shard_index(idx_name(u)).labels for u in s.urls])


def _read(split_dir, world, workers, **kw):
    seen = []
    for rank in range(world):
        ds = EvalDataset(split_dir, image_size=16, rank=rank, world=world, **kw)
        loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers)
        for _, y, p, k in loader:
            seen += [(rank, int(a), int(b), c) for a, b, c in zip(y, p, k, strict=True)]
    return seen


def test_every_sample_once_over_2_ranks_and_2_workers_in_split_order(split):
    seen = _read(split, world=2, workers=2)
    truth = _truth(split)
    positions = sorted(p for _, _, p, _ in seen)
    assert positions == list(range(len(truth)))
    assert all(truth[p] == y for _, y, p, _ in seen)
    assert len({k for *_, k in seen}) == len(truth)  # keys unique
    rank0 = [p for r, _, p, _ in seen if r == 0]
    assert max(rank0) < min(p for r, _, p, _ in seen if r == 1)  # each rank a contiguous run of the split


def test_readers_are_balanced_by_samples_not_by_shards():
    counts = [500, 20]  # two shards, 64 readers: each still gets 8 or 9 samples
    sizes = [sum(hi - lo for _, lo, hi in split_ranges(counts, r, 64)) for r in range(64)]
    assert sum(sizes) == 520 and max(sizes) - min(sizes) <= 1 and min(sizes) == 8


def test_a_limit_caps_the_whole_split_not_each_rank(split):
    seen = _read(split, world=2, workers=2, limit=20)
    assert sorted(p for _, _, p, _ in seen) == list(range(20))
    assert {r for r, *_ in seen} == {0, 1}


def test_a_corrupt_image_is_skipped_and_named(tmp_path, caplog):
    images = fixtures.glyph_images(2, 3, tmp_path / "cache")
    samples = [(n % 2, fixtures.jpeg_bytes(images[n % 2][n // 2]) if n != 4 else b"garbage") for n in range(6)]
    fixtures.write_shards(tmp_path / "e", samples, per_shard=6)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        got = [p for _, _, p, _ in EvalDataset(tmp_path / "e", image_size=16, max_skip_rate=0.5)]
    assert got == [0, 1, 2, 3, 5]
    assert "e/shard-000000.tar:s0000000004" in caplog.text


class _Net(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.normalize(x.float().mean(dim=(2, 3)) + 1e-3 * x.float()[:, :, 0, :3].sum(-1), dim=1)


def test_extraction_over_2_ranks_merges_in_split_order(split, tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    net = _Net()
    for rank in range(2):
        ds = EvalDataset(split, image_size=16, rank=rank, world=2)
        embed_split(net, ds, device=torch.device("cpu"), batch_size=4, workers=2).save(part_path(out, rank))
    n = merge_parts(out, 2)
    emb, labels, keys = load_embeddings(out)
    whole = embed_split(net, EvalDataset(split, image_size=16, rank=0, world=1), device=torch.device("cpu"), workers=0)
    assert n == len(whole.labels) == len(_truth(split))
    assert np.array_equal(labels, _truth(split)) and np.array_equal(keys, whole.keys)
    np.testing.assert_allclose(emb, whole.embeddings, rtol=1e-6, atol=1e-7)
    assert not list(out.glob("part-*"))


def test_a_rank_with_no_rows_still_has_the_embedding_width(split):
    ds = EvalDataset(split, image_size=16, limit=1, rank=0, world=2)  # the one sample goes to rank 1
    part = embed_split(_Net(), ds, device=torch.device("cpu"), workers=0, dim=3)
    assert part.embeddings.shape == (0, 3) and len(part.labels) == len(part.keys) == 0


def test_merge_and_load_refuse_broken_inputs(split, tmp_path):
    part = embed_split(_Net(), EvalDataset(split, image_size=16, limit=6), device=torch.device("cpu"), workers=0)
    for rank in range(2):  # the same samples twice
        part.save(part_path(tmp_path, rank))
    with pytest.raises(ValueError, match=r"samples embedded more than once \(split positions \[0, 1"):
        merge_parts(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="parts missing .*part-00002.npz"):
        merge_parts(tmp_path, 3)
    part_path(tmp_path, 1).unlink()
    merge_parts(tmp_path, 1)
    np.save(tmp_path / "labels.npy", np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="6 embedding rows but 5 labels"):
        load_embeddings(tmp_path)
    with pytest.raises(FileNotFoundError, match="no embeddings.npy"):
        load_embeddings(tmp_path / "nowhere")
