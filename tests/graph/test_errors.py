"""Unsupported ops: clear errors naming the op and module path; exclusion keeps the rest prunable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gtools import set_masks
from torch import Tensor, nn

from prunequant import Compressor
from prunequant.graph import GraphError, instrument, shrink


class Gate(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(Gate(8))
        self.c3 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.c2(self.c1(x)))
        x = self.c3(x)
        x = torch.softmax(x, dim=1)  # mixes channels: coupled
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_untraceable_module_is_named() -> None:
    with pytest.raises(GraphError, match=r"module 'block\.0' \(Gate\).*prune\.exclude"):
        instrument(Net(), example_input=torch.randn(2, 3, 8, 8))


def test_excluded_module_becomes_opaque() -> None:
    x = torch.randn(2, 3, 8, 8)
    net = Net().eval()
    gm, plan = instrument(net, prune_stat="none", exclude=["block.0"], example_input=x)
    names = {s.name for s in plan.sites}
    assert names == {"c1.0"}
    assert "block.0" in plan.skipped["c2.0"]  # feeds the opaque module
    assert "softmax" in plan.skipped["c3.0"]
    set_masks(gm)
    with torch.no_grad():
        a, b = gm(x), shrink(gm)(x)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_compressor_accepts_exclusion_of_untraceable_module() -> None:
    x = torch.randn(2, 3, 8, 8)
    comp = Compressor(Net(), {"prune": {"exclude": ["block.0"], "unit": "steps", "start": 0, "interval": 1,
                                     "refresh": 1}, "quant": None}, x)
    assert [s.name for s in comp.plan.sites] == ["c1.0"]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        return self.head(self.b(y) + y)


def test_reasons_name_op_and_module() -> None:
    _, plan = instrument(Residual(), example_input=torch.randn(1, 3, 8, 8))
    assert "coupled: feeds call_function 'add'" in plan.skipped["a.0"]
    assert plan.skipped["b.0"].startswith("coupled")
    assert plan.sites == []
