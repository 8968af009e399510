"""Channel masks and the A-L1 / A-L0 importance statistics (METHOD section 2)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunequant.prune.mask import ChannelMask, batch_channel_stat, mask_from_scores, n_pruned


def _expected_removed(scores: list[float], k: int) -> set[int]:
    """The k lowest scores; among equal scores the lower channel index goes first."""
    return set(sorted(range(len(scores)), key=lambda c: (scores[c], c))[:k])


# Scores drawn from a small set of values so that ties are frequent.
scores_st = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.25, 7.0]) | st.floats(0, 10), min_size=1,
                     max_size=64)
percent_st = st.integers(0, 100)


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, pct=percent_st)
def test_mask_from_scores_removes_floor_s_c_lowest_with_deterministic_ties(scores, pct):
    c = len(scores)
    s = pct / 100
    k = min(math.floor(Fraction(pct, 100) * c), c - 1)  # exact floor(s*C), at least one kept
    mask = mask_from_scores(torch.tensor(scores, dtype=torch.float32), s)
    assert mask.shape == (c,) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    removed = {i for i, v in enumerate(mask.tolist()) if v == 0.0}
    assert len(removed) == k == n_pruned(s, c)
    assert mask.sum() >= 1
    # float32 view of the scores: the ranking is the one the tensor carries.
    f32 = torch.tensor(scores, dtype=torch.float32).tolist()
    assert removed == _expected_removed(f32, k)
    # Deterministic: the same answer again.
    torch.testing.assert_close(mask_from_scores(torch.tensor(scores, dtype=torch.float32), s), mask)


@pytest.mark.parametrize(("s", "c", "k"), [(0.3, 10, 3), (0.5, 3, 1), (0.25, 8, 2), (0.0, 5, 0), (0.99, 2, 1),
                                           (1.0, 4, 3), (0.7, 10, 7), (0.5, 1, 0)])
def test_n_pruned_examples(s, c, k):
    assert n_pruned(s, c) == k


@pytest.mark.parametrize("s", [-0.1, 1.5, float("nan")])
def test_n_pruned_rejects_out_of_range(s):
    with pytest.raises(ValueError, match="sparsity"):
        n_pruned(s, 4)


def test_all_equal_scores_remove_lowest_indices():
    mask = mask_from_scores(torch.ones(8), 0.5)
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    mask = mask_from_scores(torch.tensor([2.0, 1.0, 1.0, 0.5, 1.0, 3.0]), 0.5)
    assert mask.tolist() == [1, 0, 0, 0, 1, 1]  # 0.5 first, then the first two of the tied 1.0s


def test_mask_from_scores_does_not_modify_scores_and_keeps_device_dtype_independent():
    sc = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    before = sc.clone()
    m = mask_from_scores(sc, 0.34)
    assert m.tolist() == [1, 0, 1]
    torch.testing.assert_close(sc, before)


# ------------------------------------------------------------------------------------- ChannelMask
def _batches(seed: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, shape in enumerate(shapes):
        x = torch.randn(shape, generator=g) * (1 + 2 * k) + (k - 1)
        out.append(torch.relu(x) if k % 2 == 0 else x)  # some batches with many exact zeros
    return out


SHAPES_4D = [(2, 5, 3, 3), (7, 5, 2, 4), (1, 5, 6, 6), (4, 5, 1, 1)]
SHAPES_2D = [(3, 6), (9, 6), (1, 6)]


@pytest.mark.parametrize("shapes", [SHAPES_4D, SHAPES_2D], ids=["conv", "linear"])
def test_a_l1_is_equal_weight_mean_over_batches(shapes):
    c = shapes[0][1]
    m = ChannelMask(c, stat="a_l1")
    m.train()
    m.collecting.fill_(True)
    batches = _batches(1, shapes)
    for x in batches:
        m(x)
    per_batch = []
    for x in batches:
        a = np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, c)  # rows = (n, h, w) positions
        per_batch.append(np.abs(a).mean(axis=0))
    expected = np.mean(per_batch, axis=0)
    assert float(m.stat_count) == len(batches)
    np.testing.assert_allclose(m.mean_stat().numpy(), expected, rtol=1e-6)
    # Pooling all positions of all batches (weighting by batch size) would give something else:
    pooled = np.concatenate([np.abs(np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, c)) for x in batches])
    assert not np.allclose(pooled.mean(axis=0), expected, rtol=1e-3)


@pytest.mark.parametrize("shapes", [SHAPES_4D, SHAPES_2D], ids=["conv", "linear"])
def test_a_l0_is_fraction_nonzero(shapes):
    c = shapes[0][1]
    m = ChannelMask(c, stat="a_l0")
    m.train()
    m.collecting.fill_(True)
    batches = _batches(2, shapes)
    batches[0][:, 0] = 0.0  # a dead channel in one batch
    for x in batches:
        m(x)
    per_batch = [(np.moveaxis(x.numpy(), 1, -1).reshape(-1, c) != 0).mean(axis=0) for x in batches]
    expected = np.mean(per_batch, axis=0)
    np.testing.assert_allclose(m.mean_stat().numpy(), expected, rtol=1e-6)
    assert np.all((expected >= 0) & (expected <= 1))
    assert expected.min() < 1  # the ReLU batches have zeros: the statistic is not trivially 1


def test_statistics_are_of_the_input_before_the_mask_and_output_is_masked():
    m = ChannelMask(4)
    m.train()
    m.collecting.fill_(True)
    m.mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    x = torch.arange(1, 1 + 2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    y = m(x)
    assert torch.equal(y[:, [1, 3]], torch.zeros(2, 2, 3))
    assert torch.equal(y[:, [0, 2]], x[:, [0, 2]])
    expected = x.abs().mean(dim=(0, 2)).double()
    torch.testing.assert_close(m.mean_stat(), expected)
    assert m.kept == 2


def test_no_statistics_when_not_collecting_in_eval_with_collect_false_or_stat_none():
    x = torch.randn(3, 4, 2, 2) + 5
    m = ChannelMask(4)
    m.mask.copy_(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    m.train()
    m(x)  # not collecting
    assert float(m.stat_count) == 0 and float(m.stat_sum.abs().sum()) == 0
    m.collecting.fill_(True)
    m.eval()
    m(x)  # eval mode
    assert float(m.stat_count) == 0
    m.train()
    y = m(x, collect=False)  # the tied (second) application: masks, gathers nothing
    assert float(m.stat_count) == 0
    assert torch.equal(y[:, 0], torch.zeros(3, 2, 2)) and torch.equal(y[:, 1:], x[:, 1:])
    m(x)
    assert float(m.stat_count) == 1
    none = ChannelMask(4, stat="none")
    none.train()
    none.collecting.fill_(True)
    none(x)
    assert float(none.stat_count) == 0


def test_reset_stats_mean_stat_and_state_dict_roundtrip():
    m = ChannelMask(3)
    assert torch.equal(m.mean_stat(), torch.zeros(3, dtype=torch.float64))  # no batches: zeros, no NaN
    m.train()
    m.collecting.fill_(True)
    m(torch.ones(2, 3))
    m(3 * torch.ones(5, 3))
    torch.testing.assert_close(m.mean_stat(), torch.full((3,), 2.0, dtype=torch.float64))
    m.mask.copy_(torch.tensor([1.0, 0.0, 1.0]))
    m.frozen.fill_(True)
    other = ChannelMask(3)
    other.load_state_dict(m.state_dict())
    for name in ("mask", "stat_sum", "stat_count", "collecting", "frozen"):
        assert torch.equal(getattr(other, name), getattr(m, name)), name
    m.reset_stats()
    assert float(m.stat_count) == 0 and float(m.stat_sum.abs().sum()) == 0
    assert m.kept == 2  # resetting statistics keeps the mask


def test_batch_channel_stat_and_constructor_errors():
    x = torch.tensor([[[-2.0, 0.0]], [[4.0, 0.0]]])  # [N=2, C=1, L=2]
    assert batch_channel_stat(x, "a_l1").tolist() == [1.5]
    assert batch_channel_stat(x, "a_l0").tolist() == [0.5]
    with pytest.raises(ValueError, match="a_l1"):
        batch_channel_stat(x, "foo")
    with pytest.raises(ValueError, match="foo"):
        ChannelMask(3, stat="foo")
