"""ONNX export checked by real runtimes: ONNX Runtime for QDQ, the qonnx executor for QONNX.

What a file *means* is checked with ONNX Runtime's graph optimization off (``ORT_DISABLE_ALL``,
float kernels), which no CPU changes. ONNX Runtime's default (``ORT_ENABLE_ALL``) fuses Q/DQ into
8-bit integer kernels whose arithmetic depends on the CPU (saturating 16-bit pair sums without VNNI,
see prunequant/export/cpu.py); those tests run on every CPU and assert what holds for the one found.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from export_helpers import (  # noqa: E402
    compressed,
    deployable,
    deviation,
    eval_inputs,
    make_model,
    ort_run,
    out_step,
    torch_run,
)
from onnx import TensorProto  # noqa: E402

from prunequant import Compressor  # noqa: E402
from prunequant.export import ExportError, build_onnx, export_onnx  # noqa: E402
from prunequant.export._checks import shrink_available  # noqa: E402
from prunequant.export.check import check_onnx, full_range_8bit  # noqa: E402
from prunequant.export.cpu import cpu_features  # noqa: E402
from prunequant.export.fold import fold_batchnorm  # noqa: E402
from prunequant.graph.instrument import instrument  # noqa: E402

MODELS = ["resnet20", "mobilenetv2", "espcn"]
BITS = [(8, 8), (4, 4), (2, 8)]  # W8A8, W4A4, 2-bit weights


def _types(proto) -> collections.Counter:
    return collections.Counter(t.data_type for t in proto.graph.initializer)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"W{b[0]}A{b[1]}")
@pytest.mark.parametrize("name", MODELS)
def test_qdq_onnxruntime_matches_pytorch(tmp_path, name, bits):
    model, ex = deployable(name, *bits)
    path = export_onnx(model, ex, tmp_path / f"{name}.onnx", format="qdq")
    x = eval_inputs(name)
    ref = torch_run(model, x)
    out = ort_run(path, x.numpy())
    assert out.shape == ref.shape
    worst = np.abs(out - ref).reshape(len(x), -1).max(axis=1)  # per sample
    # Every output within one output quantization step for >= 99.5 % of the samples; the others are
    # samples where an interior activation sits on a rounding boundary, so that a 1-ulp difference in
    # the runtimes' conv summation order flips one integer code (see docs/export.md).
    assert np.mean(worst <= out_step(ref)) >= 0.995, (np.sort(worst)[-5:], out_step(ref))
    assert np.median(worst) < 1e-4
    if name != "espcn":
        agree = np.mean(out.argmax(1) == ref.argmax(1))
        assert agree >= 0.999, agree


@pytest.mark.parametrize("name", MODELS)
def test_qdq_graph_uses_integer_weights_and_int4(name):
    model, ex = deployable(name, 4, 4)
    proto = build_onnx(model, ex, "qdq")
    assert proto.opset_import[0].version == 21
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    layers = ops["Conv"] + ops["Gemm"] + ops["MatMul"] + ops["ConvTranspose"]
    types = _types(proto)
    # every conv / linear weight is a 4-bit integer initializer, no float weight tensor is left
    assert types[TensorProto.INT4] >= layers - (1 if name == "espcn" else 0)  # espcn conv3 is 8-bit
    inits = {t.name: t for t in proto.graph.initializer}
    for t in inits.values():  # 4-bit tensors are packed two per byte
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
            assert len(t.raw_data) == (int(np.prod(t.dims)) + 1) // 2
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            w = n.input[1]
            assert w not in inits, f"{n.name} has a float weight initializer"
    # conv weights per output channel (axis 0), linear per tensor
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None:
            scale = inits[n.input[1]]
            if len(scale.dims) == 1:
                assert dict((a.name, a.i) for a in n.attribute).get("axis") == 0
    # activations: UINT4 at 4 bits, except after a Clip (ReLU6), where ONNX Runtime 1.32 cannot fuse
    # Clip + 4-bit QuantizeLinear: UINT8 there, with a Clip to the 4-bit range in front
    producer = {o: n for n in proto.graph.node for o in n.output}
    kinds = collections.Counter()
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]].data_type
            src = producer.get(n.input[0])
            if zp == TensorProto.UINT8 and not n.name.startswith("pq_act_quant.conv3"):  # espcn: 8-bit
                assert src is not None and src.op_type == "Clip", n.name
            kinds[zp] += 1
    assert kinds[TensorProto.UINT4] + kinds[TensorProto.UINT8] == ops["QuantizeLinear"]
    assert kinds[TensorProto.UINT4] >= (1 if name == "espcn" else 2)
    if name != "mobilenetv2":
        assert kinds[TensorProto.UINT8] == (1 if name == "espcn" else 0)  # espcn: conv3 input, 8 bits


def test_qdq_without_int4_uses_clip_and_8bit_containers(tmp_path):
    model, ex = deployable("resnet20", 4, 4)
    proto = build_onnx(model, ex, "qdq", int4=False)
    types = _types(proto)
    assert TensorProto.INT4 not in types and TensorProto.UINT4 not in types
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Clip"] == ops["QuantizeLinear"] > 0  # 4-bit range inside uint8: clip, then quantize
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    x = eval_inputs("resnet20")[:256]
    np.testing.assert_allclose(ort_run(path, x.numpy()), ort_run(export_onnx(model, ex, tmp_path / "i4.onnx"),
                                                                   x.numpy()), rtol=0, atol=1e-5)


def test_qdq_odd_bitwidths_clip_exactly(tmp_path):
    """3-bit weights (INT4 container) and 6-bit activations (UINT8 container + Clip): exact."""
    model, ex = deployable("espcn", 3, 6)
    proto = build_onnx(model, ex, "qdq")
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Clip"] == 1  # conv2's 6-bit input; conv3's input is 8-bit, conv1's is float
    types = _types(proto)
    assert types[TensorProto.INT4] >= 2 and types[TensorProto.INT8] >= 1  # conv1/2 at 3 bits, conv3 at 8
    path = tmp_path / "e.onnx"
    path.write_bytes(proto.SerializeToString())
    x = eval_inputs("espcn")
    out, ref = ort_run(path, x.numpy()), torch_run(model, x)
    worst = np.abs(out - ref).reshape(len(x), -1).max(axis=1)
    assert np.mean(worst <= out_step(ref)) >= 0.995 and np.median(worst) < 1e-5


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_fold_bn_gives_integer_kernels(tmp_path, name):
    """fold_bn: BN folded into per-channel scales + INT32 bias; ONNX Runtime then uses QLinearConv. The
    file means ``fold_batchnorm(model, integer_bias=True)`` (biases on the accumulator grid): with
    optimization off it matches that as closely as the default export matches its model."""
    import onnxruntime as ort

    model, ex = deployable(name, 8, 8)
    proto = build_onnx(model, ex, "qdq", fold_bn=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] <= 2  # only where a code of -2**(b-1) meets a negative gamma
    assert any(t.data_type == TensorProto.INT32 for t in proto.graph.initializer)
    path = tmp_path / "f.onnx"
    path.write_bytes(proto.SerializeToString())
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    x = eval_inputs(name)
    ref = torch_run(fold_batchnorm(model, integer_bias=True), x)
    d = deviation(ort_run(path, x.numpy()), ref)
    assert d["within_step"] >= 0.995 and d["median"] < 1e-4 and d["argmax"] >= 0.999, d
    with pytest.raises(ExportError, match="fold_bn"):
        build_onnx(model, ex, "qonnx", fold_bn=True)


@pytest.mark.parametrize("weight_range", ["full", "reduced"])
def test_fused_integer_kernels_on_this_cpu(tmp_path, weight_range):
    """ONNX Runtime's default session (QLinearConv) against the file's meaning, on the CPU found.

    Reduced-range weights (trained with ``quant.weight_range: reduced``) must match on every CPU; full
    range must match on CPUs with VNNI, and on a CPU whose u8s8 kernels saturate ``check_onnx`` must
    say so and name the fix."""
    cpu = cpu_features()
    model, ex = deployable("resnet20", 8, 8, weight_range)
    wqs = [m for m in model.modules() if type(m).__name__ == "WeightQuantizer" and bool(m.enabled)]
    assert wqs and all(m.weight_range == weight_range for m in wqs)
    assert full_range_8bit(model) == (weight_range == "full")
    if weight_range == "reduced":  # QAT trained on the 7-bit grid: every code within [-64, 63]
        from prunequant.graph.instrument import raw_weight, weight_quantizer

        for m in model.modules():
            wq = weight_quantizer(m)
            if wq is not None:
                assert int(wq.int_codes(raw_weight(m).detach()).abs().max()) <= 64
    path = export_onnx(model, ex, tmp_path / "f.onnx", fold_bn=True)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["prunequant_weight_range"] == weight_range
    x = eval_inputs("resnet20")
    ref_model = fold_batchnorm(model, integer_bias=True)
    res = check_onnx(path, ref_model, x, threads=1)
    assert res["cpu"]["name"] == cpu.name and res["integer_ops"].get("QLinearConv", 0) > 0
    assert res["reference"]["within_output_step"] >= 0.995, res  # the meaning: same on every CPU
    d = deviation(ort_run(path, x.numpy(), fused=True), torch_run(ref_model, x))
    if weight_range == "reduced" or not cpu.saturating_u8s8:
        assert d["within_step"] >= 0.995 and d["argmax"] >= 0.995, (cpu.name, d)
        assert res["warning"] is None
    else:  # full-range 8-bit weights on saturating kernels: may differ; the check says so
        assert res["warning"] and "weight_range: reduced" in res["warning"] and cpu.name in res["warning"]


def test_dynamic_batch(tmp_path):
    model, ex = deployable("resnet20", 8, 8)
    path = export_onnx(model, ex, tmp_path / "m.onnx")
    x = eval_inputs("resnet20")
    for n in (1, 7):
        np.testing.assert_allclose(ort_run(path, x[:n].numpy()), torch_run(model, x[:n]), rtol=0, atol=1e-4)


def test_masked_model_exports_correctly(tmp_path):
    """Before shrinking: masked channels are exact zeros; the export (allow_masked) computes the same."""
    fm, _, ex = compressed("mobilenetv2", 8, 8)
    path = export_onnx(fm, ex, tmp_path / "m.onnx", allow_masked=True)
    x = eval_inputs("mobilenetv2")
    ref = torch_run(fm, x)
    out = ort_run(path, x.numpy())
    assert np.mean(np.abs(out - ref).max(axis=1) <= out_step(ref)) >= 0.995
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.999
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Mul"] > 0  # the masks


@pytest.mark.skipif(not shrink_available(), reason="prunequant.graph.shrink not available")
def test_shrunk_export_is_smaller_than_masked(tmp_path):
    fm, small, ex = compressed("resnet20", 8, 8)
    a = export_onnx(fm, ex, tmp_path / "masked.onnx", allow_masked=True).stat().st_size
    b = export_onnx(small, ex, tmp_path / "small.onnx").stat().st_size
    assert b < a


# ------------------------------------------------------------------------------------------ QONNX
@pytest.mark.parametrize("name,bits", [("resnet20", (8, 8)), ("resnet20", (2, 8)), ("mobilenetv2", (4, 4)),
                                       ("espcn", (4, 4))])
def test_qonnx_executes_like_pytorch(tmp_path, name, bits):
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model, ex = deployable(name, *bits)
    x = eval_inputs(name)[:16]
    path = export_onnx(model, x, tmp_path / f"{name}.onnx", format="qonnx")
    proto = onnx.load(str(path))
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    assert quants and all(n.domain == "qonnx.custom_op.general" for n in quants)
    bitwidths = {float(onnx.numpy_helper.to_array(i).item()) for i in proto.graph.initializer
                 if i.name.endswith(".bitwidth")}
    assert float(bits[0]) in bitwidths and float(bits[1]) in bitwidths
    out = execute_onnx(ModelWrapper(str(path)), {"input": x.numpy()})["output"]
    ref = torch_run(model, x)
    assert np.abs(out - ref).max() <= out_step(ref)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_qonnx_attributes():
    model, ex = deployable("resnet20", 4, 4)
    proto = build_onnx(model, ex, "qonnx")
    assert {o.domain: o.version for o in proto.opset_import} == {"": 13, "qonnx.custom_op.general": 1}
    for n in proto.graph.node:
        if n.op_type == "Quant":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["narrow"] == 0 and attrs["rounding_mode"] == b"ROUND"
            assert attrs["signed"] == (1 if ".weight" in n.input[0] else 0)
    # static shapes for FPGA flows
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_value > 0 for d in dims)


# ------------------------------------------------------------------------------------------ errors
def test_not_quantized_model_is_refused(tmp_path):
    plain = make_model("resnet20")
    with pytest.raises(ExportError, match="Run QAT first"):
        export_onnx(plain, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    gm, _ = instrument(make_model("resnet20"), weight_bits=8, act_bits=8)  # quantizers never enabled
    with pytest.raises(ExportError, match="Compressor"):
        export_onnx(gm, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx", format="qonnx")
    assert not (tmp_path / "m.onnx").exists()


def test_not_finalized_model_is_refused(tmp_path):
    x = torch.randn(8, 1, 8, 8)
    comp = Compressor(make_model("resnet20"), {
        "ordering": "joint",
        "prune": {"sparsity": 0.5, "unit": "steps", "start": 0, "interval": 5, "refresh": 1},
        "quant": {"weight_bits": 8, "act_bits": 8, "unit": "steps", "weight_delay": 0, "act_delay": 0}}, x)
    comp.model.train()
    comp.model(x)
    comp.step()
    with pytest.raises(ExportError, match=r"not finalized.*finalize\(\)"):
        export_onnx(comp.model, x, tmp_path / "m.onnx", allow_masked=True)
    comp.finalize(allow_incomplete=True)  # the schedule has not ended: finalize as it is
    if shrink_available():
        with pytest.raises(ExportError, match=r"shrink"):
            export_onnx(comp.model, x, tmp_path / "m.onnx")
    export_onnx(comp.model, x, tmp_path / "m.onnx", allow_masked=True)


def test_activation_quantizer_still_calibrating_is_refused(tmp_path):
    fm, _, ex = compressed("espcn", 8, 8)
    aq = next(m for n, m in fm.named_modules() if n.startswith("pq_act_quant."))
    aq.frozen.fill_(False)
    try:
        with pytest.raises(ExportError, match="finalize"):
            export_onnx(fm, ex, tmp_path / "m.onnx", allow_masked=True)
    finally:
        aq.frozen.fill_(True)


def test_unknown_format_and_unsupported_op(tmp_path):
    model, ex = deployable("resnet20", 8, 8)
    with pytest.raises(ExportError, match="format must be one of"):
        export_onnx(model, ex, tmp_path / "m.onnx", format="tflite")

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.cumsum(self.conv(x), dim=1)

    comp = Compressor(Odd(), {"prune": None, "quant": {"weight_bits": 8, "act_bits": 8, "unit": "steps",
                                                        "weight_delay": 0, "act_delay": 0}},
                      torch.randn(2, 1, 8, 8))
    comp.model.train()
    comp.model(torch.randn(2, 1, 8, 8))
    comp.step()
    m = comp.finalize()
    with pytest.raises(ExportError, match="cumsum.*not supported"):
        export_onnx(m, torch.randn(2, 1, 8, 8), tmp_path / "odd.onnx")


def test_reduced_weight_range_travels_with_every_format(tmp_path):
    """``quant.weight_range: reduced`` is part of the model: QONNX states 7-bit weight grids, the
    packed file and the pruning record reload it (codes still within [-64, 63], same outputs)."""
    from prunequant.export import load_packed, save_packed
    from prunequant.graph.instrument import weight_quantizer
    from prunequant.graph.persist import load_pruned, save_pruned
    from prunequant.models import build_model

    model, ex = deployable("resnet20", 8, 8, "reduced")
    assert model.pq_plan.options["weight_range"] == "reduced"
    proto = build_onnx(model, ex, "qonnx")
    wbits = {float(onnx.numpy_helper.to_array(i).item()) for i in proto.graph.initializer
             if i.name.endswith(".weight.bitwidth")}
    assert wbits == {7.0}
    assert {p.key: p.value for p in proto.metadata_props}["prunequant_weight_range"] == "reduced"
    x = eval_inputs("resnet20")[:64]
    ref = torch_run(model, x)

    def fresh():
        torch.manual_seed(1)
        return build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25)

    again = load_packed(save_packed(model, tmp_path / "m.pqpack", example_input=ex), fresh)
    rec = load_pruned(fresh(), save_pruned(model, tmp_path / "pruned"), ex)
    for m in (again, rec):
        wqs = [weight_quantizer(mod) for mod in m.modules() if weight_quantizer(mod) is not None]
        assert wqs and all((q.qmin, q.qmax) == (-64, 63) for q in wqs)
        np.testing.assert_array_equal(torch_run(m, x), ref)
