"""BatchNorm folding (deployment form) and the packed format's folded, compact layout."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import deployable, eval_inputs, make_model, out_step, torch_run

from prunequant import Compressor, measure
from prunequant.export import HEADER_BYTES, fold_batchnorm, load_packed, packed_size_report, save_packed
from prunequant.export.fold import fold_pairs
from prunequant.export.packed import read_packed
from prunequant.graph.ops import NORM_TYPES
from prunequant.models import build_model

DATA = Path(__file__).parent / "data"


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(fraction of samples within one 8-bit output step, argmax agreement)."""
    step = out_step(a)
    within = float(np.mean(np.abs(a - b).reshape(len(a), -1).max(axis=1) <= step + 1e-6))
    return within, float(np.mean(a.argmax(1) == b.argmax(1)))


@pytest.mark.parametrize("name,bits", [("resnet20", (8, 8)), ("resnet20", (4, 4)), ("mobilenetv2", (8, 8))])
def test_folded_model_matches_trained(name, bits):
    model, _ = deployable(name, *bits)
    folded = fold_batchnorm(model)
    pairs = fold_pairs(model)
    assert pairs and sorted(folded.pq_folded) == sorted(bn for _, bn in pairs)
    assert fold_pairs(folded) == []  # nothing left to fold
    for bn_name in folded.pq_folded:
        bn = folded.get_submodule(bn_name)
        assert bn.eps == 0.0 and torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
        assert torch.all(bn.weight.abs() == 1)
    x = eval_inputs(name)
    within, agree = _agreement(torch_run(model, x), torch_run(folded, x))
    assert within >= 0.99 and agree >= 0.99, (within, agree)
    # the original is untouched
    assert all(model.get_submodule(bn).eps > 0 for bn in folded.pq_folded)


def test_negative_and_zero_gamma_are_folded_exactly_enough():
    model, _ = deployable("resnet20", 8, 8)
    m = copy.deepcopy(model)
    for attr in ("pq_plan", "pq_original_class", "pq_leaves"):
        setattr(m, attr, getattr(model, attr))
    bns = [mod for mod in m.modules() if isinstance(mod, NORM_TYPES)]
    with torch.no_grad():
        for bn in bns[:3]:
            bn.weight[::2] *= -1.0  # negative gamma: sign goes into the BatchNorm, codes unchanged
            bn.weight[1] = 0.0  # constant channel: output is the folded bias
    x = eval_inputs("resnet20")[:256]
    ref, out = torch_run(m, x), torch_run(fold_batchnorm(m), x)
    within, agree = _agreement(ref, out)
    assert within >= 0.99 and agree >= 0.99, (within, agree)
    f = fold_batchnorm(m)
    assert any(bool((f.get_submodule(n).weight < 0).any()) for n in f.pq_folded)


@pytest.mark.parametrize("name,bits", [("resnet20", (4, 4)), ("mobilenetv2", (8, 8))])
def test_folded_packed_roundtrip_is_bit_identical_to_the_folded_model(tmp_path, name, bits):
    model, _ = deployable(name, *bits)
    plain = save_packed(model, tmp_path / "plain.pqpack")
    path = save_packed(model, tmp_path / "folded.pqpack", fold_bn=True)
    loaded = load_packed(path, functools.partial(make_model, name))
    ref = fold_batchnorm(model).eval()
    x = eval_inputs(name)
    with torch.no_grad():
        a, b = ref(x), loaded(x)
    assert a.view(torch.int32).equal(b.view(torch.int32))
    assert sorted(loaded.pq_folded) == sorted(ref.pq_folded)
    # 2 float32 numbers + 1 sign bit per folded channel instead of 5 float32 numbers
    channels = sum(model.get_submodule(bn).num_features for bn in ref.pq_folded)
    saved = plain.stat().st_size - path.stat().st_size
    signs = sum((model.get_submodule(bn).num_features + 7) // 8 for bn in ref.pq_folded)
    assert abs(saved - (12 * channels - signs)) <= 300, (saved, channels)  # 300: the record's growth
    # a folded file re-saved from the loaded model is byte-identical
    again = save_packed(loaded, tmp_path / "again.pqpack")
    assert again.read_bytes() == path.read_bytes()


def test_power_of_two_scales_are_not_folded():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25)
    x = torch.randn(16, 1, 8, 8)
    quant = {"weight_bits": 4, "act_bits": 8, "unit": "steps", "weight_delay": 0, "act_delay": 0,
             "power_of_two": True}
    comp = Compressor(model, {"prune": None, "quant": quant}, x[:4])
    comp.model(x)
    comp.step()
    fm = comp.finalize()
    assert fold_pairs(fm) == []
    assert fold_batchnorm(fm).pq_folded == []


def test_version_1_files_still_load():
    """A file written by the version-1 writer (prunequant 0.1.0) loads and computes what it did."""
    loaded = load_packed(DATA / "resnet20_w4a4_v1.pqpack", functools.partial(make_model, "resnet20"))
    x = torch.from_numpy(np.load(DATA / "resnet20_w4a4_v1_in.npy"))
    want = np.load(DATA / "resnet20_w4a4_v1_out.npy")
    with torch.no_grad():
        got = loaded(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert np.array_equal(got.argmax(1), want.argmax(1))


@functools.cache
def _cifar(name: str, wb: int, ab: int):
    """A zoo model at full width on 3x32x32 inputs, 50 % of the prunable channels removed and shrunk
    (sizes depend on shapes and bits only, so a few calibration steps on noise suffice)."""
    torch.manual_seed(0)
    make = functools.partial(build_model, name, num_classes=10, in_channels=3, image_size=32)
    x = torch.randn(8, 3, 32, 32)
    comp = Compressor(make(), {
        "ordering": "joint",
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 1, "interval": 1, "refresh": 1},
        "quant": {"weight_bits": wb, "act_bits": ab, "unit": "steps", "weight_delay": 0, "act_delay": 0}},
        x[:2])
    with torch.no_grad():
        for _ in range(comp.total_steps_hint + 2):
            comp.model(x)
            comp.step()
    return comp.finalize(), x[:2], make


