"""Eval-mode caches of the quantizers (fake-quantized weights, activation ``(step, zero_point)``, in-place
fake quantization and its output buffer pool): outputs bit-identical to the uncached code
(``eval_cache(False)``), never stale, never saved.

Bit-identical means equal as integers (``-0.0 != 0.0``); the models are compared in inference mode,
``no_grad`` and with autograd.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunequant import Compressor
from prunequant.graph.instrument import raw_weight, weight_quantizer
from prunequant.models import build_model
from prunequant.quant import quantizers as Q
from prunequant.quant.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    clear_quantizer_caches,
    eval_cache,
    fake_quantize,
    fake_quantize_nograd,
)

IMG = 16


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (as int32: ``-0.0`` and ``0.0`` differ; the same NaN is equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = (t.detach().contiguous().reshape(-1).view(ints) for t in (a, b))
    return torch.equal(a, b)


@contextlib.contextmanager
def pool_everything():
    """Pool every activation-quantizer output, however small (the default skips small ones)."""
    old = Q._POOL.min_bytes
    Q._POOL.min_bytes = 0
    Q._POOL.clear()
    try:
        yield
    finally:
        Q._POOL.min_bytes = old
        Q._POOL.clear()


@functools.cache
def _finalized_once(bits: int, percentile: float | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=IMG, width=0.5)
    quant = {"weight_bits": bits, "act_bits": bits, "unit": "steps", "weight_delay": 0, "act_delay": 0}
    if percentile is not None:
        quant["act_percentile"] = percentile
    recipe = {"prune": {"sparsity": 0.5, "unit": "steps", "start": 0, "interval": 1, "refresh": 1},
              "quant": quant}
    comp = Compressor(model, recipe, torch.randn(2, 1, IMG, IMG))
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01)
    comp.model.train()
    g = torch.Generator().manual_seed(seed)
    while not comp.schedule_done:
        x, y = torch.randn(4, 1, IMG, IMG, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(comp.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    return comp.finalize()


def _finalized(bits: int, percentile: float | None = None, seed: int = 0) -> nn.Module:
    """A fresh copy of the finalized model (built once per test process)."""
    return copy.deepcopy(_finalized_once(bits, percentile, seed))


@pytest.fixture
def w4a4() -> nn.Module:
    return _finalized(4)


def _inputs(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 1, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _uncached(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with eval_cache(False), torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- finalized models
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("bits,percentile", [(8, None), (4, None), (4, 99.0), (8, 99.9)])
def test_finalized_output_bit_identical(bits, percentile, pool):
    """W8A8 / W4A4, min-max and percentile activation ranges; conv weights per channel, the classifier's
    per tensor; batch 1 and 5; inference mode, no_grad and autograd; small outputs pooled or not."""
    with pool_everything() if pool else contextlib.nullcontext():
        _check_finalized(bits, percentile)


def _check_finalized(bits: int, percentile: float | None) -> None:
    model = _finalized(bits, percentile)
    kinds = {wq.per_channel for m in model.modules() if (wq := weight_quantizer(m)) is not None}
    assert kinds == {True, False}
    for batch in (1, 5):
        x = _inputs(batch)
        ref = _uncached(model, x)
        for _ in range(2):  # a miss, then hits
            with torch.inference_mode():
                assert same_bits(model(x), ref)
            with torch.no_grad():
                assert same_bits(model(x), ref)
        assert same_bits(model(x), ref)  # autograd on: the cached scales through the autograd function


def test_finalized_gradients_identical(w4a4):
    """In eval mode with autograd (no cached weight then), gradients are those of the uncached code."""
    x = _inputs(3).requires_grad_()
    grads = []
    for on in (False, True):
        w4a4.zero_grad()
        x.grad = None
        with eval_cache(on):
            w4a4(x).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in w4a4.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1
    assert all(same_bits(a, b) for a, b in zip(*grads))


def test_cache_not_in_state_dict_and_not_copied(w4a4):
    before = w4a4.state_dict()
    with torch.no_grad():
        w4a4(_inputs(2))
    after = w4a4.state_dict()
    assert list(before) == list(after)
    assert all(same_bits(before[k], after[k]) for k in before)
    quantizers = [m for m in w4a4.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    assert all(q._pq_cache is not None for q in quantizers)
    clone = copy.deepcopy(w4a4)
    assert all(m._pq_cache is None for m in clone.modules() if isinstance(m, (WeightQuantizer, ActQuantizer)))
    assert all(m._pq_cache is None for m in pickle.loads(pickle.dumps(quantizers[0])).modules())


# --------------------------------------------------------------------------- staleness
def _first_conv(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if weight_quantizer(m) is not None)


def test_inplace_weight_change_is_seen(w4a4):
    model = copy.deepcopy(w4a4)
    x = _inputs(2)
    with torch.no_grad():
        y0 = model(x)
        raw_weight(_first_conv(model)).mul_(-1.5)  # an in-place update, as an optimizer step does
        y1 = model(x)
    assert not same_bits(y0, y1)
    assert same_bits(y1, _uncached(model, x))


def test_replaced_weight_and_load_state_dict_are_seen(w4a4):
    model = copy.deepcopy(w4a4)
    x = _inputs(2)
    with torch.inference_mode():
        y0 = model(x)
    state = {k: v * 1.25 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # weights, weight scales and activation ranges, copied in place
    with torch.inference_mode():
        y1 = model(x)
    assert not same_bits(y0, y1)
    assert same_bits(y1, _uncached(model, x))
    other = copy.deepcopy(w4a4)
    other.load_state_dict(state)
    assert same_bits(y1, _uncached(other, x))
    conv = _first_conv(model)
    plist = conv.parametrizations["weight"]
    plist.original = nn.Parameter(plist.original.detach() * 0.5)  # a new tensor
    with torch.no_grad():
        y2 = model(x)
    assert same_bits(y2, _uncached(model, x)) and not same_bits(y1, y2)


def test_quantizer_options_and_buffers_are_seen(w4a4):
    model = copy.deepcopy(w4a4)
    x = _inputs(2)
    with torch.no_grad():
        model(x)
    wq = weight_quantizer(_first_conv(model))
    aq = next(m for m in model.modules() if isinstance(m, ActQuantizer))
    for change in (lambda: setattr(wq, "bits", 3), lambda: setattr(wq, "power_of_two", True),
                   lambda: wq.stat_sum.mul_(2), lambda: aq.max_sum.mul_(0.5), lambda: setattr(aq, "bits", 2),
                   lambda: aq.enabled.fill_(False), lambda: wq.enabled.fill_(False)):
        change()
        with torch.no_grad():
            assert same_bits(model(x), _uncached(model, x))


def test_train_then_eval_sees_new_statistics():
    """Mid-schedule: an eval pass, training steps (weights and quantizer statistics change), eval again."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=IMG, width=0.5)
    comp = Compressor(model, {"prune": None, "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps",
                                                       "weight_delay": 0, "act_delay": 1}}, _inputs(2))
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.05)
    x = _inputs(3, seed=3)
    outs = []
    for _ in range(3):
        comp.model.train()
        for _ in range(2):
            loss = F.cross_entropy(comp.model(_inputs(4, seed=len(outs))), torch.zeros(4, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            comp.step()
        comp.model.eval()
        with torch.no_grad():
            outs.append(comp.model(x))
        assert same_bits(outs[-1], _uncached(comp.model, x))
    assert not same_bits(outs[0], outs[1]) and not same_bits(outs[1], outs[2])


def test_data_writes_need_clear_cache(w4a4):
    """Writes through ``.data`` bypass version counters (documented): clear_quantizer_caches() or eval()."""
    model = copy.deepcopy(w4a4)
    x = _inputs(2)
    with torch.no_grad():
        model(x)
        raw_weight(_first_conv(model)).data.mul_(-2.0)
    clear_quantizer_caches(model)
    with torch.no_grad():
        assert same_bits(model(x), _uncached(model, x))
    with torch.no_grad():
        model(x)
        raw_weight(_first_conv(model)).data.mul_(0.25)
    model.eval()
    with torch.no_grad():
        assert same_bits(model(x), _uncached(model, x))


# --------------------------------------------------------------------------- quantizers alone
@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8, 16]), kind=st.sampled_from(["conv", "convT", "linear"]),
       p2=st.booleans(), clip=st.sampled_from(["max", "mse"]), rng=st.sampled_from(["full", "reduced"]),
       observed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_weight_quantizer_bit_identical(bits, kind, p2, clip, rng, observed, seed):
    g = torch.Generator().manual_seed(seed)
    shape, axis = {"conv": ((6, 3, 3, 3), 0), "convT": ((3, 5, 2, 2), 1), "linear": ((4, 7), None)}[kind]
    w = nn.Parameter(torch.randn(shape, generator=g) * torch.rand((), generator=g) * 3)
    wq = WeightQuantizer(bits, None if axis is None else shape[axis], axis or 0, p2, clip, rng)
    wq.enabled.fill_(True)
    if observed:
        wq.observe(w)
    wq.eval()
    with eval_cache(False), torch.no_grad():
        ref = wq(w)
    for _ in range(2):
        with torch.no_grad():
            assert same_bits(wq(w), ref)
        with torch.inference_mode():
            assert same_bits(wq(w), ref)
        out = wq(w)  # autograd: same values, and the straight-through gradient
        assert out.requires_grad and same_bits(out, ref)


