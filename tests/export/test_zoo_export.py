"""Every model of the graph tests' zoo (concatenations, splits, slices, PixelShuffle / Unshuffle,
squeeze-excitation, grouped convs, GroupNorm, InstanceNorm, transposed convs, upsampling, MLP),
masked at random, quantized, shrunk and exported: ONNX Runtime and qonnx agree with PyTorch.

ONNX Runtime is run twice: with graph optimization off (the file's meaning, on every CPU) and with its
default, which fuses 8-bit Q/DQ into integer kernels. Where those saturate (x86-64 without VNNI, see
prunequant/export/cpu.py) full-range 8-bit weights may differ there; the same model quantized with
``weight_range="reduced"`` must then match instead."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import torch  # noqa: E402

GRAPH_TESTS = Path(__file__).resolve().parent.parent / "graph"
sys.path.insert(0, str(GRAPH_TESTS))

from gtools import build  # noqa: E402
from zoo import ZOO  # noqa: E402

from prunequant.export import build_onnx  # noqa: E402
from prunequant.export.cpu import cpu_features  # noqa: E402
from prunequant.graph import shrink  # noqa: E402


def _small(name: str, bits: int, weight_range: str = "full"):
    _, gm, x = build(name, bits=bits, weight_range=weight_range)
    small = shrink(gm)
    small.eval()
    xs = torch.randn((64,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = small(xs).numpy()
    return small, x, xs, ref


def _check(out: np.ndarray, ref: np.ndarray) -> None:
    """Within one 8-bit output step for >= 95 % of the samples (the rest: rounding flips inside the
    net, see docs/export.md), and equal up to float noise for most."""
    assert out.shape == ref.shape
    worst = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    assert np.mean(worst <= (ref.max() - ref.min()) / 255) >= 0.95, np.sort(worst)[-5:]
    assert np.median(worst) < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_qdq(name, bits):
    def run(proto, level: str) -> np.ndarray:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"input": xs.numpy()})[0]

    small, x, xs, ref = _small(name, bits)
    proto = build_onnx(small, x, "qdq")
    _check(run(proto, "ORT_DISABLE_ALL"), ref)  # the meaning
    if bits == 8 and cpu_features().saturating_u8s8:  # fused 8-bit kernels saturate: reduced range
        small, x, xs, ref = _small(name, bits, "reduced")
        proto = build_onnx(small, x, "qdq")
        _check(run(proto, "ORT_DISABLE_ALL"), ref)
    _check(run(proto, "ORT_ENABLE_ALL"), ref)  # fused integer kernels, as on this CPU


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_qonnx(name):
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    small, x, xs, ref = _small(name, 8)
    xs, ref = xs[:16], ref[:16]
    out = execute_onnx(ModelWrapper(build_onnx(small, xs, "qonnx")), {"input": xs.numpy()})["output"]
    _check(out, ref)
