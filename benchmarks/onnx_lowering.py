"""Issue 12, item 1: can ``torch.onnx`` replace prunequant's hand-written fx -> ONNX lowering?

A prototype of the alternative: every enabled quantizer of an instrumented (shrunk) GraphModule is
swapped for a call to one custom op ``prunequant::fake_quant(x, scale, zero_point, qmin, qmax, axis)``
(``torch.library.custom_op`` with a fake impl), and the model is exported by ``torch.onnx`` with that
op lowered to ``QuantizeLinear -> DequantizeLinear`` (plus a range ``Clip`` when the bit-width is below
the container's), everything else (conv, linear, pooling, activations, cat, split, reshape, ...) by
torch.onnx's own lowering:

* ``ts``: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), the op lowered by
  ``torch.onnx.register_custom_op_symbolic``; its newest opset is 20, so there is no INT4 / UINT4:
  <= 4-bit tensors use 8-bit containers with a ``Clip`` (as ``export_onnx(..., int4=False)``).
* ``dynamo``: the dynamo exporter (``torch.export`` + onnxscript), the op lowered by an onnxscript
  function in ``custom_translation_table``; opset 21, <= 4-bit tensors in INT4 / UINT4 (zero point
  cast to the 4-bit type) unless ``int4=False``.

Each is compared with the hand-written QDQ lowering (``prunequant.export.build_onnx(..., "qdq")``) on
the models of the export round-trip tests: every model of ``tests/graph/zoo.py`` (random masks and
calibration, shrunk, as ``tests/export/test_zoo_export.py``; lenet5, resnet20, vgg_small and
mobilenetv2 among them) and the ``prunequant.models`` registry models resnet20, vgg_small, mobilenetv2
plus ESPCN trained on the digits (``tests/export/export_helpers``; lenet5 needs >= 12x12 inputs), at
W8A8 and W4A4; QONNX through the qonnx executor (and hls4ml's frontend for the zoo LeNet-5); one
model with ops the hand-written translator refuses (``torch.cumsum``, ``torch.flip``). Measured per
file: exported or the error, ONNX Runtime (graph optimization off, the
file's meaning) against the PyTorch fake-quant model (worst per-sample deviation: share within one
8-bit output step, median, max; argmax agreement), export wall time as a ratio to the hand-written
export of the same model in the same run, node counts, file size, whether weights are stored as
integers, and whether the 4-bit codes are right (the integer codes ONNX Runtime computes for every
activation and weight QuantizeLinear equal ``quantize_to_int`` of the PyTorch quantizers, and lie in
the b-bit range).

Run (about 45 minutes on 2 busy cores, MobileNetV2 dominates; ``--quick``: three zoo models, no
trained registry models; ``--markdown FILE``: the tables of docs/export.md from a JSON)::

    .venv/bin/python benchmarks/onnx_lowering.py --json benchmarks/results/onnx_lowering.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer

ROOT = Path(__file__).resolve().parent.parent
TS_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13
DYNAMO_OPSET = 21  # the first opset with INT4 / UINT4 (what the hand-written QDQ path emits)

# --------------------------------------------------------------------------------------------------
# the custom op


def _fq_impl(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int) -> Tensor:
    if scale.dim() == 1 and scale.numel() > 1:  # per channel along ``axis`` (ONNX QuantizeLinear)
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    zp = zero_point.to(x.dtype)
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _register() -> Any:
    """``torch.ops.prunequant.fake_quant`` (registered once per process)."""
    ns = getattr(torch.ops, "prunequant", None)
    if ns is not None and hasattr(ns, "fake_quant"):
        return ns.fake_quant.default

    @torch.library.custom_op("prunequant::fake_quant", mutates_args=())
    def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int) -> Tensor:
        return _fq_impl(x, scale, zero_point, qmin, qmax, axis)

    @fake_quant.register_fake
    def _(x, scale, zero_point, qmin, qmax, axis):
        return torch.empty_like(x)

    return torch.ops.prunequant.fake_quant.default


class FakeQuant(nn.Module):
    """A quantizer frozen into constants, calling the custom op."""

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int = 0):
        super().__init__()
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.float32).clone())
        self.qmin, self.qmax, self.axis = int(qmin), int(qmax), int(axis)

    def forward(self, x: Tensor) -> Tensor:
        fq = torch.ops.prunequant.fake_quant
        return fq(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)


def swap_quantizers(gm: nn.Module) -> nn.Module:
    """A copy of ``gm`` whose enabled quantizers call ``prunequant::fake_quant`` (disabled ones become
    identities). Weight quantizers are swapped inside their parametrization lists (the weight stays a
    parametrized float parameter)."""
    _register()
    m = copy.deepcopy(gm).eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, ActQuantizer):
            if bool(mod.enabled):
                step, zp = mod.qparams()
                new: nn.Module = FakeQuant(step, zp, mod.qmin, mod.qmax)
            else:
                new = nn.Identity()
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, new)
        elif parametrize.is_parametrized(mod, "weight"):
            plist = mod.parametrizations["weight"]
            for i, p in enumerate(plist):
                if isinstance(p, WeightQuantizer):
                    if not bool(p.enabled):
                        plist[i] = nn.Identity()
                        continue
                    s = p.scale(plist.original.detach())
                    if not p.per_channel:
                        s = s.reshape(())
                    plist[i] = FakeQuant(s, torch.zeros_like(s), p.qmin, p.qmax, p.axis)
    return m


# --------------------------------------------------------------------------------------------------
# lowering of the op: QuantizeLinear -> DequantizeLinear (+ Clip when the bit-width is below the
# container's)


def _container(qmin: int, qmax: int, int4: bool) -> tuple[int, int, int]:
    """(TensorProto type, container qmin, container qmax) for codes in [qmin, qmax]."""
    from onnx import TensorProto as T

    signed = qmin < 0
    if int4 and qmin >= -8 and qmax <= (7 if signed else 15):
        return (T.INT4, -8, 7) if signed else (T.UINT4, 0, 15)
    if qmin >= -128 and qmax <= (127 if signed else 255):
        return (T.INT8, -128, 127) if signed else (T.UINT8, 0, 255)
    return (T.INT16, -32768, 32767) if signed else (T.UINT16, 0, 65535)


QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPSET = 13  # the hand-written QONNX export's
_TS_MODE = {"format": "qdq"}  # which lowering the TorchScript symbolic emits


def _bits(qmin: int, qmax: int) -> int:
    return int(round(np.log2(qmax - qmin + 1)))


def _ts_symbolic(g, x, scale, zero_point, qmin, qmax, axis):
    """TorchScript exporter: the op as (Clip) -> QuantizeLinear -> DequantizeLinear (opset 20), or
    as one QONNX ``Quant`` node (opset 13 + qonnx domain)."""
    from torch.onnx import symbolic_helper as sh

    qmin, qmax, axis = (int(sh._maybe_get_const(v, "i")) for v in (qmin, qmax, axis))
    if _TS_MODE["format"] == "qonnx":
        if (sh._get_tensor_rank(scale) or 0) > 0:  # per channel: Quant broadcasts, it has no axis
            shape = [1] * sh._get_tensor_rank(x)
            shape[axis] = -1
            shp = g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64))
            scale, zero_point = g.op("Reshape", scale, shp), g.op("Reshape", zero_point, shp)
        bits = g.op("Constant", value_t=torch.tensor(float(_bits(qmin, qmax))))
        y = g.op(f"{QONNX_DOMAIN}::Quant", x, scale, zero_point, bits, signed_i=int(qmin < 0), narrow_i=0,
                 rounding_mode_s="ROUND")
        y.setType(x.type())  # a custom-domain node has no shape inference: the conv symbolic needs it
        return y
    elem, cmin, cmax = _container(qmin, qmax, int4=False)
    zp = g.op("Cast", zero_point, to_i=elem)
    if (qmin, qmax) != (cmin, cmax):  # exact: clip to the representable float range, then round
        zf = zero_point
        lo = g.op("Mul", g.op("Sub", g.op("Constant", value_t=torch.tensor(float(qmin))), zf), scale)
        hi = g.op("Mul", g.op("Sub", g.op("Constant", value_t=torch.tensor(float(qmax))), zf), scale)
        if (sh._get_tensor_rank(scale) or 0) > 0:  # per channel: Clip takes scalars only
            shape = [1] * sh._get_tensor_rank(x)
            shape[axis] = -1
            shp = g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64))
            x = g.op("Min", g.op("Max", x, g.op("Reshape", lo, shp)), g.op("Reshape", hi, shp))
        else:
            x = g.op("Clip", x, lo, hi)
    q = g.op("QuantizeLinear", x, scale, zp, axis_i=axis)
    return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)


def _dynamo_translation(int4: bool):
    """Dynamo exporter: the op as an onnxscript function (traced with python-valued attributes)."""
    from onnxscript import opset21 as op

    def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int):
        elem, cmin, cmax = _container(qmin, qmax, int4)
        zp = op.Cast(zero_point, to=elem)
        if (qmin, qmax) != (cmin, cmax):  # exact: clip to the representable float range, then round
            lo = op.Mul(op.Sub(op.Constant(value_float=float(qmin)), zero_point), scale)
            hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zero_point), scale)
            if len(scale.shape) > 0:  # per channel: Clip takes scalars only
                shape = [1] * len(x.shape)
                shape[axis] = -1
                shp = op.Constant(value_ints=shape)
                x = op.Min(op.Max(x, op.Reshape(lo, shp)), op.Reshape(hi, shp))
            else:
                x = op.Clip(x, lo, hi)
        q = op.QuantizeLinear(x, scale, zp, axis=axis)
        return op.DequantizeLinear(q, scale, zp, axis=axis)

    return fake_quant


def _register_quant_schema() -> None:
    """An ONNX schema for QONNX ``Quant`` (onnxscript resolves ops through schemas)."""
    from onnx import defs

    if defs.has("Quant", QONNX_DOMAIN):
        return
    F, A, AT = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType
    defs.register_schema(defs.OpSchema(
        "Quant", QONNX_DOMAIN, 1,
        inputs=[F("X", "T"), F("scale", "T"), F("zeropt", "T"), F("bitwidth", "T")], outputs=[F("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[A("signed", AT.INT, ""), A("narrow", AT.INT, ""), A("rounding_mode", AT.STRING, "")]))


def _dynamo_qonnx_translation():
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_quant_schema()
    qonnx = Opset(QONNX_DOMAIN, 1)

    def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int):
        if len(scale.shape) > 0:  # per channel: Quant broadcasts, it has no axis
            shape = [1] * len(x.shape)
            shape[axis] = -1
            shp = op.Constant(value_ints=shape)
            scale, zero_point = op.Reshape(scale, shp), op.Reshape(zero_point, shp)
        return qonnx.Quant(x, scale, zero_point, op.Constant(value_float=float(_bits(qmin, qmax))),
                           signed=int(qmin < 0), narrow=0, rounding_mode="ROUND")

    return fake_quant


_TS_REGISTERED = False


def export_ts(model: nn.Module, x: Tensor) -> Any:
    """TorchScript exporter (dynamo=False), dynamic batch; returns the ``onnx.ModelProto``."""
    import onnx

    _ts_register()
    _TS_MODE["format"] = "qdq"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=TS_OPSET, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def _ts_register() -> None:
    global _TS_REGISTERED
    if not _TS_REGISTERED:  # from opset 13 (QONNX) on; the symbolic reads _TS_MODE
        torch.onnx.register_custom_op_symbolic("prunequant::fake_quant", _ts_symbolic, QONNX_OPSET)
        _TS_REGISTERED = True


def export_ts_qonnx(model: nn.Module, x: Tensor) -> Any:
    """TorchScript exporter, QONNX ``Quant`` nodes, opset 13, static shapes (as the hand-written one)."""
    import onnx

    _ts_register()
    _TS_MODE["format"] = "qonnx"
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=QONNX_OPSET,
                              input_names=["input"], output_names=["output"], custom_opsets={QONNX_DOMAIN: 1})
    finally:
        _TS_MODE["format"] = "qdq"
    return onnx.load_from_string(buf.getvalue())


def export_dynamo_qonnx(model: nn.Module, x: Tensor) -> Any:
    """Dynamo exporter, QONNX ``Quant`` nodes, static shapes; opset 18 (the exporter's lowest)."""
    op = _register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, input_names=["input"],
                                 output_names=["output"], verbose=False, report=False,
                                 custom_translation_table={op: _dynamo_qonnx_translation()})
    return prog.model_proto