def _act_input(seed: int, shape, shift: float, specials: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + shift
    if specials:  # signed zeros and exact ties of the rounding
        flat = x.view(-1)
        flat[:4] = torch.tensor([0.0, -0.0, -1e-9, 1e-9])
    return x


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8, 16]), percentile=st.sampled_from([None, 99.0, 90.0]),
       relu=st.booleans(), specials=st.booleans(), seed=st.integers(0, 2**31 - 1),
       frozen_train=st.booleans())
def test_act_quantizer_bit_identical(bits, percentile, relu, specials, seed, frozen_train):
    """Zero points 0 (ReLU inputs: the subtraction is skipped) and not; eval, or training with frozen
    ranges."""
    with pool_everything():
        _check_act_quantizer(bits, percentile, relu, specials, seed, frozen_train)


def _check_act_quantizer(bits, percentile, relu, specials, seed, frozen_train):
    aq = ActQuantizer(bits, percentile)
    aq.enabled.fill_(True)
    aq.train()
    for i in range(3):
        x = _act_input(seed + i, (4, 3, 5, 5), 0.5, False)
        aq(x.relu() if relu else x)
    if frozen_train:
        aq.frozen.fill_(True)
    else:
        aq.eval()
    x = _act_input(seed + 10, (4, 3, 5, 5), 0.0, specials)
    if relu:
        x = x.relu()
    if specials:  # a tie at half a step, and values beyond the range
        step = float(aq.qparams()[0])
        x.view(-1)[4:7] = torch.tensor([0.5 * step, -1e6, 1e6])
    with eval_cache(False), torch.no_grad():
        ref = aq(x)
    for _ in range(2):
        with torch.no_grad():
            assert same_bits(aq(x), ref)
        with torch.inference_mode():
            assert same_bits(aq(x), ref)
    xg = x.clone().requires_grad_()
    out = aq(xg)
    assert out.requires_grad and same_bits(out, ref)
    out.sum().backward()
    xr = x.clone().requires_grad_()
    with eval_cache(False):
        aq(xr).sum().backward()
    assert same_bits(xg.grad, xr.grad)


