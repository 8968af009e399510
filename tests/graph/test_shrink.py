"""shrink(): physically smaller models that compute what the masked ones compute."""

from __future__ import annotations

import pytest
import torch
from gtools import build, set_masks
from torch import nn
from zoo import ZOO

from prunequant import measure
from prunequant.graph import GraphError, instrument, shrink
from prunequant.graph.plan import kept_positions

#: Minimum number of prunable sites per zoo model (guards against discovery silently regressing).
MIN_SITES = {
    "resnet20": 9, "vgg_small": 6, "mobilenetv2": 18, "lenet5": 4, "bottleneck": 9, "preact_resnet": 3,
    "densenet_block": 8, "unet": 9, "espcn": 2, "sr_upsampler": 4, "dcgan": 3, "split": 9,
    "grouped_se": 6, "shufflenet": 3, "mlp": 2,
}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("name", list(ZOO))
def test_fp32_equivalence_and_measure(name: str) -> None:
    model, gm, x = build(name)
    plan = gm.pq_plan
    assert len(plan.sites) >= MIN_SITES[name], plan.skipped
    with torch.no_grad():
        dense = model(x)
        masked = gm(x)
        small = shrink(gm)
        out = small(x)
    assert not torch.allclose(dense, masked)  # the masks do change the function ...
    assert out.shape == masked.shape
    assert _rel(out, masked) < 1e-5  # ... and removal does not
    assert _n_params(small) < _n_params(gm)
    m0, m1 = measure(gm, x), measure(small, x)
    assert (m0.params, m0.macs) == (m1.params, m1.macs)
    assert m1.params == _n_params(small)  # after removal every parameter counts whole
    # Masks are out of the graph, their records are all ones of the kept size.
    assert not any(n.op == "call_module" and str(n.target).startswith("pq_masks") for n in small.graph.nodes)
    for s in small.pq_plan.sites:
        rec = small.get_submodule(s.mask)
        assert rec.mask.numel() == s.channels and bool((rec.mask == 1).all())
    # The original masked model is untouched.
    with torch.no_grad():
        assert torch.equal(gm(x), masked)


@pytest.mark.parametrize("name", list(ZOO))
def test_quantized_identical_codes(name: str) -> None:
    """W4A4 fake-quant: integer codes of the last layer's input identical (float64 and float32)."""
    _, gm, x = build(name, bits=4)
    plan = gm.pq_plan
    last = list(plan.layers)[-1]
    info = plan.layers[last]
    small = shrink(gm)
    outs, codes = [], []
    runs = [(gm, torch.float64), (small, torch.float64), (gm, torch.float32), (small, torch.float32)]
    for mdl, dtype in runs:
        mdl.to(dtype)
        rec: dict = {}
        h = mdl.get_submodule(info.act_quant).register_forward_hook(
            lambda m, i, o, rec=rec: rec.update(c=m.int_codes(i[0])))
        with torch.no_grad():
            outs.append(mdl(x.to(dtype)))
        h.remove()
        codes.append(rec["c"])
    masks = {s.name: gm.get_submodule(s.mask).mask for s in plan.sites}
    keep = (kept_positions(info.in_width, info.input_taps, masks) if info.input_taps
            else torch.ones(codes[0].shape[1], dtype=torch.bool))
    assert _rel(outs[1], outs[0]) < 1e-12  # the last layer's own sum is not quantized
    assert torch.equal(codes[0][:, keep], codes[1])
    assert torch.equal(codes[2][:, keep], codes[3])
    assert _rel(outs[3], outs[2]) < 1e-5


def test_structures_after_removal() -> None:
    _, gm, x = build("grouped_se")
    small = shrink(gm)
    g = small.get_submodule("grouped.0")
    assert g.groups == 4 and g.in_channels == 16 and g.out_channels == 16
    assert g.weight.shape == (16, 4, 3, 3)
    assert small.get_submodule("se.fc2").out_channels == 16  # the SE gate follows its site
    gn = small.get_submodule("gn")
    assert gn.num_channels == 12 and gn.num_groups == 2  # whole GroupNorm groups removed
    _, gm, x = build("mobilenetv2")
    small = shrink(gm)
    for name, info in small.pq_plan.layers.items():
        m = small.get_submodule(name)
        if info.depthwise:
            assert m.groups == m.in_channels == m.out_channels == m.weight.shape[0]
    _, gm, x = build("dcgan")
    small = shrink(gm)
    ct = small.get_submodule("main.3")
    assert ct.weight.shape == (ct.in_channels, ct.out_channels, 4, 4) and ct.in_channels == 16
    _, gm, x = build("lenet5")
    small = shrink(gm)
    assert small.fc1.in_features == 8 * 36  # 16 -> 8 channels, 6x6 features each


