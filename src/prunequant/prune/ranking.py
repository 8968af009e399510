"""How much two channel-importance rankings of one layer agree (METHOD section 7).

The paper compares the importance estimates ``mu`` and ``nu`` of a layer's channels taken under two
sparsities of the layer before it with

* Kendall's tau as it defines it, ``tau = 2 / (n (n-1)) * sum_{k<j} sign(mu_k - mu_j) sign(nu_k - nu_j)``
  (tau-a: a pair tied in either estimate adds 0), :func:`kendall_tau`;
* the Levenshtein (edit) distance between the two rank sequences, the channel indices from the most
  to the least important (:func:`rank_sequence`), :func:`edit_distance`;

and this module adds what pruning acts on, the share of the channels kept at a sparsity that both
estimates keep, :func:`kept_overlap`. Ranking and keeping follow
:func:`~prunequant.prune.mask.mask_from_scores` (ties: the lower index is removed first).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .mask import importance_order

ArrayLike = Tensor | np.ndarray | list[float]


def _vec(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _tied_pairs(x: np.ndarray) -> int:
    _, counts = np.unique(x, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau(mu: ArrayLike, nu: ArrayLike) -> float:
    """Kendall's tau-a of two importance vectors over the same channels (the paper's formula).

    Computed with :func:`scipy.stats.kendalltau` (tau-b) and converted with the tie counts:
    ``tau_a = tau_b * sqrt((n0 - n1)(n0 - n2)) / n0``, ``n0 = n(n-1)/2`` pairs, ``n1`` / ``n2`` the
    pairs tied in ``mu`` / ``nu``. 1: same order, -1: reversed; a vector with every value equal
    gives 0 (every sign is 0); fewer than 2 channels: NaN (no pair).
    """
    from scipy.stats import kendalltau

    a, b = _vec(mu), _vec(nu)
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau: {a.size} vs {b.size} channels")
    n = a.size
    if n < 2 or np.isnan(a).any() or np.isnan(b).any():
        return math.nan
    n0 = n * (n - 1) // 2
    n1, n2 = _tied_pairs(a), _tied_pairs(b)
    if n1 == n0 or n2 == n0:
        return 0.0
    tau_b = float(kendalltau(a, b, variant="b").statistic)
    # (P - Q) / n0 is a ratio of integers: 12 decimals drop the float noise of the conversion
    return round(tau_b * math.sqrt((n0 - n1) * (n0 - n2)) / n0, 12)


def rank_sequence(scores: ArrayLike) -> list[int]:
    """Channel indices from the most to the least important (the order ``mask_from_scores`` keeps in)."""
    return [int(i) for i in importance_order(torch.as_tensor(_vec(scores)))]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two rank sequences (insertions, deletions, substitutions; rapidfuzz)."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(list(a), list(b)))


def kept_overlap(kept_a: ArrayLike, kept_b: ArrayLike) -> float:
    """``|kept_a & kept_b| / |kept_a|`` of two 0/1 keep-masks (1.0 when both keep the same channels)."""
    a, b = _vec(kept_a) != 0, _vec(kept_b) != 0
    if a.shape != b.shape:
        raise ValueError(f"kept_overlap: {a.size} vs {b.size} channels")
    k = int(a.sum())
    return float((a & b).sum()) / k if k else math.nan


def compare(dense: ArrayLike, other: ArrayLike, kept_dense: ArrayLike,
            kept_other: ArrayLike) -> dict[str, Any]:
    """Tau, edit distance (also over n) and kept overlap of a layer's ``other`` estimate vs its ``dense``
    one, and the ``other`` rank sequence."""
    ra, rb = rank_sequence(dense), rank_sequence(other)
    d = edit_distance(ra, rb)
    tau = kendall_tau(dense, other)
    return {"tau": None if math.isnan(tau) else tau, "edit_distance": d,
            "edit_distance_norm": d / len(ra) if ra else None,
            "kept_overlap": kept_overlap(kept_dense, kept_other), "ranking": rb}


__all__ = ["compare", "edit_distance", "kendall_tau", "kept_overlap", "rank_sequence"]