@pytest.mark.parametrize(("name", "wb", "ab"), [("resnet20", 8, 8), ("resnet20", 4, 4), ("resnet20", 2, 8),
                                                ("mobilenetv2", 4, 4), ("mobilenetv2", 2, 8)])
def test_folded_file_within_five_percent_of_deployed_weight_memory(tmp_path, name, wb, ab):
    """The folded file is within 5 % (+ the 32-byte header) of measure()'s ``deploy_weight_mbit``:
    the b-bit weights plus the float32 scale and bias per channel that integer inference keeps.

    Against ``weight_mbit`` alone (the paper's b x #weights) it is not at 4 and 2 bits: 8 bytes of
    scale and bias per channel exceed 5 % of a channel with fewer than 1,280 weight bits
    (docs/export.md). The plain file, with 20 bytes of float32 per BatchNorm channel, is over 5 % of
    both."""
    model, ex, make = _cifar(name, wb, ab)
    path = save_packed(model, tmp_path / f"{name}.pqpack", fold_bn=True)
    m = measure(model, ex)
    deploy_bytes = m.deploy_weight_mbit * 1e6 / 8
    weight_bytes = m.weight_mbit * 1e6 / 8
    size = path.stat().st_size
    assert size <= 1.05 * deploy_bytes + HEADER_BYTES, (size, deploy_bytes)
    assert size >= weight_bytes  # nothing is missing: the packed codes alone are the paper's memory
    assert packed_size_report(path)["record"] < 0.02 * size  # the JSON record is small next to the data
    if wb <= 4:
        assert size > 1.05 * weight_bytes + HEADER_BYTES  # the per-channel bound above, not padding
    loaded = load_packed(path, make)
    with torch.no_grad():
        assert torch.equal(fold_batchnorm(model).eval()(ex), loaded(ex))
    plain = save_packed(model, tmp_path / "plain.pqpack").stat().st_size
    assert plain > 1.05 * deploy_bytes + HEADER_BYTES


def test_conv_bias_is_absorbed_into_the_folded_bias(tmp_path):
    def make():
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1, bias=True), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=True), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))

    torch.manual_seed(0)
    net = make()
    x = torch.randn(64, 1, 8, 8)
    quant = {"weight_bits": 8, "act_bits": 8, "unit": "steps", "weight_delay": 0, "act_delay": 0}
    comp = Compressor(net, {"prune": None, "quant": quant}, x[:4])
    with torch.no_grad():
        for bn in (m for m in comp.model.modules() if isinstance(m, NORM_TYPES)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
        for conv in (m for m in comp.model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.bias.uniform_(-1, 1)
    comp.model.train()
    with torch.no_grad():
        for _ in range(3):
            comp.model(x)
            comp.step()
    fm = comp.finalize()
    folded = fold_batchnorm(fm)
    assert len(folded.pq_folded) == 2
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.all(c.bias == 0) for c in convs)
    fm.eval()
    within, agree = _agreement(torch_run(fm, x), torch_run(folded, x))
    assert within >= 0.98 and agree >= 0.98, (within, agree)
    with torch.no_grad():
        diff = (fm(x) - folded(x)).abs().max()
    assert diff < 0.05 * fm(x).abs().max(), diff
    path = save_packed(fm, tmp_path / "b.pqpack", fold_bn=True)
    assert "Z" in read_packed(path)[0]["kinds"]  # the zeroed conv biases are not stored
    with torch.no_grad():
        assert torch.equal(load_packed(path, make)(x), folded.eval()(x))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_integer_bias_is_the_float_bias_rounded_to_the_accumulator_grid(name):
    """``fold_batchnorm(integer_bias=True)``: where the conv's input is quantized, each folded bias is
    an integer multiple of ``s_x * s'_c`` within half a step of the float32 folded bias; elsewhere it is
    that float bias. Weights and scales are those of the plain fold."""
    from prunequant.export.fold import input_step
    from prunequant.graph.instrument import weight_quantizer

    model, _ = deployable(name, 8, 8)
    plain, grid = fold_batchnorm(model), fold_batchnorm(model, integer_bias=True)
    assert plain.pq_folded == grid.pq_folded
    n_grid = 0
    for conv_name, bn_name in fold_pairs(model):
        a, b = plain.get_submodule(bn_name).bias.double(), grid.get_submodule(bn_name).bias.double()
        wq = weight_quantizer(grid.get_submodule(conv_name))
        assert torch.equal(wq.scale(), weight_quantizer(plain.get_submodule(conv_name)).scale())
        sx = input_step(grid, conv_name)
        if sx is None:
            assert torch.equal(a, b)
            continue
        n_grid += 1
        step = (torch.tensor(sx, dtype=torch.float32) * wq.scale()).double()
        codes = b / step
        # on the grid, up to float32's rounding of codes * step
        assert torch.all((codes - codes.round()).abs() <= 1e-3 + 1e-6 * codes.abs()), bn_name
        assert torch.all((a - b).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6 * a.abs()), bn_name
    assert n_grid >= 1