def export_hand_qonnx(model: nn.Module, x: Tensor) -> Any:
    from prunequant.export import build_onnx

    return build_onnx(model, x, "qonnx")


def qonnx_run(proto: Any, xs: Tensor) -> tuple[np.ndarray, str | None]:
    """The qonnx executor's output (as tests/export/test_zoo_export.py::test_zoo_qonnx) and ``None``;
    where the file as exported does not execute, the output after qonnx's ``cleanup_model`` (shape
    inference, constant folding) and the first error."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    try:
        return execute_onnx(ModelWrapper(copy.deepcopy(proto)), {"input": xs.numpy()})["output"], None
    except Exception as e:  # noqa: BLE001
        first = _error(e)
    mw = cleanup_model(ModelWrapper(copy.deepcopy(proto)))  # renames tensors
    out = execute_onnx(mw, {mw.graph.input[0].name: xs.numpy()})[mw.graph.output[0].name]
    return out, first


def export_dynamo(model: nn.Module, x: Tensor, int4: bool = True) -> Any:
    """Dynamo exporter (torch.export + onnxscript), dynamic batch; returns the ``onnx.ModelProto``."""
    op = _register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=DYNAMO_OPSET, input_names=["input"],
                                 output_names=["output"], dynamic_shapes=({0: torch.export.Dim("N", min=1)},),
                                 custom_translation_table={op: _dynamo_translation(int4)}, verbose=False,
                                 report=False)
    return prog.model_proto


def fold_weight_quantize(proto: Any) -> Any:
    """Hand-written post-pass for the torch.onnx files: ``QuantizeLinear(float weight initializer)``
    computed here (numpy, round half to even, saturating) and stored as the integer initializer that
    the DequantizeLinear reads, as the hand-written path stores weights (INT4 packed two per byte).
    onnxscript's constant folder leaves QuantizeLinear alone (also with unlimited size limits)."""
    import onnx
    from onnx import numpy_helper

    from prunequant.export.onnx_export import _int_tensor

    T = onnx.TensorProto
    bounds = {T.INT4: (-8, 7), T.UINT4: (0, 15), T.INT8: (-128, 127), T.UINT8: (0, 255),
              T.INT16: (-32768, 32767), T.UINT16: (0, 65535)}
    p = copy.deepcopy(proto)
    inits = {t.name: t for t in p.graph.initializer}
    keep = []
    for n in p.graph.node:
        if (n.op_type == "QuantizeLinear" and all(i in inits for i in n.input[:3])
                and inits[n.input[2]].data_type in bounds):
            x = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zt = inits[n.input[2]]
            z = np.asarray(numpy_helper.to_array(zt)).astype(np.int64)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if s.ndim == 1 and s.size > 1:
                shape = [1] * x.ndim
                shape[axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            lo, hi = bounds[zt.data_type]
            q = np.clip(np.rint(x / s).astype(np.int64) + z, lo, hi)
            t = _int_tensor(zt.data_type, q, list(x.shape))
            t.name = n.output[0]
            p.graph.initializer.append(t)
            continue
        keep.append(n)
    del p.graph.node[:]
    p.graph.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in p.graph.output}
    live = [t for t in p.graph.initializer if t.name in used]
    del p.graph.initializer[:]
    p.graph.initializer.extend(live)
    return p


