"""Tests for the model zoo: shapes, parameter counts, width scaling, fx traceability, argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from prunequant.models import (
    MODEL_NAMES,
    BasicBlock,
    InvertedResidual,
    LeNet5,
    MobileNetV2,
    ResNetCifar,
    VGGSmall,
    build_model,
)

ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _conv_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


def test_model_names() -> None:
    assert MODEL_NAMES == ("resnet20", "resnet32", "resnet56", "vgg_small", "mobilenetv2", "lenet5")


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32])
def test_output_shape(name: str, in_channels: int, image_size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "lenet5"])
def test_smallest_image_size(name: str) -> None:
    model = build_model(name, num_classes=3, image_size=8, width=0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_lenet_smallest_image_size() -> None:
    model = build_model("lenet5", num_classes=3, in_channels=1, image_size=12).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 12, 12)).shape == (2, 3)
    with pytest.raises(ValueError, match="image_size"):
        build_model("lenet5", num_classes=3, image_size=11)


def _resnet_cifar_params(n: int, in_ch: int, num_classes: int, widths: tuple[int, int, int]) -> int:
    """Independent count: bias-free convs, BN (weight + bias), option-B 1x1 projection shortcuts, fc."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:
        return 2 * c

    total = conv(in_ch, widths[0], 3) + bn(widths[0])
    cin = widths[0]
    for c in widths:
        for _ in range(n):
            total += conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if cin != c:
                total += conv(cin, c, 1) + bn(c)
            cin = c
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize(("name", "n"), [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_resnet_param_count(name: str, n: int) -> None:
    model = build_model(name, num_classes=10, in_channels=3, width=1.0)
    count = sum(p.numel() for p in model.parameters())
    assert count == _resnet_cifar_params(n, 3, 10, (16, 32, 64))
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 3 * n
    if name == "resnet20":
        assert 0.26e6 < count < 0.28e6


def test_resnet_half_width_param_count() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=1, width=0.5)
    assert sum(p.numel() for p in model.parameters()) == _resnet_cifar_params(3, 1, 10, (8, 16, 32))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_half_width_roughly_quarters_conv_params(name: str) -> None:
    full = _conv_params(build_model(name, num_classes=10))
    half = _conv_params(build_model(name, num_classes=10, width=0.5))
    ratio = half / full
    if name.startswith(("resnet", "vgg")):
        assert 0.24 < ratio < 0.26
    else:
        # fixed input channels (LeNet), linear-cost depthwise convs and the 1280-wide head (MobileNetV2)
        assert 0.24 < ratio < 0.35


def test_width_channel_counts() -> None:
    r = build_model("resnet20", num_classes=10, width=0.25)
    assert isinstance(r, ResNetCifar)
    assert r.conv1.out_channels == 4 and r.fc.in_features == 16
    v = build_model("vgg_small", num_classes=10, width=0.5)
    assert isinstance(v, VGGSmall) and v.classifier.in_features == 128
    m = build_model("mobilenetv2", num_classes=10, width=0.5)
    assert isinstance(m, MobileNetV2) and m.classifier.in_features == 1280
    assert build_model("mobilenetv2", num_classes=10, width=2.0).classifier.in_features == 2560
    lenet = build_model("lenet5", num_classes=10, width=0.5)
    assert isinstance(lenet, LeNet5) and lenet.conv1.out_channels == 3 and lenet.fc3.in_features == 42


def test_mobilenetv2_blocks() -> None:
    m = build_model("mobilenetv2", num_classes=10)
    blocks = [b for b in m.modules() if isinstance(b, InvertedResidual)]
    assert len(blocks) == 17
    assert len(blocks[0].conv) == 5 and not blocks[0].use_res_connect  # t = 1: no expand conv
    assert all(len(b.conv) == 8 for b in blocks[1:])
    assert sum(b.use_res_connect for b in blocks) == 10
    assert [b.stride for b in blocks if b.stride == 2] == [2, 2, 2]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_trace_matches_eager(name: str) -> None:
    model = build_model(name, num_classes=5, in_channels=3, image_size=28, width=0.5).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_activation_modules_unique_and_not_inplace(name: str) -> None:
    model = build_model(name, num_classes=5, width=0.25)
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    targets = [n.target for n in traced.graph.nodes
               if n.op == "call_module" and isinstance(modules[n.target], ACTIVATIONS)]
    assert targets, "expected activation modules in the graph"
    assert len(targets) == len(set(targets))
    assert len({id(modules[t]) for t in targets}) == len(targets)
    # every activation module in the model is used exactly once, none in place, no functional relu
    act_modules = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    assert len(act_modules) == len(targets)
    assert not any(m.inplace for m in act_modules)
    functional = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6}
    assert not any(n.op == "call_function" and n.target in functional for n in traced.graph.nodes)


def test_init() -> None:
    model = build_model("resnet20", num_classes=10)
    bn = model.bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # Linear keeps PyTorch's default Kaiming-uniform init: |w| <= 1/sqrt(fan_in), bias zeroed.
    assert model.fc.weight.abs().max().item() <= 64**-0.5 and torch.all(model.fc.bias == 0)
    assert model.fc.weight.std().item() > 0.5 * 64**-0.5 / 3**0.5
    conv = model.layer3[0].conv2  # kaiming fan_out: std = sqrt(2 / (64 * 9))
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.01


def test_lenet_without_batchnorm() -> None:
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=28, batchnorm=False).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.conv1.bias is not None
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet18", num_classes=10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"width": 0.0}, "width"),
        ({"width": -0.5}, "width"),
        ({"width": float("nan")}, "width"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": 7}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
    ],
)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bad_arguments(name: str, kwargs: dict, arg: str) -> None:
    args = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=arg):
        build_model(name, **args)


def test_classes_validate_directly() -> None:
    with pytest.raises(ValueError, match="width"):
        VGGSmall(width=0)
    with pytest.raises(ValueError, match="depth"):
        ResNetCifar(depth=21)
    with pytest.raises(ValueError, match="image_size"):
        LeNet5(image_size=8)
