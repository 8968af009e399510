"""Statistics-based uniform quantizers (METHOD section 5).

Expected values are computed here independently with numpy (float64) from the definitions:

* weights: s_c = mean over observe() calls of max|W_c| / 2**(b-1); Q(w) = clamp(round(w/s), -2**(b-1),
  2**(b-1)-1) * s; straight-through gradient (1 inside the representable range, 0 outside);
* activations: lb, ub = running means of the per-batch min / max (extended to contain 0);
  step = (ub - lb) / (2**b - 1); integer zero point; q = clamp(round(x/step) + zp, 0, 2**b - 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prunequant.quant.quantizers import (
    CLIP_RATIOS,
    MAX_BITS,
    MIN_BITS,
    ActQuantizer,
    WeightQuantizer,
    batch_percentiles,
    check_bits,
    check_percentile,
)

F32_EPS = float(np.finfo(np.float32).eps)

# kind -> (weight shape, channel axis or None for per tensor)
WEIGHT_KINDS = {
    "conv": ((5, 3, 3, 3), 0),  # Conv2d weight [out, in, kh, kw]
    "convT": ((3, 4, 2, 2), 1),  # ConvTranspose2d weight [in, out, kh, kw]
    "conv1d": ((6, 2, 5), 0),
    "linear": ((7, 9), None),  # per tensor
}

bits_st = st.integers(MIN_BITS, MAX_BITS)
seed_st = st.integers(0, 2**31 - 1)


def _rand(shape, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * spread).to(torch.float32)


def _channel_view(a: np.ndarray, axis: int | None) -> np.ndarray:
    """``[C, -1]`` view of ``a`` with the channel axis first (C = 1 for per tensor)."""
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _expected_scale(observed: list[np.ndarray], bits: int, axis: int | None) -> np.ndarray:
    stats = [np.abs(_channel_view(w.astype(np.float64), axis)).max(axis=1) / 2 ** (bits - 1)
             for w in observed]
    return np.mean(stats, axis=0)


def _broadcast(s: np.ndarray, shape, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.full(shape, float(s[0]))
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return np.broadcast_to(s.reshape(bshape), shape)


def _make_wq(bits, kind, power_of_two=False):
    shape, axis = WEIGHT_KINDS[kind]
    channels = None if axis is None else shape[axis]
    wq = WeightQuantizer(bits, channels=channels, axis=0 if axis is None else axis, power_of_two=power_of_two)
    return wq, shape, axis


# ----------------------------------------------------------------------------------------- weights
@settings(max_examples=40, deadline=None)
@given(bits=bits_st, kind=st.sampled_from(sorted(WEIGHT_KINDS)), seed=seed_st,
       n_obs=st.integers(1, 4), stretch=st.floats(1.0, 2.0))
def test_weight_quantizer_scale_levels_error_saturation(bits, kind, seed, n_obs, stretch):
    wq, shape, axis = _make_wq(bits, kind)
    # Observed weights of different magnitudes: the scale must be their equal-weight mean.
    observed = [_rand(shape, seed + k, spread=0.5 + k) for k in range(n_obs)]
    for w in observed:
        wq.observe(w)
    exp_s = _expected_scale([w.numpy() for w in observed], bits, axis)
    got_s = wq.scale().double().numpy()
    assert got_s.shape == exp_s.shape == ((1,) if axis is None else (shape[axis],))
    np.testing.assert_allclose(got_s, exp_s, rtol=1e-6)
    assert float(wq.stat_count) == n_obs

    # Quantize a new weight that partly lies outside the representable range.
    w = _rand(shape, seed + 1000, spread=float(np.mean([0.5 + k for k in range(n_obs)])) * stretch)
    if stretch > 1.3:  # one value of channel 0 surely beyond the range: saturation is exercised
        w.view(-1)[0] = -float(got_s[0]) * (2 ** (bits - 1) + 1) * stretch
    wq.enabled.fill_(True)
    y = wq(w).detach().double().numpy()
    wn = w.double().numpy()
    s = _broadcast(got_s, shape, axis)  # the float32 scale actually used
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    codes = y / s
    rcodes = np.round(codes)
    # Every output is an integer multiple of the channel scale within [qmin, qmax].
    np.testing.assert_allclose(codes, rcodes, atol=1e-3)
    assert rcodes.min() >= qmin and rcodes.max() <= qmax
    # At most 2**b distinct levels per channel.
    for row in _channel_view(rcodes, axis):
        assert len(np.unique(row)) <= 2**bits
    # int_codes agree with the fake-quantized values.
    ic = wq.int_codes(w).numpy()
    assert ic.dtype == np.int64
    np.testing.assert_array_equal(ic, rcodes.astype(np.int64))

    lo, hi = qmin * s, qmax * s
    inside = (wn >= lo) & (wn <= hi)
    tol = 4 * F32_EPS * np.abs(wn) + 1e-12
    # Inside the range: round to nearest, i.e. error at most half a step.
    assert np.all(np.abs(y - wn)[inside] <= (0.5 * s + tol)[inside])
    # Outside: saturate to the end of the range.
    above, below = wn > hi, wn < lo
    np.testing.assert_allclose(y[above], hi[above], rtol=1e-6)
    np.testing.assert_allclose(y[below], lo[below], rtol=1e-6)
    if stretch > 1.3:
        assert below.flat[0]


@settings(max_examples=30, deadline=None)
@given(bits=bits_st, kind=st.sampled_from(sorted(WEIGHT_KINDS)), seed=seed_st, n_obs=st.integers(1, 3))
def test_weight_quantizer_power_of_two_scale(bits, kind, seed, n_obs):
    wq, shape, axis = _make_wq(bits, kind, power_of_two=True)
    observed = [_rand(shape, seed + k, spread=0.3 * (k + 1)) for k in range(n_obs)]
    for w in observed:
        wq.observe(w)
    s = wq.scale().double().numpy()
    exact = _expected_scale([w.numpy() for w in observed], bits, axis)
    mant, _ = np.frexp(s)
    assert np.all(mant == 0.5), f"not exact powers of two: {s}"
    # Rounded in the log domain: within a factor sqrt(2) of the exact scale.
    ratio = s / exact
    assert np.all(ratio >= 2**-0.5 * (1 - 1e-9)) and np.all(ratio <= 2**0.5 * (1 + 1e-9))
    # The quantized weight lies on the power-of-two grid.
    wq.enabled.fill_(True)
    y = wq(observed[0]).detach().double().numpy()
    sb = _broadcast(s, shape, axis)
    np.testing.assert_array_equal(y / sb, np.round(y / sb))


@settings(max_examples=25, deadline=None)
@given(bits=bits_st, kind=st.sampled_from(sorted(WEIGHT_KINDS)), seed=seed_st)
def test_weight_quantizer_ste_gradient(bits, kind, seed):
    wq, shape, axis = _make_wq(bits, kind)
    ref = _rand(shape, seed)
    wq.observe(ref)
    wq.enabled.fill_(True)
    s = _broadcast(wq.scale().double().numpy(), shape, axis)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # Points clearly inside (within 90% of the range) and clearly outside (>= 10% beyond it); one
    # column just above qmax*s but below max|W_c| (which is NOT representable: -2^(b-1)..2^(b-1)-1).
    u = np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape)
    sflat = np.ascontiguousarray(s).reshape(-1)
    flat = np.where(u >= 0, u * 0.9 * qmax * s, -u * 0.9 * qmin * s).reshape(-1)
    sel = np.arange(flat.size) % 5
    flat[sel == 1] = 1.1 * (qmax + 1) * sflat[sel == 1]  # above
    flat[sel == 2] = 1.1 * (qmin - 1) * sflat[sel == 2]  # below
    flat[sel == 3] = (qmax + 0.75) * sflat[sel == 3]  # between qmax*s and 2^(b-1)*s: outside
    pts = flat.reshape(shape)
    x = torch.tensor(pts, dtype=torch.float32, requires_grad=True)
    wq(x).sum().backward()
    expected = np.ones(flat.size)
    expected[(sel == 1) | (sel == 2) | (sel == 3)] = 0.0
    np.testing.assert_array_equal(x.grad.numpy().reshape(-1), expected)


def test_weight_quantizer_disabled_is_identity_and_unobserved_scale_uses_current_weight():
    wq, shape, axis = _make_wq(4, "conv")
    w = _rand(shape, 3)
    assert wq(w) is w  # not enabled: untouched
    # Without observations, scale(w) is the statistic of the given weight (no running mean yet).
    np.testing.assert_allclose(wq.scale(w).double().numpy(), _expected_scale([w.numpy()], 4, axis), rtol=1e-6)
    with pytest.raises(RuntimeError):
        wq.scale()


def test_weight_quantizer_state_dict_roundtrip():
    wq, shape, _ = _make_wq(6, "convT")
    for k in range(3):
        wq.observe(_rand(shape, k))
    wq.enabled.fill_(True)
    other, _, _ = _make_wq(6, "convT")
    other.load_state_dict(wq.state_dict())
    w = _rand(shape, 99)
    torch.testing.assert_close(other(w), wq(w), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- activations
def _feed(aq: ActQuantizer, batches: list[torch.Tensor]) -> None:
    aq.train()
    for x in batches:
        aq(x)


def _act_batches(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        bs = 1 + k % 3  # different batch sizes
        shift = float(torch.randn((), generator=g)) * 2
        out.append(torch.randn(bs, 3, 4, 4, generator=g) * (1 + k) + shift)
    return out


def _expected_bounds(batches):
    mins = np.array([float(x.double().min()) for x in batches])
    maxs = np.array([float(x.double().max()) for x in batches])
    return mins.mean(), maxs.mean()


@settings(max_examples=40, deadline=None)
@given(bits=bits_st, seed=seed_st, n=st.integers(1, 5), relu=st.booleans())
def test_act_quantizer_running_bounds_and_grid(bits, seed, n, relu):
    aq = ActQuantizer(bits)
    aq.enabled.fill_(True)
    batches = _act_batches(seed, n)
    if relu:
        batches = [torch.relu(x) for x in batches]
    _feed(aq, batches)
    mean_min, mean_max = _expected_bounds(batches)
    assert float(aq.stat_count) == n
    assert float(aq.min_sum) / n == pytest.approx(mean_min, rel=1e-9, abs=1e-12)
    assert float(aq.max_sum) / n == pytest.approx(mean_max, rel=1e-9, abs=1e-12)
    lb, ub = min(mean_min, 0.0), max(mean_max, 0.0)
    got_lb, got_ub = aq.bounds()
    assert got_lb == pytest.approx(lb, rel=1e-9, abs=1e-12)
    assert got_ub == pytest.approx(ub, rel=1e-9, abs=1e-12)

    qmax = 2**bits - 1
    step_t, zp_t = aq.qparams()
    step, zp = float(step_t), float(zp_t)
    assert step == pytest.approx((ub - lb) / qmax, rel=1e-6)
    assert zp == int(zp) and 0 <= zp <= qmax  # integer zero point
    assert zp == pytest.approx(round(-lb / step), abs=0)
    if relu:
        assert zp == 0  # all-non-negative activations need no offset

    aq.eval()
    x = torch.cat([b.reshape(-1) for b in batches] + [torch.tensor([0.0, lb * 1.5 - 1, ub * 1.5 + 1])])
    y = aq(x).double().numpy()
    xn = x.double().numpy()
    codes = y / step + zp
    rc = np.round(codes)
    np.testing.assert_allclose(codes, rc, atol=2e-3)
    assert rc.min() >= 0 and rc.max() <= qmax
    assert len(np.unique(rc)) <= 2**bits
    ic = aq.int_codes(x).numpy()
    np.testing.assert_array_equal(ic, rc.astype(np.int64))
    # Zero (a pruned channel) is exactly representable.
    assert float(aq(torch.zeros(1))[0]) == 0.0
    lo, hi = -zp * step, (qmax - zp) * step
    inside = (xn >= lo) & (xn <= hi)
    tol = 4 * F32_EPS * (np.abs(xn) + abs(lo) + abs(hi)) + 1e-12
    assert np.all(np.abs(y - xn)[inside] <= 0.5 * step + tol[inside])
    np.testing.assert_allclose(y[xn > hi], hi, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(y[xn < lo], lo, rtol=1e-5, atol=1e-7)
    assert (xn > hi).any()  # the appended 1.5*ub + 1 saturates


def test_act_quantizer_training_forward_uses_updated_bounds():
    """In training mode the current batch is added to the statistics before quantizing with them."""
    aq = ActQuantizer(3)
    aq.enabled.fill_(True)
    aq.train()
    aq(torch.linspace(-1.0, 6.0, 50))  # batch 1: min -1, max 6
    x = torch.linspace(-3.0, 2.0, 50)  # batch 2: min -3, max 2
    y = aq(x)
    lb, ub = (-1.0 - 3.0) / 2, (6.0 + 2.0) / 2  # running means including this batch
    step = (ub - lb) / 7
    zp = round(-lb / step)
    assert zp == 2
    expected = (torch.clamp(torch.round(x / step) + zp, 0, 7) - zp) * step
    torch.testing.assert_close(y, expected)
    # With only the first batch's bounds (step 1) the output would differ.
    assert not torch.allclose(y, (torch.clamp(torch.round(x) + 1, 0, 7) - 1))


def test_act_quantizer_frozen_in_eval_and_when_frozen():
    aq = ActQuantizer(8)
    aq.enabled.fill_(True)
    _feed(aq, _act_batches(0, 3))
    before = {k: v.clone() for k, v in aq.state_dict().items()}
    aq.eval()
    out1 = aq(torch.randn(4, 3, 4, 4) * 50)  # far outside the range: would move the bounds
    out2 = aq(torch.randn(4, 3, 4, 4) * 50)
    for k, v in aq.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert out1.abs().max() <= max(abs(aq.bounds()[0]), abs(aq.bounds()[1])) * 1.01 + float(aq.qparams()[0])
    assert out2.shape == (4, 3, 4, 4)
    # The frozen flag also stops updates in training mode.
    aq.train()
    aq.frozen.fill_(True)
    aq(torch.randn(4, 3, 4, 4) * 50)
    for k, v in aq.state_dict().items():
        if k != "frozen":
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # And training mode without the flag updates them again.
    aq.frozen.fill_(False)
    aq(torch.randn(2, 3))
    assert float(aq.stat_count) == float(before["stat_count"]) + 1


def test_act_quantizer_passthrough_when_not_enabled():
    aq = ActQuantizer(4)
    aq.train()
    x = torch.randn(3, 5) * 10
    assert aq(x) is x
    assert float(aq.stat_count) == 0 and float(aq.min_sum) == 0 and float(aq.max_sum) == 0
    with pytest.raises(RuntimeError):
        aq.bounds()


def test_act_quantizer_enabled_without_statistics_in_eval_raises():
    aq = ActQuantizer(4)
    aq.enabled.fill_(True)
    aq.eval()
    with pytest.raises(RuntimeError, match="never seen data"):
        aq(torch.randn(3))


@settings(max_examples=20, deadline=None)
@given(bits=bits_st, seed=seed_st)
def test_act_quantizer_ste_gradient(bits, seed):
    aq = ActQuantizer(bits)
    aq.enabled.fill_(True)
    _feed(aq, _act_batches(seed, 2))
    aq.eval()
    step, zp = (float(t) for t in aq.qparams())
    qmax = 2**bits - 1
    lo, hi = -zp * step, (qmax - zp) * step
    inside = np.random.default_rng(seed).uniform(lo, hi, size=20) * 0.9 + 0.05 * (lo + hi)
    outside = np.array([hi + 0.1 * (hi - lo) + step, lo - 0.1 * (hi - lo) - step])
    x = torch.tensor(np.concatenate([inside, outside]), dtype=torch.float32, requires_grad=True)
    aq(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.r_[np.ones(20), np.zeros(2)])


# ---------------------------------------------------------------------------- MSE weight clipping
def _q_err(rows: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = s[:, None]
    return ((np.clip(np.round(rows / s), qmin, qmax) * s - rows) ** 2).sum(axis=1)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), kind=st.sampled_from(sorted(WEIGHT_KINDS)), seed=seed_st,
       outlier=st.floats(1.0, 6.0))
def test_weight_quantizer_mse_clip_picks_the_best_ratio_per_channel(bits, kind, seed, outlier):
    shape, axis = WEIGHT_KINDS[kind]
    channels = None if axis is None else shape[axis]
    w = _rand(shape, seed)
    w.view(-1)[0] *= outlier  # an outlier makes clipping worthwhile at low bits
    wq = WeightQuantizer(bits, channels=channels, axis=0 if axis is None else axis, clip="mse")
    ref = WeightQuantizer(bits, channels=channels, axis=0 if axis is None else axis)
    wq.observe(w)
    ref.observe(w)
    rows = _channel_view(w.double().numpy(), axis)
    s_max = ref.scale().double().numpy()
    s_mse = wq.scale().double().numpy()
    ratio = s_mse / s_max
    # Each channel's ratio is one of the candidates, and it is the best of them (ties to the larger).
    errs = np.stack([_q_err(rows, r * s_max, bits) for r in CLIP_RATIOS])  # [R, C]
    for c in range(rows.shape[0]):
        k = int(np.argmin(np.abs(np.array(CLIP_RATIOS) - ratio[c])))
        assert abs(CLIP_RATIOS[k] - ratio[c]) < 1e-6
        assert errs[k, c] <= errs[:, c].min() * (1 + 1e-5) + 1e-12
        assert errs[k, c] <= errs[-1, c] * (1 + 1e-5) + 1e-12  # never worse than the paper's max
    # Quantizing with it stays on the integer grid and saturates like the max variant.
    wq.enabled.fill_(True)
    codes = wq.int_codes(w).numpy()
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert "clip=mse" in repr(wq)


def test_weight_quantizer_mse_clip_keeps_max_when_clipping_cannot_help():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.75]])  # exactly on the 3-bit grid of the max scale
    wq = WeightQuantizer(3, channels=1, clip="mse")
    wq.observe(w)
    assert float(wq.scale()[0]) == pytest.approx(1.0 / 4)


def test_weight_quantizer_rejects_unknown_clip():
    with pytest.raises(ValueError, match=r"weight_clip must be one of \['max', 'mse'\], got 'l2'"):
        WeightQuantizer(4, clip="l2")


# ------------------------------------------------------------------------------- percentile ranges
@settings(max_examples=60, deadline=None)
@given(seed=seed_st, n=st.integers(1, 3000), p=st.floats(50.5, 99.99), relu=st.booleans(),
       ties=st.booleans())
def test_batch_percentiles_are_exact_order_statistics(seed, n, p, relu, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    if ties:
        x = torch.round(x)  # many equal values
    if relu:
        x = torch.relu(x)
    lo, hi = batch_percentiles(x.reshape(1, -1, 1), p)
    k = int(n * (1 - p / 100))
    xs = np.sort(x.numpy())
    assert float(hi) == xs[n - 1 - k]  # the (k+1)-th largest
    assert int((x > hi).sum()) <= k < int((x >= hi).sum())
    if float(xs[0]) < 0:
        assert float(lo) == xs[k]  # the (k+1)-th smallest
        assert int((x < lo).sum()) <= k < int((x <= lo).sum())
    else:
        assert float(lo) == xs[0]
    if k == 0:
        assert (float(lo), float(hi)) == (xs[0], xs[-1])


@settings(max_examples=30, deadline=None)
@given(bits=bits_st, seed=seed_st, n=st.integers(1, 4), p=st.sampled_from([90.0, 99.0, 99.9]))
def test_act_quantizer_percentile_bounds_are_running_means_of_batch_percentiles(bits, seed, n, p):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.relu(torch.randn(2, 4, 16, 16, generator=g) * (1 + k)) for k in range(n)]
    for b in batches:
        b.view(-1)[0] = 50.0  # one outlier each
    aq = ActQuantizer(bits, percentile=p)
    aq.enabled.fill_(True)
    _feed(aq, batches)
    his = [float(batch_percentiles(b, p)[1]) for b in batches]
    lb, ub = aq.bounds()
    assert lb == 0.0
    assert ub == pytest.approx(float(np.mean(his)), rel=1e-9)
    ref = ActQuantizer(bits)
    ref.enabled.fill_(True)
    _feed(ref, batches)
    assert ub < ref.bounds()[1] == pytest.approx(50.0)  # the outlier no longer sets the range
    aq.eval()
    y = aq(torch.tensor([0.0, ub / 2, 50.0]))
    assert float(y[0]) == 0.0 and float(y[2]) == pytest.approx(ub, rel=1e-6)  # saturates at ub


@pytest.mark.parametrize("bad", [50, 100, 100.0, 0.5, -1, True, "99"])
def test_check_percentile_rejects(bad):
    with pytest.raises(ValueError, match=r"act_percentile must be null .* \(50, 100\)"):
        check_percentile(bad)
    with pytest.raises(ValueError, match=r"act_percentile"):
        ActQuantizer(4, percentile=bad)


def test_check_percentile_accepts():
    assert check_percentile(None) is None
    assert check_percentile(99) == 99.0
    assert "percentile=99.9" in repr(ActQuantizer(4, percentile=99.9))


# ------------------------------------------------------------------------------------------- bits
@pytest.mark.parametrize("bad", [1, 17, 0, -3, True, 4.0, "8", None])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        check_bits(bad)


@pytest.mark.parametrize("bad", [1, 17])
def test_quantizer_constructors_reject_bad_bits_with_clear_message(bad):
    with pytest.raises(ValueError, match=rf"act_bits must be an integer in \[2, 16\], got {bad}"):
        ActQuantizer(bad)
    with pytest.raises(ValueError, match=rf"weight_bits must be an integer in \[2, 16\], got {bad}"):
        WeightQuantizer(bad, channels=3)


@pytest.mark.parametrize("good", [2, 4, 8, 16])
def test_check_bits_accepts(good):
    assert check_bits(good) == good
    assert ActQuantizer(good).qmax == 2**good - 1
    wq = WeightQuantizer(good)
    assert (wq.qmin, wq.qmax) == (-(2 ** (good - 1)), 2 ** (good - 1) - 1)
    assert math.log2(wq.qmax - wq.qmin + 1) == good


# ----------------------------------------------------------------------------- reduced weight range
@settings(max_examples=40, deadline=None)
@given(bits=bits_st, kind=st.sampled_from(sorted(WEIGHT_KINDS)), seed=seed_st, stretch=st.floats(0.5, 2.0))
@example(bits=8, kind="conv", seed=0, stretch=2.0)  # the width it changes, always drawn
@example(bits=8, kind="linear", seed=1, stretch=1.5)
def test_reduced_weight_range_grid(bits, kind, seed, stretch):
    """``weight_range="reduced"``: an 8-bit quantizer has 7-bit codes [-64, 63] in its 8-bit container
    and scale max|W_c| / 64, i.e. it fake-quantizes exactly like a full-range 7-bit quantizer, so two
    uint8 x int8 products never leave int16; every other width is the full-range quantizer."""
    shape, axis = WEIGHT_KINDS[kind]
    channels = None if axis is None else shape[axis]
    ax = 0 if axis is None else axis
    red = WeightQuantizer(bits, channels=channels, axis=ax, weight_range="reduced")
    code_bits = 7 if bits == 8 else bits
    same = WeightQuantizer(code_bits, channels=channels, axis=ax)
    assert (red.qmin, red.qmax) == (-(2 ** (code_bits - 1)), 2 ** (code_bits - 1) - 1)
    assert red.bits == bits and red.code_bits == code_bits
    w = _rand(shape, seed)
    red.observe(w)
    same.observe(w)
    np.testing.assert_allclose(red.scale().double().numpy(), _expected_scale([w.numpy()], code_bits, axis),
                               rtol=1e-6)
    red.enabled.fill_(True)
    same.enabled.fill_(True)
    w2 = _rand(shape, seed + 1, spread=stretch)
    codes = red.int_codes(w2).numpy()
    assert codes.min() >= red.qmin and codes.max() <= red.qmax
    if bits <= 8:  # the u8s8 bound: two products with a uint8 activation never leave int16
        assert 2 * 255 * np.abs(codes).max() <= 2**15 - 1
    torch.testing.assert_close(red(w2), same(w2), rtol=0, atol=0)
    np.testing.assert_array_equal(codes, same.int_codes(w2).numpy())


def test_reduced_weight_range_needs_a_known_name():
    with pytest.raises(ValueError, match="weight_range must be one of"):
        WeightQuantizer(8, weight_range="7bit")
    assert "weight_range=reduced" in repr(WeightQuantizer(8, weight_range="reduced"))
    assert (WeightQuantizer(8, weight_range="reduced").qmin, WeightQuantizer(8).qmin) == (-64, -128)