def export_hand(model: nn.Module, x: Tensor) -> Any:
    from prunequant.export import build_onnx

    return build_onnx(model, x, "qdq")


def export_hand_int8(model: nn.Module, x: Tensor) -> Any:
    """The hand-written path with 8-bit containers for <= 4 bits (what the TorchScript path can do)."""
    from prunequant.export import build_onnx

    return build_onnx(model, x, "qdq", int4=False)


# --------------------------------------------------------------------------------------------------
# measurements


def _session(proto: Any, outputs: list[str] | None = None, fused: bool = False):
    """ORT session, graph optimization off; ``outputs``: extra outputs, as INT32 (4-bit types cannot
    be fetched into numpy)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if not fused:  # the file's meaning; fused: ORT's default, integer kernels (CPU-dependent)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    if outputs:
        import onnx

        proto = copy.deepcopy(proto)
        i32 = onnx.TensorProto.INT32
        for o in outputs:
            proto.graph.node.append(onnx.helper.make_node("Cast", [o], [f"{o}__i32"], to=i32))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(f"{o}__i32", i32, None))
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def deviation(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """The metric of the round-trip tests (tests/export/export_helpers.py): per-sample worst
    deviation; share within one 8-bit output step, median, max; argmax agreement for logits."""
    worst = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
    r = {"within_step": float(np.mean(worst <= float(ref.max() - ref.min()) / 255.0)),
         "median": float(np.median(worst)), "max": float(worst.max())}
    if ref.ndim == 2:
        r["argmax"] = float(np.mean(out.argmax(1) == ref.argmax(1)))
    return r


def _reference_codes(model: nn.Module, x: Tensor) -> dict[str, list[tuple[np.ndarray, int, int]]]:
    """PyTorch integer codes: activations (``ActQuantizer.int_codes`` of each quantizer's input, in
    graph order) and weights (``WeightQuantizer.int_codes``), with each quantizer's [qmin, qmax]."""
    from prunequant.graph.instrument import raw_weight

    acts: list[tuple[np.ndarray, int, int]] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, ActQuantizer) and bool(m.enabled):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: acts.append((mod.int_codes(args[0]).numpy(), mod.qmin, mod.qmax))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    weights = []
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, WeightQuantizer) and bool(p.enabled):
                    w = raw_weight(m).detach()
                    weights.append((p.int_codes(w).numpy(), p.qmin, p.qmax))
    return {"act": acts, "weight": weights}


