"""Restoration models: shapes, paper sizes, the registry, and pruning through prunequant's graph code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunequant
from prunequant.data.images import SRPatchDataset, load_image
from prunequant.graph.trace import trace
from prunequant.models import (
    ESPCN,
    FSRCNN,
    MODEL_NAMES,
    RESTORATION_MODEL_NAMES,
    UNetDenoiser,
    build_model,
    build_restoration_model,
)

PRUNE = {"prune": {"sparsity": 0.5, "unit": "steps", "start": 0, "interval": 2, "refresh": 1}, "quant": None}
W4A4 = {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 2, "act_delay": 3}


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d))


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("cls", [ESPCN, FSRCNN])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_sr_output_shape(cls: type, scale: int, in_channels: int) -> None:
    model = cls(scale=scale, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, 9, 11))
    assert out.shape == (2, in_channels, 9 * scale, 11 * scale) and torch.isfinite(out).all()


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_output_shape(levels: int, in_channels: int) -> None:
    model = UNetDenoiser(in_channels, width=0.25, levels=levels).eval()
    with torch.no_grad():
        x = torch.rand(2, in_channels, 16, 24)
        assert model(x).shape == x.shape
        plain = UNetDenoiser(in_channels, width=0.25, levels=levels, residual=False).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(model(x), x - plain(x))


def test_paper_sizes() -> None:
    # ESPCN: 1*64*25 + 64*32*9 + 32*r^2*9 weights; FSRCNN(56, 12, 4) x3: the paper's 12,464 parameters
    assert _weights(ESPCN(3)) == 64 * 25 + 64 * 32 * 9 + 32 * 9 * 9
    assert _weights(FSRCNN(3)) == 12464
    assert _weights(FSRCNN(3, d=32, s=5, m=1)) == 32 * 25 + 32 * 5 + 5 * 5 * 9 + 5 * 32 + 32 * 81  # FSRCNN-s
    assert FSRCNN(2).body[1].num_parameters == 56  # per-channel PReLU
    assert ESPCN(2, width=0.5).conv1.out_channels == 32


def test_registry() -> None:
    assert MODEL_NAMES == ("resnet20", "resnet32", "resnet56", "vgg_small", "mobilenetv2", "lenet5")
    assert RESTORATION_MODEL_NAMES == ("espcn", "fsrcnn", "unet_denoise")
    assert isinstance(build_restoration_model("ESPCN", scale=3), ESPCN)
    assert build_restoration_model("fsrcnn", scale=2, m=2).scale == 2
    unet = build_restoration_model("unet_denoise", in_channels=3, width=0.5, levels=2)
    assert isinstance(unet, UNetDenoiser) and unet.levels == 2
    with pytest.raises(ValueError, match="build_restoration_model"):
        build_model("espcn", num_classes=10)
    with pytest.raises(ValueError, match="allowed names"):
        build_restoration_model("edsr", scale=2)
    with pytest.raises(ValueError, match="scale"):
        build_restoration_model("espcn", scale=1)
    with pytest.raises(ValueError, match="scale must be 1"):
        build_restoration_model("unet_denoise", scale=2)
    with pytest.raises(ValueError, match="width"):
        build_restoration_model("fsrcnn", scale=2, width=0)
    with pytest.raises(ValueError, match="levels"):
        UNetDenoiser(levels=4)


# ------------------------------------------------------------------------------------------- pruning
CASES = {
    "espcn": (lambda: ESPCN(3), (2, 1, 10, 10), (2, 1, 30, 30), {"conv1": 64, "conv2": 32}),
    "fsrcnn": (lambda: FSRCNN(2), (2, 1, 10, 10), (2, 1, 20, 20),
               {"body.0": 56, "body.2": 12, "body.4": 12, "body.6": 12, "body.8": 12, "body.10": 12,
                "body.12": 56}),
    "unet": (lambda: UNetDenoiser(3, width=0.5), (2, 3, 16, 16), (2, 3, 16, 16),
             {"downs.0.0": 16, "downs.0.2": 16, "downs.1.0": 32, "downs.1.2": 32, "bottom.0": 64,
              "bottom.2": 64, "ups.0.0": 32, "decs.0.0": 32, "decs.0.2": 32, "ups.1.0": 16, "decs.1.0": 16,
              "decs.1.2": 16}),
}


@pytest.mark.parametrize("quant", [None, W4A4], ids=["prune", "prune_w4a4"])
@pytest.mark.parametrize("name", list(CASES))
def test_prune_and_shrink(name: str, quant: dict | None) -> None:
    build, in_shape, out_shape, sites = CASES[name]
    torch.manual_seed(0)
    model = build()
    trace(model)  # prunequant's tracer accepts it
    comp = prunequant.Compressor(model, {**PRUNE, "quant": quant}, torch.rand(*in_shape))
    assert {s.name: s.channels for s in comp.plan.sites} == sites
    assert comp.plan.skipped == {}
    net = comp.model.train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(comp.total_steps_hint + 1):
        loss = F.mse_loss(net(torch.rand(*in_shape)), torch.rand(*out_shape))
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.step()
    small = comp.finalize()
    x = torch.rand(*in_shape)
    with torch.no_grad():
        masked, out = comp.model.eval()(x), small(x)
    assert out.shape == out_shape
    assert torch.allclose(masked, out, atol=1e-5), (masked - out).abs().max()
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert after < 0.45 * before
    convs = {n: m for n, m in small.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)}
    for site, c in sites.items():
        assert convs[site].out_channels == c // 2, site
    if name == "unet":  # the skip concatenation: half of the skip + half of the up path
        assert convs["decs.0.0"].in_channels == 16 + 16 and convs["decs.1.0"].in_channels == 8 + 8
    if name == "fsrcnn":
        prelus = [m for m in small.modules() if isinstance(m, nn.PReLU)]
        assert [p.num_parameters for p in prelus] == [c // 2 for c in sites.values()]


def test_espcn_few_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    ds = SRPatchDataset([load_image("chelsea"), load_image("china")], 3, patch_size=12, length=16, seed=0)
    lr = torch.stack([ds[i][0] for i in range(16)])
    hr = torch.stack([ds[i][1] for i in range(16)])
    model = ESPCN(3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