def test_coupled_sites_are_reported() -> None:
    _, gm, _ = build("resnet20")
    reason = gm.pq_plan.skipped["conv1"]
    assert "add" in reason and "layer1.0" in reason
    _, gm, _ = build("espcn")
    assert "output" in gm.pq_plan.skipped["conv3"]


def test_shrink_twice_and_training_step() -> None:
    _, gm, x = build("unet")
    small = shrink(gm)
    again = shrink(small)
    with torch.no_grad():
        assert torch.equal(small(x), again(x))
    small.train()
    small(x).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)


def test_bad_masks_are_refused() -> None:
    _, gm, _ = build("grouped_se")
    site = gm.pq_plan.site("reduce.0")
    assert site.parts == 4
    m = gm.get_submodule(site.mask).mask
    m.fill_(1.0)
    m[:3] = 0.0  # three channels from the first group only: grouped conv would become invalid
    with pytest.raises(GraphError, match="balanced"):
        shrink(gm)
    m.fill_(0.5)
    with pytest.raises(GraphError, match="not binary"):
        shrink(gm)
    with pytest.raises(GraphError, match="pq_plan"):
        shrink(nn.Linear(2, 2))


def test_inplace() -> None:
    _, gm, x = build("vgg_small")
    with torch.no_grad():
        before = gm(x)
    out = shrink(gm, inplace=True)
    assert out is gm
    with torch.no_grad():
        assert _rel(gm(x), before) < 1e-5


def test_without_example_input_simple_routes_still_work() -> None:
    from zoo import randomize

    from prunequant.models import LeNet5

    model = randomize(LeNet5()).eval()
    gm, plan = instrument(model, prune_stat="none")
    assert {s.name for s in plan.sites} >= {"conv1", "conv2", "fc1", "fc2"}
    set_masks(gm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(shrink(gm)(x), gm(x)) < 1e-5


def test_quantize_after_shrink() -> None:
    """The paper's joint pipeline: prune, then quantize and fine-tune the smaller network."""
    from prunequant import Compressor

    _, gm, x = build("resnet20")
    small = shrink(gm)
    before = measure(small, x)
    recipe = {"prune": None, "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 0,
                                       "act_delay": 0, "first_last_bits": None}}
    comp = Compressor(small, recipe, x)
    comp.model.train()
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01)
    for _ in range(3):
        loss = comp.model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    q = comp.finalize()
    m = measure(q, x)
    assert m.params == before.params and m.macs == before.macs
    assert m.weight_mbit == pytest.approx(before.weight_mbit / 8)


def test_identity_and_dropout_inside_a_producer_chain() -> None:
    """conv -> Identity / Dropout -> (BN) -> act is a site (it was missed without a reason)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Dropout(0.2),
                      nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    gm, plan = instrument(m, prune_stat="none", example_input=x)
    assert [s.name for s in plan.sites] == ["0", "3"] and plan.sites[1].norm == "5"
    set_masks(gm)
    with torch.no_grad():
        assert _rel(shrink(gm)(x), gm(x)) < 1e-6


class _Clamp(nn.Module):
    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.a, self.b, self.lo, self.hi = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1), lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.hardtanh(torch.relu(self.a(x)), self.lo, self.hi))


def test_functional_hardtanh_maps_zero_only_if_its_range_holds_zero() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert [s.name for s in instrument(_Clamp(-1.0, 1.0), example_input=x)[1].sites] == ["a"]
    _, plan = instrument(_Clamp(0.5, 1.0), example_input=x)  # after the mask, 0 -> 0.5: not removable
    assert plan.sites == [] and "hardtanh" in plan.skipped["a"]
