"""Channel groups across residual adds and gating products: found where they should be, refused with a
reason where they cannot be exact, and masked == physically smaller on every architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gtools import build, calibrate, set_masks
from torch import Tensor, nn
from zoo import ZOO, randomize

from prunequant import measure
from prunequant.graph import instrument, shrink
from prunequant.graph.plan import kept_positions
from prunequant.models import build_model
from prunequant.prune.mask import ChannelMask, aggregate_stat


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def _equivalent(model: nn.Module, x: Tensor, bits: int | None = None, sparsity: float = 0.5, seed: int = 1):
    """Instrument with groups, random masks, shrink: outputs equal, measure equal; returns (gm, plan)."""
    gm, plan = instrument(model.eval(), prune_stat="none", example_input=x, groups=True,
                          weight_bits=bits, act_bits=bits)
    set_masks(gm, sparsity, seed=seed)
    if bits is not None:
        calibrate(gm, tuple(x.shape))
    gm.eval()
    with torch.no_grad():
        masked = gm(x)
        small = shrink(gm)
        out = small(x)
    assert _rel(out, masked) < 1e-5
    m0, m1 = measure(gm, x), measure(small, x)
    assert (m0.params, m0.macs, m0.act_mbit) == (m1.params, m1.macs, m1.act_mbit)
    assert m1.params == sum(p.numel() for p in small.parameters())
    return gm, plan


def _groups(plan) -> dict:
    return {s.name: s for s in plan.sites if s.kind == "group"}


# ------------------------------------------------------------------------------ the paper's network
def test_resnet20_groups_are_the_three_stages() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    x = torch.randn(2, 1, 28, 28)
    _, plan = instrument(model, example_input=x, groups=True)
    g = _groups(plan)
    assert list(g) == ["group:conv1", "group:layer2.0.conv2", "group:layer3.0.conv2"]
    assert g["group:conv1"].producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert g["group:layer2.0.conv2"].members == ["layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"]
    assert g["group:conv1"].channels == 16 and g["group:layer3.0.conv2"].channels == 64
    # every stage's consumers: next blocks' conv1, the next stage's conv1 and shortcut, the classifier
    assert set(g["group:layer3.0.conv2"].consumers) == {"layer3.1.conv1", "layer3.2.conv1", "fc"}
    assert "conv1" not in plan.skipped  # coupled as a site, pruned as a member
    # statistics points: where consumers read the group (the stem's activation, each block output)
    assert gm_points(model, x) == {"group:conv1": 4, "group:layer2.0.conv2": 3, "group:layer3.0.conv2": 3}
    # the block-internal sites are the same with and without groups, in forward order around the groups
    fresh = build_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    _, off = instrument(fresh, example_input=x)
    assert [s.name for s in plan.sites if s.kind == "site"] == [s.name for s in off.sites]
    assert "groups" not in off.options and plan.options["groups"] is True
    names = [s.name for s in plan.sites]
    assert names.index("layer2.0.conv1") < names.index("group:layer2.0.conv2") < names.index("layer2.1.conv1")


def gm_points(model: nn.Module, x: Tensor) -> dict[str, int]:
    gm, plan = instrument(model, example_input=x, groups=True)
    return {s.name: gm.get_submodule(s.mask).points for s in plan.sites if s.kind == "group"}


@pytest.mark.parametrize("bits", [None, 4])
def test_resnet20_masked_equals_smaller(bits: int | None) -> None:
    torch.manual_seed(0)
    model = randomize(build_model("resnet20", num_classes=10, in_channels=1, image_size=28))
    x = torch.randn(4, 1, 28, 28)
    gm, _ = _equivalent(model, x, bits=bits)
    off = measure(instrument(model, example_input=x)[0], x)  # nothing masked: the dense counts
    assert measure(shrink(gm), x).act_mbit < 0.6 * off.act_mbit  # the residual streams shrink too


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_groups_identical_codes(name: str) -> None:
    """W4A4 with groups on: integer codes at the last layer's input identical, masked vs smaller (float64)."""
    _, gm, x = build(name, bits=4, groups=True)
    plan = gm.pq_plan
    assert bool(_groups(plan)) == (name in ("resnet20", "mobilenetv2", "bottleneck", "preact_resnet"))
    last = list(plan.layers)[-1]
    info = plan.layers[last]
    small = shrink(gm)
    codes = []
    for mdl in (gm, small):
        mdl.double()
        rec: dict = {}
        h = mdl.get_submodule(info.act_quant).register_forward_hook(
            lambda m, i, o, rec=rec: rec.update(c=m.int_codes(i[0])))
        with torch.no_grad():
            mdl(x.double())
        h.remove()
        codes.append(rec["c"])
    masks = {s.name: gm.get_submodule(s.mask).mask for s in plan.sites}
    keep = (kept_positions(info.in_width, info.input_taps, masks) if info.input_taps
            else torch.ones(codes[0].shape[1], dtype=torch.bool))
    assert torch.equal(codes[0][:, keep], codes[1])


