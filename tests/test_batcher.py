"""The P x K batcher and the per-epoch reader ranges: pure functions of labels and seeds."""

import random
from collections import Counter

import numpy as np
import pytest

from distpddm.data.batcher import PKBatcher
from distpddm.data.epochs import reader_ranges


def chunked_stream(sizes, chunk, seed=0):
    """Labels in the builder's layout: each class cut into chunks of ``chunk``, chunk order shuffled."""
    chunks = [(c, min(chunk, n - s)) for c, n in enumerate(sizes) for s in range(0, n, chunk)]
    random.Random(seed).shuffle(chunks)
    return [c for c, m in chunks for _ in range(m)]


def run(labels, P, K, buffer, seed=0):
    """Every batch of one pass (with the end-of-stream flush), and the most samples ever held."""
    b = PKBatcher(P, K, buffer, np.random.default_rng(seed))
    batches, peak = [], 0
    for p, label in enumerate(labels):
        batches += b.push(p, label)
        peak = max(peak, b.held)
        b.dropped.clear()
    batches += b.finish()
    return batches, peak, b


def check_shape(batches, labels, P, K):
    for batch in batches:
        counts = Counter(labels[p] for p in batch)
        assert len(batch) == P * K and len(counts) == P and set(counts.values()) == {K}
        classes = [labels[p] for p in batch]
        assert classes == sorted(classes, key=classes.index)  # each class's K samples are contiguous


def test_long_tailed_classes_never_stall_and_most_samples_are_used():
    # The case: 52 classes of 10 .. 400 images in chunks of 4, P=16, K=4, buffer 512. The old batcher
    # stopped after 33 batches: big classes filled the buffer and every small class was evicted before K.
    sizes = [int(10 * 40 ** (i / 51)) for i in range(52)]
    for seed in range(3):
        labels = chunked_stream(sizes, 4, seed)
        batches, peak, b = run(labels, 16, 4, 512, seed)
        check_shape(batches, labels, 16, 4)
        assert peak <= 512
        assert len({p for batch in batches for p in batch}) == 64 * len(batches)  # no sample twice
        assert b.stats.used == 64 * len(batches) and b.stats.used + b.stats.dropped == len(labels)
        assert len(batches) >= 0.9 * len(labels) / 64  # 94% of samples used here


