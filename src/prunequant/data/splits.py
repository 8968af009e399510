"""Deterministic, seeded, stratified index splits and subsets."""

from __future__ import annotations

import numpy as np


def stratified_holdout(
    labels: np.ndarray, fraction: float | None = None, count: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (kept, held_out) index arrays, both sorted.

    The held-out size is ``count`` or ``round(fraction * n)`` (at least 1 when ``fraction > 0``, and at
    least one sample is always kept).  Per-class quotas follow the class proportions (largest-remainder
    rounding), so every class keeps its share in both parts.  Deterministic for a given ``seed``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if count is None:
        frac = float(fraction or 0.0)
        count = int(round(frac * n))
        if frac > 0 and count == 0:
            count = 1
    count = max(0, min(int(count), n - 1))
    if count == 0 or n == 0:
        return np.arange(n), np.arange(0)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (count / n)
    quota = np.floor(exact).astype(np.int64)
    remainder = count - int(quota.sum())
    if remainder > 0:
        # Largest remainders first; ties broken randomly but reproducibly.
        order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
        quota[order[:remainder]] += 1
    held: list[np.ndarray] = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        held.append(rng.permutation(members)[: quota[c]])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def random_subset(indices: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A sorted, seeded random subset of ``indices`` with ``min(size, len(indices))`` entries."""
    indices = np.asarray(indices)
    if size >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=size, replace=False))
