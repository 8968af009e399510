"""Params, MACs, BOPs and memory (METHOD section 6), with expected numbers derived by hand from the
layer shapes (textbook formulas), never from a previous run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mtools import Small
from torch import nn

from prunequant import Compressor, measure
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer


def _out(size: int, k: int, s: int = 1, p: int = 0) -> int:
    return (size + 2 * p - k) // s + 1


# ------------------------------------------------------------------------------------- plain models
@pytest.mark.parametrize(
    ("layer", "x_shape", "macs"),
    [
        # Conv: C_out * C_in/groups * kh * kw * H_out * W_out
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (1, 3, 9, 9), 5 * 3 * 9 * _out(9, 3, 2, 1) ** 2),
        (nn.Conv2d(4, 8, (3, 1), padding=(1, 0), groups=2, bias=False), (2, 4, 6, 7), 8 * 2 * 3 * 6 * 7),
        (nn.Conv1d(2, 6, 5), (3, 2, 20), 6 * 2 * 5 * _out(20, 5)),
        # Transposed conv: every input pixel is multiplied into C_out * kh * kw outputs.
        (nn.ConvTranspose2d(4, 3, 2, stride=2), (1, 4, 5, 5), 4 * 3 * 2 * 2 * 5 * 5),
        # Linear: in * out per sample (the batch is not counted).
        (nn.Linear(7, 4), (5, 7), 7 * 4),
    ],
    ids=["conv", "grouped", "conv1d", "convT", "linear"],
)
def test_single_layer_macs_params_memory(layer, x_shape, macs):
    model = nn.Sequential(layer)
    m = measure(model, torch.randn(x_shape))
    n_weights = layer.weight.numel()
    assert m.macs == macs
    assert m.params == sum(p.numel() for p in model.parameters())
    assert m.bops == macs * 32 * 32
    assert m.weight_mbit == pytest.approx(n_weights * 32 / 1e6)
    per_sample_in = 1
    for d in x_shape[1:]:
        per_sample_in *= d
    assert m.act_mbit == pytest.approx(per_sample_in * 32 / 1e6)
    assert m.memory_mbit == pytest.approx(m.weight_mbit + m.act_mbit)
    assert m.density(90.0) == pytest.approx(90.0 / m.memory_mbit)
    assert len(m.layers) == 1 and m.layers[0].weight_bits == m.layers[0].act_bits == 32


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg_small", "mobilenetv2"])
def test_zoo_params_equal_numel_and_instrumented_dense_model_measures_the_same(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, image_size=16, width=0.25)
    x = torch.randn(2, 1, 16, 16)
    plain = measure(model, x)
    assert plain.params == sum(p.numel() for p in model.parameters())
    convs = [mod for mod in model.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert len(plain.layers) == len(convs)
    # Instrumented, nothing pruned or quantized yet: identical numbers.
    comp = Compressor(model, {"prune": {"unit": "steps", "start": 5, "interval": 2, "refresh": 1},
                              "quant": None}, x)
    inst = measure(comp.model, x)
    assert (inst.params, inst.macs, inst.bops) == (plain.params, plain.macs, plain.bops)
    assert inst.memory_mbit == pytest.approx(plain.memory_mbit)
    assert comp.model.training  # measure restores the mode


@pytest.mark.parametrize(
    ("model", "numbers"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)), 4),  # bias folds into the BN's
        (nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), 4),
        (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, bias=True)), 2 * 3 + 4),  # BN on the input
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), 4 + 2 * 4),  # BN after the ReLU
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), 4 + 2 * 4),  # GroupNorm does not fold
        (nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.InstanceNorm2d(4)), 0),  # no stored numbers
    ],
    ids=["conv-bias-bn", "conv-bn", "bn-conv", "conv-relu-bn", "conv-groupnorm", "conv-instancenorm"],
)
def test_float_scale_bias_counts_biases_and_norm_parameters(model, numbers):
    """Float layers have no scales; biases and norm parameters count as in the folded form."""
    m = measure(model, torch.randn(2, 3, 6, 6))
    assert m.scale_bias_mbit == pytest.approx(numbers * 32 / 1e6)
    assert m.deploy_weight_mbit == pytest.approx(m.weight_mbit + numbers * 32 / 1e6)


# ---------------------------------------------------------------------------------- compressed models
class DepthwiseBlock(nn.Module):
    """pw(4->8)-bn-relu -> dw(8, 3x3)-bn-relu -> pw(8->6)-bn-relu -> avgpool -> flatten -> linear(6 -> 5)."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(4, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.pw1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.bn3(self.pw2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _compress(model: nn.Module, x_shape, bits: int = 4,
              sparsity: float = 0.5) -> tuple[Compressor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(x_shape)
    recipe = {
        "prune": {"unit": "steps", "start": 1, "interval": 2, "refresh": 1, "sparsity": sparsity},
        "quant": {"unit": "steps", "weight_bits": bits, "act_bits": bits, "weight_delay": 0, "act_delay": 0,
                  "first_last_bits": None},
        "ordering": "prune_then_quantize",
    }
    comp = Compressor(model, recipe, x)
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    comp.model.train()
    for _ in range(comp.total_steps_hint + 2):
        out = comp.model(torch.randn(x_shape, generator=g))
        loss = out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    return comp, x


def test_compressed_small_model_by_hand():
    comp, x = _compress(Small(), (4, 3, 8, 8))
    kept = {s.name: comp.model.get_submodule(s.mask).kept for s in comp.plan.sites}
    assert kept == {"conv1": 4, "conv2": 3}  # 50 % of 8 and of 6 channels
    c1, c2 = 4, 3
    hw = 8 * 8
    feat = c2 * 4 * 4  # after the 2x2 max pool
    macs = {"conv1": c1 * 3 * 9 * hw, "conv2": c2 * c1 * 9 * hw, "fc": feat * 10}
    weights = {"conv1": c1 * 3 * 9, "conv2": c2 * c1 * 9, "fc": feat * 10}
    acts = {"conv1": 3 * hw, "conv2": c1 * hw, "fc": feat}  # inputs of each layer, remaining channels
    b = 4

    m = measure(comp.model, x)
    assert m.macs == sum(macs.values())
    assert m.weight_mbit == pytest.approx(sum(weights.values()) * b / 1e6)
    assert m.act_mbit == pytest.approx(sum(acts.values()) * b / 1e6)
    assert m.bops == sum(macs.values()) * b * b
    # params: pruned weights, bn1 affine (2 per kept channel), conv2 bias per kept channel, fc bias.
    assert m.params == weights["conv1"] + 2 * c1 + weights["conv2"] + c2 + weights["fc"] + 10
    # scale_bias: per-channel scales of conv1 / conv2 (kept channels) and one for fc; bn1 folds into
    # one bias per kept conv1 channel, conv2 keeps its bias, fc its 10; a range pair per activation
    # quantizer (the inputs of conv1, conv2 and fc).
    n_aq = sum(isinstance(q, ActQuantizer) and bool(q.enabled) for q in comp.model.modules())
    assert n_aq == 3
    numbers = (c1 + c1) + (c2 + c2) + (1 + 10) + 2 * n_aq
    assert m.scale_bias_mbit == pytest.approx(numbers * 32 / 1e6)
    assert m.deploy_weight_mbit == pytest.approx(m.weight_mbit + m.scale_bias_mbit)
    by_name = {r.name: r for r in m.layers}
    for name in macs:
        r = by_name[name]
        assert (r.macs, r.weights, r.act_elements) == (macs[name], weights[name], acts[name]), name
        assert r.weight_bits == r.act_bits == b
        assert r.macs * r.weight_bits * r.act_bits == macs[name] * 16  # BOPs = MACs x b_w x b_a

    # Against the same model dense and in float: the drop is what the masks and bits say.
    dense = measure(Small(), x)
    assert dense.macs == 8 * 3 * 9 * hw + 6 * 8 * 9 * hw + 96 * 10
    assert dense.weight_mbit == pytest.approx((8 * 3 * 9 + 6 * 8 * 9 + 96 * 10) * 32 / 1e6)
    assert m.weight_mbit < dense.weight_mbit / 8 * 1.01  # >= 2x fewer weights and 8x fewer bits


def test_measure_with_masks_but_float_and_quantized_but_unpruned():
    """Each ingredient alone: masks only change counts, quantizers only change bits."""
    model = Small()
    x = torch.randn(2, 3, 8, 8)
    comp = Compressor(model, {"prune": {"unit": "steps", "start": 0, "interval": 1, "refresh": 1},
                              "quant": {"unit": "steps", "weight_bits": 8, "act_bits": 6, "weight_delay": 5,
                                        "act_delay": 5, "first_last_bits": None},
                              "ordering": "prune_then_quantize"}, x)
    dense = measure(comp.model, x)
    for mk in (comp.model.get_submodule(s.mask) for s in comp.plan.sites):
        mk.mask.copy_(torch.tensor([0.0, 1.0] * (mk.channels // 2)))  # half of the channels, by hand
    pruned = measure(comp.model, x)
    assert pruned.macs == 4 * 3 * 9 * 64 + 3 * 4 * 9 * 64 + 48 * 10
    assert pruned.bops == pruned.macs * 32 * 32
    for mk in (comp.model.get_submodule(s.mask) for s in comp.plan.sites):
        mk.mask.fill_(1.0)
    # Enable quantizers by hand (activation statistics from one training forward).
    for q in comp.model.modules():
        if isinstance(q, (ActQuantizer, WeightQuantizer)):
            q.enabled.fill_(True)
    comp.model.train()
    comp.model(x)
    quant = measure(comp.model, x)
    assert quant.macs == dense.macs and quant.params == dense.params
    assert quant.bops == dense.macs * 8 * 6
    assert quant.weight_mbit == pytest.approx(dense.weight_mbit * 8 / 32)
    assert quant.act_mbit == pytest.approx(dense.act_mbit * 6 / 32)


def test_depthwise_tied_to_its_site():
    comp, x = _compress(DepthwiseBlock(), (4, 4, 6, 6), bits=8)
    sites = {s.name: s for s in comp.plan.sites}
    assert set(sites) == {"pw1", "pw2"}
    assert sites["pw1"].tied == ["dw"]
    k1 = comp.model.get_submodule(sites["pw1"].mask).kept
    k2 = comp.model.get_submodule(sites["pw2"].mask).kept
    assert (k1, k2) == (4, 3)
    hw = 36
    macs = {"pw1": k1 * 4 * hw, "dw": k1 * 9 * hw, "pw2": k2 * k1 * hw, "fc": k2 * 5}
    m = measure(comp.model, x)
    assert {r.name: r.macs for r in m.layers} == macs
    assert m.bops == sum(macs.values()) * 8 * 8
    # bn1 and bn2 (tied) keep k1 channels, bn3 keeps k2: 2 affine parameters each.
    n_w = k1 * 4 + k1 * 9 + k2 * k1 + k2 * 5
    assert m.params == n_w + 2 * k1 + 2 * k1 + 2 * k2 + 5
    # scale_bias: every conv has per-channel scales and a BatchNorm that folds into one bias per
    # kept channel; fc has one scale and 5 biases; a range pair per activation quantizer.
    n_aq = sum(isinstance(q, ActQuantizer) and bool(q.enabled) for q in comp.model.modules())
    assert n_aq == 4
    assert m.scale_bias_mbit == pytest.approx((2 * k1 + 2 * k1 + 2 * k2 + 1 + 5 + 2 * n_aq) * 32 / 1e6)
    assert m.weight_mbit == pytest.approx(n_w * 8 / 1e6)


def test_measure_right_after_construction_with_live_quantizers():
    """Joint ordering with zero delays: quantizers are on before any data was seen. measure needs
    only shapes and bit-widths, so it must work and leave the quantizers as they were."""
    x = torch.randn(2, 3, 8, 8)
    comp = Compressor(Small(), {"prune": None, "quant": {"unit": "steps", "weight_bits": 4, "act_bits": 8,
                                                         "weight_delay": 0, "act_delay": 0,
                                                         "first_last_bits": None},
                                "ordering": "joint"}, x)
    aqs = [q for q in comp.model.modules() if isinstance(q, ActQuantizer)]
    assert aqs and all(bool(q.enabled) and float(q.stat_count) == 0 for q in aqs)
    m = measure(comp.model, x)
    hw = 64
    macs = 8 * 3 * 9 * hw + 6 * 8 * 9 * hw + 96 * 10
    assert m.macs == macs and m.bops == macs * 4 * 8
    assert all(bool(q.enabled) and float(q.stat_count) == 0 for q in aqs)


@pytest.mark.parametrize("root_training", [True, False])
def test_measure_keeps_every_module_mode(root_training: bool) -> None:
    """measure() runs in eval mode and gives each module its own mode back (a frozen BatchNorm stays)."""
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=16, width=0.25)
    model.train(root_training)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.train(not root_training)
    before = [m.training for m in model.modules()]
    measure(model, torch.randn(2, 3, 16, 16))
    assert [m.training for m in model.modules()] == before