# --------------------------------------------------------------------------- architectures of our own
class GatedResidual(nn.Module):
    """Stem, then x + a * sigmoid(b) (a gated branch: a product of two conv outputs joins the group)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        return self.head(F.relu(s + self.a(s) * self.b(s)))


class ConcatAfterResidual(nn.Module):
    """A residual group concatenated with a block-internal site before a conv (offsets in the cat)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.side = nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU())
        self.mix = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        r = F.relu(s + self.res(s))
        return self.mix(torch.cat([self.side(s), r], dim=1))


class GroupedResidual(nn.Module):
    """Grouped convs as members and as consumers: every group of channels loses the same number."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
        self.g1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8))
        self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.act = nn.PReLU(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        y = self.act(s + self.g1(s))
        return self.head(y + self.g2(y))


class MLPResidual(nn.Module):
    """Residual MLP on [N, C] features: linear layers are members and consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.f1 = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.f2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.f1(h)
        h = h + 0.5 * self.f2(h)
        return self.out(F.relu(h))


class ChainWithPool(nn.Module):
    """Blocks joined through pooling and dropout on the shortcut, two stages with a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12))
        self.proj = nn.Conv2d(8, 12, 1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 2))

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        s = F.relu(self.drop(s) + self.b1(s))
        t = self.down(s) + self.proj(F.avg_pool2d(s, 2))
        return self.head(F.relu(t))


OWN = {"gated": (GatedResidual, (2, 3, 8, 8), 1), "concat": (ConcatAfterResidual, (2, 3, 8, 8), 1),
       "grouped": (GroupedResidual, (2, 3, 8, 8), 1), "mlp": (MLPResidual, (4, 12), 1),
       "chain": (ChainWithPool, (2, 3, 8, 8), 2)}


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("name", list(OWN))
def test_own_architectures(name: str, bits: int | None) -> None:
    cls, shape, n_groups = OWN[name]
    torch.manual_seed(0)
    model = randomize(cls())
    x = torch.randn(*shape)
    gm, plan = _equivalent(model, x, bits=bits)
    g = _groups(plan)
    assert len(g) == n_groups, plan.skipped
    for s in g.values():
        assert gm.get_submodule(s.mask).kept < s.channels  # something was removed from each group


def test_own_architecture_structure() -> None:
    x = torch.randn(2, 3, 8, 8)
    _, plan = instrument(GroupedResidual(), example_input=x, groups=True)
    (g,) = _groups(plan).values()
    assert g.producers == ["stem.0", "g1.0", "g2"]
    assert g.block == 2 and g.part == 4  # GroupNorm groups of 2; grouped convs: halves stay balanced
    assert {"stem.1", "g1.1", "act"} <= set(g.channel_modules)  # norms and the per-channel PReLU
    _, plan = instrument(GatedResidual(), example_input=x, groups=True)
    assert _groups(plan)["group:stem.0"].members == ["a.0", "b.0"]
    _, plan = instrument(ConcatAfterResidual(), example_input=x, groups=True)
    assert set(_groups(plan)["group:stem.0"].consumers) == {"res.0", "side.0", "mix"}
    (tap,) = [t for t in plan.layers["mix"].input_taps if t.site == "group:stem.0"]
    assert (tap.offset, tap.lo, tap.hi) == (4, 0, 6)  # after the 4 channels of side.0 in the cat


# ----------------------------------------------------------------------------- refused, with a reason
class InputResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(x + self.c(x)))


class OutputResidual(nn.Module):
    """A global residual (super-resolution style): the group is the model output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        return s + self.body(s)