def test_sampling_is_proportional_to_class_size_with_one_group_per_batch():
    sizes = [int(10 * 40 ** (i / 51)) for i in range(52)]
    labels = chunked_stream(sizes, 4, seed=1)
    batches, _, _ = run(labels, 16, 4, 512, seed=1)
    used = Counter(labels[p] for batch in batches for p in batch)
    usable = np.array([4 * (n // 4) for n in sizes])  # a remainder smaller than K can never fill a group
    fraction = np.array([used[c] for c in range(len(sizes))]) / usable
    # Every class, small or large, is used for about the same share of its images (proportional sampling);
    # beyond the remainders, what is lost is the surplus of the largest classes.
    assert fraction.min() >= 0.8, fraction.round(2)
    assert used[51] > 30 * used[0]  # the 400-image class is drawn far more often than the 10-image one


def test_a_dominant_class_is_capped_and_small_classes_still_batch():
    # 16 classes of 4 images and one of 20,000, in a 256-sample buffer: only batching the small classes
    # together works, and the big one must not crowd them out of the buffer.
    sizes = [4] * 16 + [20_000]
    labels = chunked_stream(sizes, 4, seed=0)
    batches, peak, _ = run(labels, 16, 4, 256)
    check_shape(batches, labels, 16, 4)
    assert peak <= 256 and len(batches) >= 1


def test_classes_smaller_than_k_are_dropped_not_waited_for():
    labels = chunked_stream([3] * 500 + [8] * 40, 4, seed=0)  # 500 classes that can never make K = 4
    batches, peak, b = run(labels, 8, 4, 128)
    check_shape(batches, labels, 8, 4)
    assert peak <= 128 and len(batches) >= 8 and b.stats.dropped >= 1500  # 40 x 8 / 32 = at most 10 batches


def test_ten_thousand_classes_with_bounded_memory():
    labels = chunked_stream([8] * 10_000, 4, seed=0)
    batches, peak, b = run(labels, 16, 4, 512)
    check_shape(batches[:50], labels, 16, 4)
    assert peak <= 512
    assert b.stats.used >= 0.99 * len(labels)  # almost nothing dropped when every chunk is a whole group


def test_fewer_than_p_classes_with_k_images_form_no_batch():
    labels = chunked_stream([10] * 7 + [2] * 30, 4)
    batches, _, b = run(labels, 8, 4, 64)
    assert batches == [] and b.stats.dropped == len(labels) and b.held == 0


def test_batches_are_a_function_of_labels_and_seed():
    labels = chunked_stream([int(5 * 20 ** (i / 99)) for i in range(100)], 4, seed=3)
    first, _, _ = run(labels, 8, 4, 256, seed=5)
    second, _, _ = run(labels, 8, 4, 256, seed=5)
    other, _, _ = run(labels, 8, 4, 256, seed=6)
    assert first == second and first != other


def test_groups_of_k_are_drawn_from_a_class_s_waiting_samples_differently_each_epoch():
    """Shards store a class in chunks of K: taking the K that came first would pair each image with the same
    K - 1 positives in every epoch."""
    labels = [c for c in range(6) for _ in range(8)]  # each class arrives whole: 8 waiting, K = 2

    def groups(seed: int) -> set[frozenset[int]]:
        batcher, batches = PKBatcher(P=2, K=2, buffer=64, rng=np.random.default_rng(seed)), []
        for position, label in enumerate(labels):
            batches += batcher.push(position, label)
        batches += batcher.finish()
        assert sorted(p for b in batches for p in b) == sorted(set(p for b in batches for p in b))  # once each
        return {frozenset(b[i : i + 2]) for b in batches for i in range(0, len(b), 2)}

    first, second = groups(0), groups(1)
    assert all(len({labels[p] for p in g}) == 1 for g in first | second)  # a group is one class
    assert groups(0) == first and first != second  # a function of the seed, which changes with the epoch
    arrival = {frozenset((p, p + 1)) for p in range(0, len(labels), 2)}  # whole chunks, in arrival order
    assert not first <= arrival and not second <= arrival


def test_batcher_checks_its_arguments():
    with pytest.raises(ValueError, match="at least one batch"):
        PKBatcher(8, 4, 16, np.random.default_rng(0))


@pytest.mark.parametrize("counts", [[100, 37, 5, 0, 64, 12], [7, 9], [1000]])
@pytest.mark.parametrize("readers", [1, 3, 4, 16])
def test_reader_ranges_cover_every_sample_once_per_epoch(counts, readers):
    total = sum(counts)
    for epoch in range(3):
        seen = Counter()
        sizes = []
        for reader in range(readers):
            ranges = reader_ranges(counts, seed=11, epoch=epoch, reader=reader, readers=readers)
            sizes.append(sum(hi - lo for _, lo, hi in ranges))
            for shard, lo, hi in ranges:
                assert 0 <= lo < hi <= counts[shard]
                seen.update((shard, n) for n in range(lo, hi))
        assert len(seen) == total and set(seen.values()) <= {1}  # disjoint, and none missing
        assert max(sizes) - min(sizes) <= 1  # balanced by samples, even with fewer shards than readers


def test_reader_ranges_change_with_the_epoch_and_seed_only():
    counts = [50] * 20
    a = reader_ranges(counts, seed=1, epoch=0, reader=2, readers=8)
    assert a == reader_ranges(counts, seed=1, epoch=0, reader=2, readers=8)
    assert a != reader_ranges(counts, seed=1, epoch=1, reader=2, readers=8)
    assert a != reader_ranges(counts, seed=2, epoch=0, reader=2, readers=8)


def _never_placed(labels, ranges, epochs=20, readers=1):
    """Samples of a one-shard split that no batch took in ``epochs`` epochs, read by ``ranges``."""
    uses = np.zeros(len(labels), dtype=int)
    for epoch in range(epochs):
        for reader in range(readers):
            b = PKBatcher(8, 4, 8 * 8 * 4, np.random.default_rng([epoch, reader]))
            order = [n for _, lo, hi in ranges([len(labels)], 0, epoch, reader, readers) for n in range(lo, hi)]
            for batch in [x for n in order for x in b.push(n, labels[n])] + b.finish():
                uses[batch] += 1
    return int((uses == 0).sum())


@pytest.mark.parametrize("readers", [1, 2])
def test_a_one_shard_split_is_cut_anew_each_epoch_so_the_batcher_leaves_out_other_samples_each_time(readers):
    """Read alike every epoch, a class's last short chunk and a large class's trimmed surplus were the same
    samples every epoch: never trained on (docs/benchmarks.md, "Positive pairs")."""

    def fixed(counts, seed, epoch, reader, readers):
        return reader_ranges(counts, seed, epoch, reader, readers, moving_cut=False)

    sizes = [400, 120, 90] + [30] * 6 + [14, 13, 11, 10, 10, 10, 10, 10] * 2  # long-tailed, like the clip art
    labels = chunked_stream(sizes, 4, seed=3)
    before, now = _never_placed(labels, fixed, readers=readers), _never_placed(labels, reader_ranges, readers=readers)
    assert now <= 0.03 * len(labels) and now < before / 3, (before, now)  # 199 -> 17, 107 -> 24 of 966
    starts = {reader_ranges([len(labels)], 0, epoch, 0, 2)[0][1] for epoch in range(5)}
    assert len(starts) == 5  # the first reader starts somewhere else each epoch


def _groups(labels, K, seed):
    b = PKBatcher(8, K, 8 * 8 * K, np.random.default_rng(seed))
    batches = [batch for p, label in enumerate(labels) for batch in b.push(p, label)] + b.finish()
    return {tuple(sorted(batch[g : g + K])) for batch in batches for g in range(0, len(batch), K)}


@pytest.mark.parametrize("chunk, repeats", [(4, True), (8, False)])
def test_with_many_classes_chunks_of_2k_give_new_positives_each_epoch_and_chunks_of_k_do_not(chunk, repeats):
    """Two epochs read the same stored order (one shard), each with its own batcher generator: with 500 classes
    a class waits with one chunk, taken whole when it is exactly K (the default is 2 K: bench/chunk_groups.py)."""
    labels = chunked_stream([16] * 500, chunk)
    first, second = _groups(labels, 4, seed=0), _groups(labels, 4, seed=1)
    repeated = len(first & second) / len(second)
    assert (repeated > 0.5) if repeats else (repeated < 0.1), repeated


@pytest.mark.parametrize(
    "chunk, K, warned",
    [
        (2, 4, "< data.images_per_class"),
        (4, 4, "same positives"),
        (6, 4, "same positives"),
        (8, 4, None),
        (12, 4, "overflow"),
        (4, 2, None),
        (8, 2, "overflow"),  # the default chunk for a K = 2 run: build with --chunk-size 4
    ],
)
def test_the_trainer_says_when_the_chunk_size_is_not_about_2k(chunk, K, warned, caplog):
    from distpddm.config import from_dict
    from distpddm.data.stream import ShardSet
    from distpddm.train.trainer import _warn_about_split

    cfg = from_dict({"data": {"images_per_class": K}})
    shard_set = ShardSet(["a.tar"], [str(c) for c in range(1000)], 10**6, [10**6], chunk_size=chunk)
    with caplog.at_level("WARNING", logger="distpddm.train"):
        _warn_about_split(cfg, shard_set, world=1)
    if warned:
        assert warned in caplog.text and f"--chunk-size {2 * K}" in caplog.text
    else:
        assert "chunk-size" not in caplog.text
    few = ShardSet(["a.tar"], [str(c) for c in range(20)], 10**6, [10**6], chunk_size=chunk)
    caplog.clear()
    with caplog.at_level("WARNING", logger="distpddm.train"):
        _warn_about_split(cfg, few, world=1)
    assert "same positives" not in caplog.text and "overflow" not in caplog.text  # few classes: room either way
