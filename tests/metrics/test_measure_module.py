"""measure_module (cost of a plain nn.Module at given bits, METHOD section 6) and count_levels.

Expected numbers come from the layer shapes by hand, or from prunequant's own ``measure`` of the same
network compressed with a Compressor (the definitions must agree, since peers measured with
``measure_module`` sit in one table with prunequant's cells)."""

from __future__ import annotations

import pytest
import torch
from mtools import Small

from prunequant import Compressor, measure
from prunequant.metrics.measure import count_levels, measure_module
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer


def test_small_by_hand_with_bits_and_kept_channels() -> None:
    x = torch.randn(2, 3, 8, 8)
    hw = 64
    # conv1's outputs (and bn1, conv2's inputs) masked to 4 of 8 channels; conv1 input at 8 bits,
    # fc weights and input at 8 bits, everything else W4A4.
    m = measure_module(Small(), x, 4, 4, layer_bits={"conv1": (None, 8), "fc": (8, 8)},
                       keep={"conv1": (1.0, 0.5), "bn1": (0.5, 0.5), "conv2": (0.5, 1.0)})
    macs = {"conv1": 4 * 3 * 9 * hw, "conv2": 6 * 4 * 9 * hw, "fc": 96 * 10}
    weights = {"conv1": 4 * 3 * 9, "conv2": 6 * 4 * 9, "fc": 96 * 10}
    acts = {"conv1": 3 * hw, "conv2": 4 * hw, "fc": 96}
    bits = {"conv1": (4, 8), "conv2": (4, 4), "fc": (8, 8)}
    assert m.macs == sum(macs.values())
    assert m.bops == sum(macs[n] * bits[n][0] * bits[n][1] for n in macs)
    assert m.weight_mbit == pytest.approx(sum(weights[n] * bits[n][0] for n in macs) / 1e6)
    assert m.act_mbit == pytest.approx(sum(acts[n] * bits[n][1] for n in macs) / 1e6)
    assert m.memory_mbit == pytest.approx(m.weight_mbit + m.act_mbit)
    # bn1: 2 x 4 kept channels; conv2 bias: 6; fc bias: 10.
    assert m.params == weights["conv1"] + 2 * 4 + weights["conv2"] + 6 + weights["fc"] + 10
    assert m.density(50.0) == pytest.approx(50.0 / m.memory_mbit)
    assert {r.name: (r.weight_bits, r.act_bits) for r in m.layers} == bits


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg_small"])
def test_float_model_measures_like_measure(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1, image_size=28)
    x = torch.randn(2, 1, 28, 28)
    a, b = measure_module(model, x), measure(model, x)
    assert (a.macs, a.params, a.bops) == (b.macs, b.params, b.bops)
    assert a.weight_mbit == pytest.approx(b.weight_mbit) and a.act_mbit == pytest.approx(b.act_mbit)
    assert a.params == sum(p.numel() for p in model.parameters())


def test_masked_resnet20_at_w4a4_equals_prunequant_measure() -> None:
    """Kept fractions + bits given by hand == prunequant's measure of the same masks and quantizers."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    plain = build_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    model.load_state_dict(plain.state_dict())
    recipe = {"prune": {"unit": "steps", "start": 0, "interval": 1, "refresh": 1},
              "quant": {"unit": "steps", "weight_bits": 4, "act_bits": 4, "weight_delay": 5, "act_delay": 5,
                        "per_layer": {"conv1": {"act_bits": 8}, "fc": {"weight_bits": 8, "act_bits": 8}}}}
    comp = Compressor(model, recipe, x)
    keep = {}
    for i, s in enumerate(comp.plan.sites):
        mk = comp.model.get_submodule(s.mask)
        kept = 1 + i % (mk.channels - 1)  # a different count per site
        mk.mask.zero_()
        mk.mask[:kept] = 1.0
        f = kept / mk.channels
        block = s.name.rsplit(".", 1)[0]
        keep.update({f"{block}.conv1": (1.0, f), f"{block}.bn1": (f, f), f"{block}.conv2": (f, 1.0)})
    assert len(keep) == 27  # nine block-internal sites
    for q in comp.model.modules():
        if isinstance(q, (ActQuantizer, WeightQuantizer)):
            q.enabled.fill_(True)
    comp.model.train()
    comp.model(x)
    ref = measure(comp.model, x)
    got = measure_module(plain, x, 4, 4, layer_bits={"conv1": (None, 8), "fc": (8, 8)}, keep=keep)
    assert (got.macs, got.bops, got.params) == (ref.macs, ref.bops, ref.params)
    assert got.weight_mbit == pytest.approx(ref.weight_mbit)
    assert got.act_mbit == pytest.approx(ref.act_mbit)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no module named 'conv9'"):
        measure_module(Small(), torch.randn(1, 3, 8, 8), keep={"conv9": (1.0, 0.5)})


def test_count_levels() -> None:
    t = torch.arange(16, dtype=torch.float32).repeat(5) * 0.37 - 2.0
    assert count_levels(t) == 16
    assert count_levels(torch.cat([t, t[:3]])) == 16
    assert count_levels(torch.cat([t, torch.tensor([100.0, float("nan")])])) == 17  # NaN is no level
    # Per-channel weights: two channels with their own scales, both on the codes -8..7 (16 levels),
    # 31 distinct float values between them (both have 0).
    codes = torch.arange(-8, 8, dtype=torch.float32)
    scale = torch.tensor([0.1, 0.03])
    w = torch.stack([codes * scale[0], codes.flip(0) * scale[1]]).reshape(2, 4, 2, 2)
    assert count_levels(w) == 31
    assert count_levels(w, scale, axis=0) == 16
    # one unsaturated code (+8) in one channel: 17 levels, not 4 bits any more
    w[1, 0, 0, 0] = 8 * scale[1]
    assert count_levels(w, scale, axis=0) == 17
    assert count_levels(w.transpose(0, 1), scale, axis=1) == 17
    assert count_levels(torch.full((3, 3), 0.25), 0.25) == 1