def test_groups_that_cannot_be_exact_are_reported() -> None:
    x = torch.randn(2, 3, 8, 8)
    _, plan = instrument(InputResidual(), example_input=x, groups=True)
    assert not _groups(plan)
    assert "joined with placeholder" in plan.skipped["group:c"]
    _, plan = instrument(OutputResidual(), example_input=x, groups=True)
    assert not _groups(plan)
    assert "model output" in plan.skipped["group:stem"]
    assert [s.name for s in plan.sites] == ["body.0"]  # the block-internal site is still pruned
    _, plan = instrument(OutputResidual(), example_input=x, groups=True, exclude=["body.2"])
    assert plan.skipped["group:stem"] == "excluded by pattern (member 'body.2')"


def test_groups_need_an_example_input() -> None:
    _, plan = instrument(GatedResidual(), groups=True)
    assert not _groups(plan)


# ------------------------------------------------------------------------------------- statistics
def test_group_statistics_points_and_aggregate() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gm, plan = instrument(ChainWithPool(), example_input=x, groups=True, group_stat="max")
    g = _groups(plan)["group:stem.0"]
    cm = gm.get_submodule(g.mask)
    assert cm.points == 2 and cm.aggregate == "max" and tuple(cm.stat_sum.shape) == (2, 8)
    rec: dict = {}
    gm.train()
    cm.collecting.fill_(True)
    seen = []
    h = cm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().mean(dim=(0, 2, 3))
                                                              if len(a) == 1 or a[1] is not False else None))
    with torch.no_grad():
        gm(x)
    h.remove()
    rows = [s for s in seen if s is not None]
    assert len(rows) == 2 and torch.equal(cm.stat_count, torch.ones(2, dtype=torch.float64))
    expect = torch.stack(rows).double().amax(dim=0)
    assert torch.allclose(cm.mean_stat(), expect)
    cm.aggregate = "mean"
    assert torch.allclose(cm.mean_stat(), torch.stack(rows).double().mean(dim=0))
    del rec


def test_aggregate_stat_skips_points_without_data() -> None:
    s = torch.tensor([[2.0, 4.0], [9.0, 9.0]], dtype=torch.float64)
    c = torch.tensor([2.0, 0.0], dtype=torch.float64)
    assert torch.equal(aggregate_stat(s, c, "max"), torch.tensor([1.0, 2.0], dtype=torch.float64))
    none = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(aggregate_stat(s, none), none)
    with pytest.raises(ValueError, match="allowed"):
        ChannelMask(4, aggregate="median")


# ----------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name,min_groups", [("resnet18", 4), ("mobilenet_v2", 5), ("efficientnet_b0", 5),
                                             ("regnet_x_400mf", 4)])
def test_torchvision_groups(name: str, min_groups: int) -> None:
    from tvshim import import_torchvision

    models = import_torchvision().models
    torch.manual_seed(0)
    model = getattr(models, name)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    gm, plan = _equivalent(model, x)
    assert len(_groups(plan)) >= min_groups, {k: v for k, v in plan.skipped.items() if k.startswith("group")}
    off, _ = instrument(getattr(models, name)(weights=None).eval(), prune_stat="none", example_input=x)
    set_masks(off, 0.5)
    assert measure(shrink(gm), x).macs < measure(shrink(off), x).macs


