"""Every model of the graph tests' zoo (concatenations, splits, slices, PixelShuffle / Unshuffle,
squeeze-excitation, grouped convs, GroupNorm, InstanceNorm, transposed convs, upsampling, MLP),
masked at random, quantized, shrunk and exported: ONNX Runtime and qonnx agree with PyTorch."""

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
from prunequant.graph import shrink  # noqa: E402


def _small(name: str, bits: int):
    _, gm, x = build(name, bits=bits)
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
    small, x, xs, ref = _small(name, bits)
    proto = build_onnx(small, x, "qdq")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    out = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"input": xs.numpy()})[0]
    _check(out, ref)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_qonnx(name):
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    small, x, xs, ref = _small(name, 8)
    xs, ref = xs[:16], ref[:16]
    out = execute_onnx(ModelWrapper(build_onnx(small, xs, "qonnx")), {"input": xs.numpy()})["output"]
    _check(out, ref)
