"""ConvNeXt layers quantized (no pruning) and exported: LayerNorm (``nn.LayerNorm``, ``F.layer_norm``,
torchvision's ``LayerNorm2d``), ``torch.permute`` / ``x.permute``, ``nn.Linear`` on channels-last 4-d
tensors (MatMul over the last dim), layer scale (``self.gamma * x``, a ``get_attr`` parameter) and
stochastic depth (identity in eval mode).

QDQ (opset 21) writes ``LayerNormalization``; QONNX (opset 13, which has none) the decomposed form.
Oracle: the calibrated model in PyTorch, against ONNX Runtime with graph optimization off and the
qonnx executor, with the zoo round trips' tolerance (tests/export/test_zoo_export.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from export_helpers import ort_run  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "graph"))

from gtools import calibrate  # noqa: E402
from tvshim import import_torchvision  # noqa: E402

from prunequant.export import build_onnx  # noqa: E402
from prunequant.graph import instrument  # noqa: E402

tv = import_torchvision()
from torchvision.models.convnext import CNBlock, LayerNorm2d  # noqa: E402


class Block(nn.Module):
    """A ConvNeXt block written by hand: dw 7x7 -> NHWC -> LayerNorm -> Linear x4 -> GELU -> Linear ->
    layer scale -> NCHW -> stochastic depth -> residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.drop = tv.ops.StochasticDepth(0.2, "row")

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        y = self.gamma * y
        return x + self.drop(torch.permute(y, (0, 3, 1, 2)))


class MiniConvNeXt(nn.Module):
    """Stem (patchify + LayerNorm2d), a hand-written block, a downsampling LayerNorm2d + conv,
    torchvision's CNBlock, global mean, functional LayerNorm, linear head."""

    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, stride=2), LayerNorm2d(c, eps=1e-6))
        self.block1 = Block(c)
        self.down = nn.Sequential(LayerNorm2d(c, eps=1e-6), nn.Conv2d(c, 2 * c, 2, stride=2))
        self.block2 = CNBlock(2 * c, layer_scale=0.5, stochastic_depth_prob=0.1)
        self.head_w = nn.Parameter(1.0 + 0.1 * torch.randn(2 * c))
        self.head_b = nn.Parameter(0.1 * torch.randn(2 * c))
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), self.head_w, self.head_b, 1e-6)
        return self.fc(x)


def _randomize_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def _quantized(model: nn.Module, shape: tuple[int, ...]):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    gm, _ = instrument(model, prune_stat=None, weight_bits=8, act_bits=8, example_input=x)
    calibrate(gm, shape)  # train-mode batches: quantizer statistics, then frozen; eval mode
    return gm, x


def _check(out: np.ndarray, ref: np.ndarray) -> None:
    """As the zoo round trips: within one 8-bit output step for >= 95 % of the samples (the others:
    an interior activation on a rounding boundary), equal up to float noise for most."""
    assert out.shape == ref.shape
    worst = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    assert np.mean(worst <= (ref.max() - ref.min()) / 255) >= 0.95, np.sort(worst)[-5:]
    assert np.median(worst) < 1e-4, np.median(worst)
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.95


@pytest.mark.parametrize("fmt", ["qdq", "qonnx"])
def test_mini_convnext_w8a8(fmt):
    torch.manual_seed(0)
    gm, x = _quantized(_randomize_norms(MiniConvNeXt()).eval(), (4, 3, 16, 16))
    n = 64 if fmt == "qdq" else 16
    xs = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = gm(xs).numpy()
    proto = build_onnx(gm, xs if fmt == "qonnx" else x, fmt)
    ops = {nd.op_type for nd in proto.graph.node}
    assert {"MatMul", "Transpose"} <= ops  # channels-last linear layers and permutes
    assert ("LayerNormalization" in ops) == (fmt == "qdq")  # opset 21 has it, opset 13 does not
    if fmt == "qdq":
        out = ort_run(proto, xs.numpy())
    else:
        pytest.importorskip("qonnx")
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx

        out = execute_onnx(ModelWrapper(proto), {"input": xs.numpy()})["output"]
    _check(out, ref)


def test_convnext_tiny_w8a8_qdq():
    """torchvision's convnext_tiny (random weights) at 32x32: quantized, exported, run in ONNX Runtime."""
    torch.manual_seed(0)
    gm, x = _quantized(tv.models.convnext_tiny(weights=None).eval(), (2, 3, 32, 32))
    proto = build_onnx(gm, x, "qdq")
    ops = {nd.op_type for nd in proto.graph.node}
    assert {"LayerNormalization", "MatMul", "QuantizeLinear"} <= ops
    xs = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = gm(xs).numpy()
    _check(ort_run(proto, xs.numpy()), ref)