@given(seed=st.integers(0, 2**31 - 1), zp=st.sampled_from([0.0, 3.0]))
@settings(max_examples=30, deadline=None)
def test_fake_quantize_nograd_is_fake_quantize(seed, zp):
    x = _act_input(seed, (50,), 0.0, True)
    s, z = torch.tensor(0.37), torch.tensor(zp)
    ref = fake_quantize(x, s, z, 0, 15)
    assert same_bits(fake_quantize_nograd(x, s, z, 0, 15, zero_point_is_zero=zp == 0.0), ref)
    assert same_bits(fake_quantize_nograd(x, s, z, 0, 15, out=torch.empty_like(x)), ref)


def test_kept_outputs_are_never_overwritten():
    """The pool takes a buffer back only when nothing refers to it: kept outputs and views stay."""
    with pool_everything():
        _check_kept_outputs()


def _check_kept_outputs():
    aq = ActQuantizer(4)
    aq.enabled.fill_(True)
    aq.train()
    aq(torch.randn(2, 3, 4, 4))
    aq.eval()
    xs = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        kept = aq(xs[0])
        expect = kept.clone()
        view = aq(xs[1])[1]
        expect_view = view.clone()
        storage_only = aq(xs[2]).untyped_storage()
        for x in xs:
            aq(x)
        dropped = aq(xs[3])
        del dropped
        again = aq(xs[0])  # reuses the dropped output's buffer
    assert same_bits(kept, expect) and same_bits(view, expect_view) and same_bits(again, expect)
    assert storage_only.nbytes() == expect.numel() * 4


def test_inference_mode_then_autograd(w4a4):
    """Caches filled under inference mode serve later no_grad and autograd calls (no inference tensors
    leak)."""
    model = copy.deepcopy(w4a4)
    clear_quantizer_caches(model)
    x = _inputs(2)
    with torch.inference_mode():
        ref = model(x)
    with torch.no_grad():
        assert same_bits(model(x), ref)
    out = model(x.clone().requires_grad_())
    out.sum().backward()
    assert same_bits(out, ref)


def test_set_buffer_pool_bytes():
    with pytest.raises(ValueError, match="max_bytes"):
        Q.set_buffer_pool_bytes(-1)
    old = Q._POOL.max_bytes
    try:
        Q.set_buffer_pool_bytes(0)
        assert Q._POOL.max_bytes == 0
    finally:
        Q.set_buffer_pool_bytes(old)