def _onnx_codes(proto: Any, xs: np.ndarray) -> dict[str, list[np.ndarray]]:
    """The integer codes ONNX Runtime computes / stores: outputs of the QuantizeLinear nodes that
    depend on the graph input (activations, graph order), and for weights the integer initializers
    feeding a DequantizeLinear (hand-written path) plus the outputs of QuantizeLinear nodes that do not
    depend on the input (torch.onnx paths: float weight -> (Clip) -> QuantizeLinear)."""
    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    dynamic = {i.name for i in proto.graph.input} - set(inits)
    for n in proto.graph.node:  # topological order
        if any(i in dynamic for i in n.input):
            dynamic.update(n.output)
    act_q, w_q, w_init = [], [], []
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            (act_q if n.input[0] in dynamic else w_q).append(n.output[0])
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            if inits[n.input[0]].data_type != onnx.TensorProto.INT32:  # not a folded bias
                w_init.append(n.input[0])
    sess = _session(proto, act_q + w_q + w_init)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {"input": xs.astype(np.float32)})))
    return {"act": [res[f"{o}__i32"].astype(np.int64) for o in act_q],
            "weight": [res[f"{o}__i32"].astype(np.int64) for o in w_init + w_q]}


def check_codes(proto: Any, model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Do the file's integer codes equal PyTorch's (``quantize_to_int``), in their b-bit range?"""
    ref = _reference_codes(model, x)
    got = _onnx_codes(proto, x.numpy())
    r: dict[str, Any] = {}
    for kind in ("act", "weight"):
        want, have = ref[kind], got[kind]
        if len(want) != len(have):
            r[kind] = f"count {len(have)} != {len(want)}"
            continue
        if kind == "weight":  # weight order differs between paths: match by shape, then by values
            pool = list(have)
            mism = in_range = 0
            for c, lo, hi in want:
                k = next((i for i, h in enumerate(pool) if h.shape == c.shape and np.array_equal(h, c)), None)
                if k is None:
                    mism += 1
                else:
                    in_range += int((pool[k] >= lo).all() and (pool[k] <= hi).all())
                    pool.pop(k)
            r[kind] = {"tensors": len(want), "equal": len(want) - mism, "in_range": in_range}
        else:
            eq = [float(np.mean(h == c)) for (c, _, _), h in zip(want, have)]
            rng = sum(int((h >= lo).all() and (h <= hi).all()) for (_, lo, hi), h in zip(want, have))
            r[kind] = {"tensors": len(want), "min_equal_share": min(eq) if eq else 1.0, "in_range": rng}
    return r


def node_stats(proto: Any) -> dict[str, Any]:
    import onnx

    ops = collections.Counter(n.op_type for n in proto.graph.node)
    types = collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer)
    consts = sum(1 for n in proto.graph.node if n.op_type == "Constant")
    float_w = sum(1 for t in proto.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)
    return {"nodes": len(proto.graph.node), "nodes_no_const": len(proto.graph.node) - consts,
            "ops": dict(sorted(ops.items())), "initializer_types": dict(sorted(types.items())),
            "float_weight_initializers": float_w, "bytes": len(proto.SerializeToString()),
            # initializers only: the dynamo exporter's files are mostly per-node metadata (stack traces)
            "initializer_bytes": sum(t.ByteSize() for t in proto.graph.initializer),
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


def _timed(fn, *args, repeat: int = 3) -> tuple[Any, float]:
    """``(result, median seconds)`` over ``repeat`` calls after one untimed warm-up call."""
    out = fn(*args)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        ts.append(time.perf_counter() - t)
    return out, statistics.median(ts)


def _error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    # torch.export errors are long; keep the summary and the user frame
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    keep = [ln for ln in lines if ("Exception summary" not in ln and "http" not in ln)]
    return " | ".join(keep[:1] + [ln.strip() for ln in keep if "Error" in ln or "File \"" in ln][:4])[:600]


def _measure(proto: Any, model: nn.Module, xs: Tensor, ref: np.ndarray,
             outs: dict[str, np.ndarray], key: str) -> dict[str, Any]:
    r: dict[str, Any] = node_stats(proto)
    try:
        outs[key] = _session(proto).run(None, {"input": xs.numpy()})[0]
        r["ort"] = deviation(outs[key], ref)
        if key != "hand" and "hand" in outs:  # the same file's meaning as the hand-written one?
            r["max_diff_vs_hand"] = float(np.abs(outs[key] - outs["hand"]).max())
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        r["ort_error"] = _error(e)
    try:
        r["ort_fused"] = deviation(_session(proto, fused=True).run(None, {"input": xs.numpy()})[0], ref)
    except Exception as e:  # noqa: BLE001
        r["ort_fused_error"] = _error(e)
    try:
        r["codes"] = check_codes(proto, model, xs[:8])
    except Exception as e:  # noqa: BLE001
        r["codes_error"] = _error(e)
    return r


PATHS = ("hand", "hand_int8", "ts", "dynamo", "dynamo_folded")
QPATHS = ("hand_qonnx", "ts_qonnx", "dynamo_qonnx")


def run_case(label: str, model: nn.Module, x: Tensor, xs: Tensor, repeat: int = 3) -> dict[str, Any]:
    """Every exporter on one (model, bits): hand-written QDQ (INT4 and, ``hand_int8``, 8-bit
    containers), TorchScript, dynamo, and dynamo plus the :func:`fold_weight_quantize` post-pass (its
    time is the dynamo export's plus the pass's)."""
    model.eval()
    with torch.no_grad():
        ref = model(xs).numpy()
    res: dict[str, Any] = {"case": label}
    swapped = swap_quantizers(model)
    with torch.no_grad():
        res["swap_max_diff"] = float(np.abs(swapped(xs).numpy() - ref).max())  # custom op == quantizers
    protos = {}
    for key, (fn, m) in {"hand": (export_hand, model), "hand_int8": (export_hand_int8, model),
                         "ts": (export_ts, swapped), "dynamo": (export_dynamo, swapped)}.items():
        try:
            proto, secs = _timed(fn, m, x, repeat=repeat)
        except Exception as e:  # noqa: BLE001 - the failure is the measurement
            last = traceback.format_exc().strip().splitlines()[-1][:300]
            res[key] = {"error": _error(e), "last_line": last}
            continue
        protos[key] = proto
        res[key] = {"export_s": secs}
    if "dynamo" in protos:
        try:
            protos["dynamo_folded"], secs = _timed(fold_weight_quantize, protos["dynamo"], repeat=repeat)
            res["dynamo_folded"] = {"export_s": res["dynamo"]["export_s"] + secs, "fold_s": secs}
        except Exception as e:  # noqa: BLE001
            res["dynamo_folded"] = {"error": _error(e)}
    else:
        res["dynamo_folded"] = {"error": "dynamo export failed"}
    outs: dict[str, np.ndarray] = {}
    for key, proto in protos.items():
        res[key].update(_measure(proto, model, xs, ref, outs, key))
        if key != "hand" and "hand" in protos:
            res[key]["time_ratio_vs_hand"] = res[key]["export_s"] / res["hand"]["export_s"]
    # QONNX: static shapes, 16 samples through the qonnx executor (as test_zoo_export.py)
    xq, refq = xs[:16], ref[:16]
    qprotos = {}
    for key, (fn, m) in {"hand_qonnx": (export_hand_qonnx, model), "ts_qonnx": (export_ts_qonnx, swapped),
                         "dynamo_qonnx": (export_dynamo_qonnx, swapped)}.items():
        try:
            qprotos[key], secs = _timed(fn, m, xq, repeat=repeat)
            res[key] = {"export_s": secs}
        except Exception as e:  # noqa: BLE001
            last = traceback.format_exc().strip().splitlines()[-1][:300]
            res[key] = {"error": _error(e), "last_line": last}
    for key, proto in qprotos.items():
        res[key].update(node_stats(proto))
        res[key]["value_info"] = len(proto.graph.value_info)
        try:
            out, first = qonnx_run(proto, xq)
            res[key]["qonnx_exec"] = deviation(out, refq)
            outs[key] = out
            if key != "hand_qonnx" and "hand_qonnx" in outs:
                res[key]["max_diff_vs_hand"] = float(np.abs(out - outs["hand_qonnx"]).max())
            if first:
                res[key]["qonnx_exec_needs_cleanup"] = first
        except Exception as e:  # noqa: BLE001
            res[key]["qonnx_exec_error"] = _error(e)
        if key != "hand_qonnx" and "hand_qonnx" in qprotos:
            res[key]["time_ratio_vs_hand"] = res[key]["export_s"] / res["hand_qonnx"]["export_s"]
    if label in HLS4ML_CASES:
        import tempfile

        for key in qprotos:  # hls4ml takes batch-1 files
            with tempfile.TemporaryDirectory() as d:
                fn = {"hand_qonnx": export_hand_qonnx, "ts_qonnx": export_ts_qonnx,
                      "dynamo_qonnx": export_dynamo_qonnx}[key]
                res[key]["hls4ml"] = hls4ml_converts(fn(model if key == "hand_qonnx" else swapped, x[:1]), d)
    return res


HLS4ML_CASES = ("zoo/lenet5/W8A8", "zoo/mlp/W8A8")


def hls4ml_converts(proto: Any, out_dir: str) -> str:
    """``"converted"`` when prunequant's hls4ml preparation and hls4ml's ONNX frontend take the QONNX
    file (the ModelGraph is built; ``compile()`` is not run: g++ needs > 10 minutes for a LeNet here),
    else the error."""
    try:
        import hls4ml

        from prunequant.export.hls import DEFAULT_PRECISION, prepare_qonnx_for_hls4ml
    except ImportError as e:
        return f"not run: {e}"
    try:
        mw = prepare_qonnx_for_hls4ml(copy.deepcopy(proto))
        cfg = hls4ml.utils.config.config_from_onnx_model(mw, granularity="name", backend="Vitis",
                                                         default_precision=DEFAULT_PRECISION)
        hls4ml.converters.convert_from_onnx_model(mw, output_dir=out_dir, project_name="p", backend="Vitis",
                                                  io_type="io_parallel", hls_config=cfg)
        return "converted"
    except Exception as e:  # noqa: BLE001
        return _error(e)


def raw_attempts(model: nn.Module, x: Tensor) -> dict[str, str]:
    """torch.onnx on the instrumented model as it is (quantizers and parametrizations untouched)."""
    r = {}
    try:
        p = export_ts_raw(model, x)
        ops = collections.Counter(n.op_type for n in p.graph.node)
        r["ts"] = (f"exports, but the quantizers are traced into float ops (no Q/DQ): "
                   f"{ {k: ops[k] for k in ('QuantizeLinear', 'Round', 'Clip', 'Div') if ops[k]} }")
    except Exception as e:  # noqa: BLE001
        r["ts"] = _error(e)
    try:
        raw_dynamo_export(model, x)
        r["dynamo"] = "exports"
    except Exception as e:  # noqa: BLE001
        r["dynamo"] = _error(e)
    return r


def raw_dynamo_export(model: nn.Module, x: Tensor) -> Any:
    """The dynamo exporter on the instrumented model as it is (raises ``TorchExportError``)."""
    import logging

    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # its progress lines and the failing graph's dump go to the log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(model, (x,), dynamo=True, opset_version=DYNAMO_OPSET, verbose=False)
    finally:
        log.setLevel(level)


def export_ts_raw(model: nn.Module, x: Tensor) -> Any:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=TS_OPSET)
    return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------------------------------------
# the models of the round-trip tests


def zoo_case(name: str, bits: int) -> tuple[nn.Module, Tensor, Tensor]:
    """As tests/export/test_zoo_export.py: random masks and calibration, shrunk, 64 random inputs."""
    sys.path.insert(0, str(ROOT / "tests" / "graph"))
    from gtools import build

    from prunequant.graph import shrink

    _, gm, x = build(name, bits=bits)
    small = shrink(gm).eval()
    xs = torch.randn((64,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(11))
    return small, x, xs


def trained_case(name: str, bits: int) -> tuple[nn.Module, Tensor, Tensor]:
    """As tests/export/test_onnx_export.py: trained on digits with the Compressor, shrunk; all 1,797
    digits as inputs."""
    sys.path.insert(0, str(ROOT / "tests" / "export"))
    from export_helpers import deployable, eval_inputs

    model, ex = deployable(name, bits, bits)
    return model, ex, eval_inputs(name)


class CumsumFlip(nn.Module):
    """Ops the hand-written translator does not know (``torch.cumsum``, ``torch.flip``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(torch.flip(torch.cumsum(torch.relu(self.conv(x)), dim=1), dims=[3]))


def coverage_case(name: str, bits: int) -> tuple[nn.Module, Tensor, Tensor]:
    """Op coverage: :class:`CumsumFlip` instrumented and calibrated like the zoo models (not shrunk)."""
    sys.path.insert(0, str(ROOT / "tests" / "graph"))
    from gtools import calibrate

    from prunequant.graph import instrument

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    gm, _ = instrument(CumsumFlip().eval(), prune_stat="none", example_input=x, weight_bits=bits,
                       act_bits=bits)
    calibrate(gm, tuple(x.shape))
    return gm.eval(), x, torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(11))


ZOO_QUICK = ("lenet5", "resnet20", "split")
#: lenet5 needs >= 12x12 inputs, the digits are 8x8: it is measured on the zoo (32x32) only
TRAINED = ("resnet20", "vgg_small", "mobilenetv2", "espcn")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="three zoo models, no trained models")
    ap.add_argument("--repeat", type=int, default=3, help="export timings: median of this many")
    ap.add_argument("--markdown", type=Path, default=None, help="only print the tables of this JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import onnx
    import onnxruntime
    import onnxscript

    from prunequant.export.cpu import cpu_features

    sys.path.insert(0, str(ROOT / "tests" / "graph"))
    from zoo import ZOO

    zoo = ZOO_QUICK if args.quick else tuple(sorted(ZOO))
    cases: list[tuple[str, Any]] = [(f"zoo/{n}/W{b}A{b}", (zoo_case, n, b)) for n in zoo for b in (8, 4)]
    if not args.quick:
        cases += [(f"trained/{n}/W{b}A{b}", (trained_case, n, b)) for n in TRAINED for b in (8, 4)]
    cases.append(("coverage/cumsum_flip/W8A8", (coverage_case, "cumsum_flip", 8)))
    results = []
    raw = None
    for label, (fn, n, b) in cases:
        t = time.perf_counter()
        try:
            model, x, xs = fn(n, b)
            if raw is None:
                raw = raw_attempts(model, x)
            r = run_case(label, model, x, xs, repeat=args.repeat)
        except Exception as e:  # noqa: BLE001 - recorded, the other cases still run
            print(f"{label}: harness error {_error(e)}", flush=True)
            results.append({"case": label, "harness_error": _error(e)})
            continue
        results.append(r)
        print(_row(r), f"({time.perf_counter() - t:.0f} s)", flush=True)
    out = {"command": "python benchmarks/onnx_lowering.py" + (" --quick" if args.quick else ""),
           "prunequant_source": str(Path(sys.modules["prunequant"].__file__).parent),
           "cpu": cpu_features().name, "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                                   "onnxruntime": onnxruntime.__version__,
                                                   "onnxscript": onnxscript.__version__},
           "raw_instrumented_model": raw, "cases": results, "summary": summarize(results)}
    print(json.dumps(out["summary"], indent=1))
    print(markdown(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _row(r: dict[str, Any]) -> str:
    parts = [r["case"]]
    for k in PATHS + QPATHS:
        v = r[k]
        if "error" in v:
            parts.append(f"{k}: FAIL {v['error'][:80]}")
        else:
            o = v.get("ort", v.get("qonnx_exec", {}))
            parts.append(f"{k}: n={v['nodes_no_const']} within={o.get('within_step', 'ERR')} "
                         f"max={o.get('max', float('nan')):.2g} t={v.get('time_ratio_vs_hand', 1):.2f}x")
    return " | ".join(parts)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"harness_errors": [r["case"] for r in results if "harness_error" in r]}
    results = [r for r in results if "harness_error" not in r]
    for k in PATHS + QPATHS:
        ev = "qonnx_exec" if k in QPATHS else "ort"
        ok = [r for r in results if "error" not in r[k]]
        ratios = [r[k]["time_ratio_vs_hand"] for r in ok if "time_ratio_vs_hand" in r[k]]
        s[k] = {"exported": f"{len(ok)}/{len(results)}",
                "failed": sorted({r["case"] for r in results if "error" in r[k]}),
                "ort_within_step_min": min((r[k][ev]["within_step"] for r in ok if ev in r[k]), default=None),
                "ort_max_dev_max": max((r[k][ev]["max"] for r in ok if ev in r[k]), default=None),
                "run_errors": sorted(r["case"] for r in ok if f"{ev}_error" in r[k]),
                "needs_qonnx_cleanup": sum(1 for r in ok if "qonnx_exec_needs_cleanup" in r[k]),
                "ort_fused_errors": sorted(r["case"] for r in ok if "ort_fused_error" in r[k]),
                "time_ratio_median": statistics.median(ratios) if ratios else None,
                "nodes_no_const_total": sum(r[k]["nodes_no_const"] for r in ok)}
    return s


def _ratio(cases: list[dict[str, Any]], k: str, field: str, base: str) -> str:
    v = [r[k][field] / r[base][field] for r in cases if field in r[k] and r[base].get(field)]
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-"


def markdown(out: dict[str, Any]) -> str:
    """The tables of docs/export.md ("Hand-written lowering vs torch.onnx") from the JSON."""
    cases = [r for r in out["cases"]
             if "harness_error" not in r and not r["case"].startswith("coverage/")]
    labels = {"hand": "hand-written (`build_onnx`, INT4)", "hand_int8": "hand-written, `int4=False`",
              "ts": "TorchScript exporter (opset 20, 8-bit containers)",
              "dynamo": "dynamo exporter (opset 21, INT4)",
              "dynamo_folded": "dynamo + weight-folding post-pass",
              "hand_qonnx": "hand-written (`format=\"qonnx\"`, opset 13)",
              "ts_qonnx": "TorchScript exporter (opset 13)",
              "dynamo_qonnx": "dynamo exporter (opset 18)"}
    models = len({r["case"].rsplit("/", 1)[0] for r in cases})
    v = out["versions"]
    lines = [f"{len(cases)} files per path: {models} models x W8A8 / W4A4. CPU: {out['cpu']}; "
             f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnxscript {v['onnxscript']}.", "",
             "| QDQ path | exported | ORT (opt. off) vs PyTorch: worst within-step share, worst max abs diff "
             "| max abs diff to the hand-written file's output | activation codes = PyTorch's (worst share) "
             "| weight codes = PyTorch's | all codes in the b-bit range | ORT default session: fails / "
             "< 95 % within step "
             "| export time / hand-written, median (range) | nodes / hand-written "
             "| initializer bytes / hand-written |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in PATHS:
        ok = [r for r in cases if "error" not in r[k]]
        dev = [r[k]["ort"] for r in ok if "ort" in r[k]]
        cd = [r[k]["codes"] for r in ok if isinstance(r[k].get("codes", {}).get("act"), dict)]
        act_share = min(c["act"]["min_equal_share"] for c in cd) if cd else float("nan")
        in_range = sum(1 for c in cd if c["act"]["in_range"] == c["act"]["tensors"]
                       and c["weight"]["in_range"] == c["weight"]["tensors"])
        w_ok = sum(1 for c in cd if c["weight"]["equal"] == c["weight"]["tensors"])
        vs_hand = max((r[k].get("max_diff_vs_hand", 0.0) for r in ok), default=0.0)
        fails = sum(1 for r in ok if "ort_fused_error" in r[k])
        off = sum(1 for r in ok if r[k].get("ort_fused", {}).get("within_step", 1.0) < 0.95)
        t = "1" if k == "hand" else _ratio(ok, k, "export_s", "hand")
        worst = f"{min(d['within_step'] for d in dev):.3f}, {max(d['max'] for d in dev):.2g}" if dev else "-"
        vh = "-" if k == "hand" else f"{vs_hand:.2g}"
        lines.append(f"| {labels[k]} | {len(ok)}/{len(cases)} | {worst} | {vh} "
                     f"| {act_share:.4f} | {w_ok}/{len(ok)} | {in_range}/{len(ok)} | {fails} / {off} | {t} | "
                     f"{'1' if k == 'hand' else _ratio(ok, k, 'nodes_no_const', 'hand')} | "
                     f"{'1' if k == 'hand' else _ratio(ok, k, 'initializer_bytes', 'hand')} |")
    lines += ["", "| QONNX path | exported | qonnx executor vs PyTorch (16 samples): worst within-step "
              "share, worst max abs diff | max abs diff to the hand-written file's output "
              "| executes only after `cleanup_model` | export time / hand-written, "
              "median (range) | nodes / hand-written | hls4ml frontend (zoo LeNet-5 W8A8) |",
              "|---|---|---|---|---|---|---|---|"]
    for k in QPATHS:
        if any(k not in r for r in cases):
            continue
        ok = [r for r in cases if "error" not in r[k]]
        dev = [r[k]["qonnx_exec"] for r in ok if "qonnx_exec" in r[k]]
        hls = next((r[k].get("hls4ml") for r in ok if r["case"] == "zoo/lenet5/W8A8"), "-")
        worst = f"{min(d['within_step'] for d in dev):.3f}, {max(d['max'] for d in dev):.2g}" if dev else "-"
        vs_hand = max((r[k].get("max_diff_vs_hand", 0.0) for r in ok), default=0.0)
        lines.append(f"| {labels[k]} | {len(ok)}/{len(cases)} | {worst} | "
                     f"{'-' if k == 'hand_qonnx' else f'{vs_hand:.2g}'} | "
                     f"{sum(1 for r in ok if 'qonnx_exec_needs_cleanup' in r[k])}/{len(ok)} | "
                     f"{'1' if k == 'hand_qonnx' else _ratio(ok, k, 'export_s', 'hand_qonnx')} | "
                     f"{'1' if k == 'hand_qonnx' else _ratio(ok, k, 'nodes_no_const', 'hand_qonnx')} | "
                     f"{(hls or '-')[:60]} |")
    for r in out["cases"]:
        if r["case"].startswith("coverage/") and "harness_error" not in r:
            def said(v: dict[str, Any]) -> str:
                if "error" in v:
                    return v["error"].split(":")[0]
                return f"exports, within-step {v.get('ort', v.get('qonnx_exec', {})).get('within_step')}"

            got = ", ".join(f"{k}: {said(r[k])}"
                            for k in ("hand", "ts", "dynamo", "hand_qonnx", "ts_qonnx", "dynamo_qonnx"))
            lines += ["", f"Op coverage ({r['case']}: `torch.cumsum`, `torch.flip`): {got}."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
