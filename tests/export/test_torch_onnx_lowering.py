"""The torch.onnx prototype of benchmarks/onnx_lowering.py (issue 12, item 1) on one model.

Quantizers swapped for the custom op ``prunequant::fake_quant``, exported by torch.onnx with the op
lowered to QuantizeLinear / DequantizeLinear; ONNX Runtime (graph optimization off: the file's
meaning) must match the PyTorch fake-quant model with the tolerance of the zoo round trips, and the
integer codes must equal PyTorch's. Also pins down why the swap is needed: the dynamo exporter
refuses the instrumented model as it is (``bool(self.enabled)`` in the quantizers' forward is a
data-dependent branch for ``torch.export``). See docs/export.md, "Hand-written lowering vs torch.onnx".
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's dependency (installed with qonnx)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnx_lowering as ol  # noqa: E402


@pytest.fixture(scope="module")
def lenet_w4():
    """The zoo LeNet-5 at W4A4 (as tests/export/test_zoo_export.py): MaxPool, Flatten, Linear."""
    model, x, xs = ol.zoo_case("lenet5", 4)
    with torch.no_grad():
        ref = model(xs).numpy()
    return model, x, xs, ref


def _check(out: np.ndarray, ref: np.ndarray) -> None:
    """The zoo round trips' tolerance: within one 8-bit output step for >= 95 % of the samples, equal
    up to float noise for most."""
    assert out.shape == ref.shape
    worst = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    assert np.mean(worst <= (ref.max() - ref.min()) / 255) >= 0.95, np.sort(worst)[-5:]
    assert np.median(worst) < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "ts"])
def test_torch_onnx_prototype_matches_pytorch(lenet_w4, exporter):
    model, x, xs, ref = lenet_w4
    swapped = ol.swap_quantizers(model)
    with torch.no_grad():  # the custom op computes what the quantizers compute
        np.testing.assert_array_equal(swapped(xs).numpy(), ref)
    if exporter == "dynamo":
        proto = ol.fold_weight_quantize(ol.export_dynamo(swapped, x))  # INT4 / UINT4, opset 21
        types = ol.node_stats(proto)["initializer_types"]
        assert types.get("INT4", 0) >= 5 and types.get("UINT4", 0) >= 1, types  # 4-bit weights and zps
        assert ol.node_stats(proto)["float_weight_initializers"] == 0
    else:
        proto = ol.export_ts(swapped, x)  # opset 20: 8-bit containers with a Clip
    _check(ol._session(proto).run(None, {"input": xs.numpy()})[0], ref)
    codes = ol.check_codes(proto, model, xs[:8])
    assert codes["act"] == {"tensors": 5, "min_equal_share": 1.0, "in_range": 5}, codes
    assert codes["weight"] == {"tensors": 5, "equal": 5, "in_range": 5}, codes


def test_dynamo_exporter_refuses_the_instrumented_model(lenet_w4):
    from torch.onnx._internal.exporter._errors import TorchExportError

    model, x, _, _ = lenet_w4
    with pytest.raises(TorchExportError, match="data-dependent expression"):
        ol.raw_dynamo_export(model, x)