# ----------------------------------------------------------------------------------- channels-last
class TokenMLP(nn.Module):
    """A transformer-style MLP over [N, T, C] tokens and a channels-last block over [N, H, W, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.drop = nn.Dropout(0.1)
        self.pw1 = nn.Linear(3, 12)
        self.pw2 = nn.Linear(12, 6)
        self.head = nn.Linear(8 + 6, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.fc2(self.drop(F.gelu(self.fc1(tokens))) * 0.5)  # [N, T, 8]
        img = tokens[:, :, :3].reshape(tokens.shape[0], 2, 2, 3)  # a channels-last "image" [N, 2, 2, 3]
        g = self.pw2(torch.relu(self.pw1(img))).mean(dim=(1, 2))
        return self.head(torch.cat([h.mean(dim=1), g], dim=1))


@pytest.mark.parametrize("bits", [None, 4])
def test_channels_last_linear_sites(bits: int | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    gm, plan = _equivalent(randomize(TokenMLP()), x, bits=bits)
    sites = {s.name: s for s in plan.sites}
    assert sites["fc1"].dim == -1 and sites["pw1"].dim == -1
    assert sites["fc1"].consumers == ["fc2"] and sites["pw1"].consumers == ["pw2"]
    assert gm.get_submodule(sites["fc1"].mask).dim == -1


def test_convnext_mlp_and_stream_groups() -> None:
    """torchvision ConvNeXt: the MLP of every block (linear layers over channels-last tensors) is a site;
    with groups on, each stage's stream is a group across layouts: the stem / downsampling conv and the
    blocks' last linear layers lose the same channels, so do the depthwise convs, every LayerNorm over
    them (computed on the kept channels) and the layer scales."""
    from tvshim import import_torchvision

    models = import_torchvision().models
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    _, off = instrument(models.convnext_tiny(weights=None).eval(), prune_stat="none", example_input=x)
    assert len(off.sites) == 18 and all(s.dim == -1 for s in off.sites)
    model = models.convnext_tiny(weights=None).eval()
    gm, plan = _equivalent(model, x)
    g = _groups(plan)
    assert list(g) == ["group:features.0.0", "group:features.2.1", "group:features.4.1", "group:features.6.1"]
    s = g["group:features.0.0"]
    assert s.members == ["features.1.0.block.5", "features.1.1.block.5", "features.1.2.block.5"]
    assert sorted(s.tied) == ["features.1.0.block.0", "features.1.1.block.0", "features.1.2.block.0"]
    assert {"features.0.1", "features.2.0", "features.1.0.block.2"} <= set(s.layer_norms)
    assert sorted(s.params) == [f"features.1.{i}.layer_scale" for i in range(3)]
    small = shrink(gm)
    assert small.get_parameter("features.0.1.weight").shape == (48,)  # LayerNorm2d, traced through
    assert small.get_submodule("features.1.0.block.2").normalized_shape == (48,)  # nn.LayerNorm
    assert small.get_parameter("features.1.0.layer_scale").shape == (48, 1, 1)
    assert measure(small, x).macs < 0.3 * measure(model, x).macs


def test_masked_layer_norm_is_layer_norm_of_the_kept_channels() -> None:
    from prunequant.prune.mask import masked_layer_norm

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 6, generator=g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    keep = mask.bool()
    y = masked_layer_norm(x, (6,), w, b, 1e-5, mask)
    assert torch.allclose(y[..., keep], F.layer_norm(x[..., keep], (4,), w[keep], b[keep], 1e-5), atol=1e-6)
    assert torch.equal(y[..., ~keep], torch.zeros(2, 3, 2))


@pytest.mark.parametrize("bits", [None, 4])
def test_small_convnext_groups(bits: int | None) -> None:
    """A two-stage ConvNeXt built from torchvision's blocks (stochastic depth on): exact in FP32 and W4A4."""
    from tvshim import import_torchvision

    import_torchvision()
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    stages = [CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)]
    model = randomize(ConvNeXt(stages, stochastic_depth_prob=0.2, num_classes=3))
    x = torch.randn(2, 3, 16, 16)
    gm, plan = _equivalent(model, x, bits=bits)
    assert len(_groups(plan)) == 2 and len(plan.sites) == 5


def test_masked_convnext_export_is_refused_with_the_fix() -> None:
    from tvshim import import_torchvision

    import_torchvision()
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from prunequant.export import ExportError, export_onnx

    x = torch.randn(2, 3, 16, 16)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3).eval()
    gm, _ = instrument(model, prune_stat="none", example_input=x, groups=True, weight_bits=8, act_bits=8)
    set_masks(gm)
    calibrate(gm, tuple(x.shape))
    with pytest.raises(ExportError, match="physically smaller"):
        export_onnx(gm, x, "unused.onnx", allow_masked=True)


class IdentityInBranch(nn.Module):
    """conv -> BN -> Dropout -> Identity -> add: the member chain is seen through."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Dropout(0.1),
                                    nn.Identity())
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        return self.head(F.relu(s + self.branch(s)))


def test_member_chain_sees_through_identity_and_dropout() -> None:
    gm, plan = _equivalent(randomize(IdentityInBranch()), torch.randn(2, 3, 8, 8))
    assert _groups(plan)["group:stem.0"].members == ["branch.0"]
