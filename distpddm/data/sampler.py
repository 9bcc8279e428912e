"""Class-balanced P x K batches from labels held in memory (the streaming version lives in data/shards)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ClassBalancedBatches:
    """Endless batches of ``classes_per_batch`` classes x ``images_per_class`` images, as index arrays.

    Classes with fewer than K images are sampled with replacement inside the class; every class is used
    once before any repeats (classes are drawn epoch by epoch without replacement).
    """

    def __init__(self, labels: np.ndarray, classes_per_batch: int, images_per_class: int, seed: int = 0):
        labels = np.asarray(labels).reshape(-1)
        if images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2 so every anchor has a positive, got {images_per_class}")
        classes, inverse = np.unique(labels, return_inverse=True)
        if classes_per_batch < 2 or classes_per_batch > len(classes):
            raise ValueError(
                f"classes_per_batch must be between 2 and the {len(classes)} classes present, got {classes_per_batch}"
            )
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
        self.members = [order[bounds[c] : bounds[c + 1]] for c in range(len(classes))]
        self.P, self.K = classes_per_batch, images_per_class
        self.rng = np.random.default_rng(seed)
        self._class_queue: list[int] = []

    def _next_classes(self) -> list[int]:
        while len(self._class_queue) < self.P:
            self._class_queue.extend(self.rng.permutation(len(self.members)).tolist())
        picked, self._class_queue = self._class_queue[: self.P], self._class_queue[self.P :]
        if len(set(picked)) < self.P:  # an epoch boundary repeated a class: redraw the batch's classes
            picked = self.rng.choice(len(self.members), self.P, replace=False).tolist()
        return picked

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next()

    def next(self) -> np.ndarray:
        idx = []
        for c in self._next_classes():
            m = self.members[c]
            idx.append(self.rng.choice(m, self.K, replace=len(m) < self.K))
        return np.concatenate(idx)
