"""ONNX export of a quantized (and pruned) model: standard QDQ or QONNX ``Quant`` nodes.

See ``docs/export.md`` for the exact node patterns. In short:

* ``format="qdq"`` (ONNX opset 21; ONNX Runtime, TensorRT): every conv / linear weight is stored as
  an integer initializer (INT4 for <= 4 bits, INT8 for 5-8, INT16 above) followed by
  ``DequantizeLinear`` with the learned scales (per output channel, ``axis`` 0 for conv and 1 for
  transposed conv; per tensor for linear). Every quantized activation becomes
  ``QuantizeLinear -> DequantizeLinear`` (UINT4 / UINT8 / UINT16 with the integer zero point). When the
  bit-width is below the container's (e.g. 6 bits in UINT8, 3 bits in UINT4) a ``Clip`` to the
  representable float range ``[-zp*step, (2**b-1-zp)*step]`` precedes ``QuantizeLinear``; this is
  exact (clipping then rounding equals rounding then saturating to ``[0, 2**b-1]``). Weights need no
  clip: their integer codes are already inside ``[-2**(b-1), 2**(b-1)-1]``.
* ``format="qonnx"`` (ONNX opset 13 + domain ``qonnx.custom_op.general``; FINN, hls4ml): every
  quantizer is one ``Quant(x, scale, zeropt, bitwidth)`` node with ``signed`` / ``narrow=0`` /
  ``rounding_mode="ROUND"``; weights are float initializers already on the quantization grid.

Batch norm stays a ``BatchNormalization`` node after the convolution by default: QAT quantized the
unfolded weight, so this is the computation that was trained, and ONNX Runtime reproduces it up to
float rounding. Such a graph runs in float on ONNX Runtime's CPU provider (the Q/DQ pairs are
executed, no integer kernel is selected). ``fold_bn=True`` folds each conv's BatchNorm into its
per-channel weight scales (``s_c * |g_c|``, integer codes negated where ``g_c < 0``) and an INT32
bias with scale ``s_x * s_w``: the standard QDQ conv pattern, which ONNX Runtime turns into
``QLinearConv`` (integer arithmetic) at 8 bits. The bias rounding is not what the model was trained
with; ``fold_batchnorm(model, integer_bias=True)`` is the exact PyTorch form of such a file
(docs/export.md). ONNX Runtime's default session fuses 8-bit Q/DQ into integer kernels, which
saturate with full-range 8-bit weights on x86-64 CPUs without VNNI (``prunequant.export.cpu``,
``quant.weight_range``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..graph.instrument import raw_weight
from ..graph.trace import trace
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..utils import atomic_write
from ._checks import ExportError, check_exportable
from ._fx2onnx import Builder, QuantStyle, translate
from .fold import integer_bias_codes

FORMATS = ("qdq", "qonnx")
#: Producers after which a 4-bit activation uses an 8-bit container (ONNX Runtime 1.32 limitations).
_NO_4BIT_Q_AFTER = frozenset({"Clip", "MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})
QONNX_DOMAIN = "qonnx.custom_op.general"
QDQ_OPSET = 21
QONNX_OPSET = 13


def _container(bits: int, signed: bool, int4: bool) -> tuple[int, int]:
    """(TensorProto type, container bits) for a ``bits``-wide integer."""
    from onnx import TensorProto as T

    if bits <= 4 and int4:
        return (T.INT4 if signed else T.UINT4), 4
    if bits <= 8:
        return (T.INT8 if signed else T.UINT8), 8
    return (T.INT16 if signed else T.UINT16), 16


def _int_tensor(elem: int, values: np.ndarray, dims: list[int]) -> Any:
    """An integer TensorProto in ``raw_data`` (4-bit types: two values per byte, low nibble first)."""
    from onnx import TensorProto as T
    from onnx import numpy_helper

    v = np.asarray(values, dtype=np.int64).ravel()
    if elem in (T.INT4, T.UINT4):
        nib = (v & 0xF).astype(np.uint8)  # two's complement nibbles for INT4
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        t = T()
        t.name = "t"
        t.data_type = elem
        t.dims.extend(int(d) for d in dims)
        t.raw_data = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
        return t
    np_type = {T.INT8: np.int8, T.UINT8: np.uint8, T.INT16: np.int16, T.UINT16: np.uint16}[elem]
    return numpy_helper.from_array(v.astype(np_type).reshape(dims), "t")


class QDQStyle(QuantStyle):
    """QuantizeLinear / DequantizeLinear pairs with integer weight initializers (opset 21)."""

    opset = QDQ_OPSET

    def __init__(self, int4: bool = True, fold_bn: bool = False):
        self.int4 = int4
        self.fold_bn = fold_bn
        self.bias_as_add = True
        self.domain_opsets = {}
        self.act_scale: dict[str, float] = {}  # dequantized activation tensor -> its step

    def act(self, b: Builder, x: str, aq: ActQuantizer, name: str, shape: tuple[int, ...]) -> str:
        step, zp = aq.qparams()
        step_f = np.float32(step.item())
        zp_i = int(zp.item())
        elem, cbits = _container(aq.bits, signed=False, int4=self.int4)
        if cbits == 4 and (aq.bits < 4 or b.producer_op.get(x) in _NO_4BIT_Q_AFTER):
            # ONNX Runtime (1.32) mishandles a 4-bit QuantizeLinear right after these ops (its Clip/Q
            # fusion throws on INT4/UINT4; its Q/DQ propagation moves the Q before a MaxPool /
            # Reshape / ..., which have no 4-bit kernels): use UINT8 + a range Clip there.
            elem, cbits = _container(aq.bits, signed=False, int4=False)
        if aq.bits < cbits:
            lo = np.float32(-zp_i) * step_f
            hi = np.float32(aq.qmax - zp_i) * step_f
            x = b.node("Clip", [x, b.const(lo), b.const(hi)], f"{name}.clip", shape=shape)
        s = b.init(f"{name}.scale", np.array(step_f, dtype=np.float32))
        z = b.init(f"{name}.zero_point", _int_tensor(elem, np.array(zp_i), []))
        q = b.node("QuantizeLinear", [x, s, z], f"{name}.q", shape=shape, elem_type=elem)
        out = b.node("DequantizeLinear", [q, s, z], f"{name}.dq", shape=shape)
        self.act_scale[out] = float(step_f)
        return out

    def weight(self, b: Builder, module: nn.Module, wq: WeightQuantizer, name: str) -> str:
        w = raw_weight(module).detach().to(torch.float32).cpu()
        return self._dq_weight(b, wq, name, wq.int_codes(w).numpy(),
                               wq.scale(w).cpu().numpy().astype(np.float32))

    def folded_weight(self, b: Builder, module: nn.Module, wq: WeightQuantizer, name: str,
                      g: np.ndarray) -> tuple[str, np.ndarray]:
        """BN folded into the per-channel scales: ``s_c * g_c``.

        Where ``g_c < 0`` the channel's codes are negated and the scale is ``s_c * |g_c|``; if a code
        there is ``-2**(b-1)`` (whose negation does not fit in b bits) the scale stays negative.
        """
        w = raw_weight(module).detach().to(torch.float32).cpu()
        codes = wq.int_codes(w).numpy()
        s = wq.scale(w).cpu().numpy().astype(np.float64)
        flat = codes.reshape(codes.shape[0], -1)
        flip = (g < 0) & ~(flat == wq.qmin).any(axis=1)
        shp = (-1,) + (1,) * (codes.ndim - 1)
        codes = np.where(flip.reshape(shp), -codes, codes)
        codes = np.where((g == 0).reshape(shp), 0, codes)  # constant channel: weights do not matter
        eff = np.where(g == 0, s, s * np.where(flip, -g, g)).astype(np.float32)
        return self._dq_weight(b, wq, name, codes, eff), eff

    def bias(self, b: Builder, x: str, bias: np.ndarray, w_scale: np.ndarray, name: str) -> str:
        """Folded bias: INT32 with scale ``s_x * s_w[c]`` after a quantized input (the QDQ form that
        integer conv kernels consume), float32 otherwise."""
        bias = np.broadcast_to(np.asarray(bias, dtype=np.float64), w_scale.shape)
        sx = self.act_scale.get(x)
        if sx is None:
            return b.init(f"{name}.bias", bias.astype(np.float32))
        q, sb = integer_bias_codes(bias, sx, w_scale)  # what fold_batchnorm(integer_bias=True) adds
        from onnx import numpy_helper

        qi = b.init(f"{name}.bias_int32", numpy_helper.from_array(q, "t"))
        si = b.init(f"{name}.bias_scale", sb)
        zi = b.init(f"{name}.bias_zero_point", numpy_helper.from_array(np.zeros_like(q), "t"))
        return b.node("DequantizeLinear", [qi, si, zi], f"{name}.bias", axis=0, shape=tuple(q.shape))

    def _dq_weight(self, b: Builder, wq: WeightQuantizer, name: str, codes: np.ndarray,
                   scale: np.ndarray) -> str:
        elem, _ = _container(wq.bits, signed=True, int4=self.int4)
        wi = b.init(f"{name}.weight_int{wq.bits}", _int_tensor(elem, codes, list(codes.shape)))
        attrs: dict[str, Any] = {}
        if wq.per_channel:
            s = b.init(f"{name}.weight_scale", scale.reshape(-1))
            zeros = _int_tensor(elem, np.zeros(scale.size, np.int64), [scale.size])
            z = b.init(f"{name}.weight_zero_point", zeros)
            attrs["axis"] = int(wq.axis)
        else:
            s = b.init(f"{name}.weight_scale", np.array(scale.reshape(-1)[0], dtype=np.float32))
            z = b.init(f"{name}.weight_zero_point", _int_tensor(elem, np.array(0), []))
        return b.node("DequantizeLinear", [wi, s, z], f"{name}.weight", shape=tuple(codes.shape), **attrs)


class QONNXStyle(QuantStyle):
    """QONNX ``Quant`` nodes with arbitrary bit-widths (opset 13 + qonnx.custom_op.general)."""

    opset = QONNX_OPSET

    def __init__(self) -> None:
        self.domain_opsets = {QONNX_DOMAIN: 1}

    @staticmethod
    def _quant(b: Builder, x: str, scale: np.ndarray, zp: np.ndarray, bits: int, signed: bool,
               name: str, shape: tuple[int, ...]) -> str:
        ins = [x, b.init(f"{name}.scale", scale.astype(np.float32)),
               b.init(f"{name}.zeropt", zp.astype(np.float32)),
               b.init(f"{name}.bitwidth", np.array(float(bits), dtype=np.float32))]
        return b.node("Quant", ins, f"{name}.quant", domain=QONNX_DOMAIN, shape=shape,
                      signed=int(signed), narrow=0, rounding_mode="ROUND")

    def act(self, b: Builder, x: str, aq: ActQuantizer, name: str, shape: tuple[int, ...]) -> str:
        step, zp = aq.qparams()
        return self._quant(b, x, np.array(step.item()), np.array(zp.item()), aq.bits, False, name, shape)

    def weight(self, b: Builder, module: nn.Module, wq: WeightQuantizer, name: str) -> str:
        w = raw_weight(module).detach().to(torch.float32).cpu()
        wq_val = module.weight.detach().to(torch.float32).cpu().numpy()  # on the grid already
        scale = wq.scale(w).cpu().numpy().astype(np.float32)
        if wq.per_channel:
            shp = [1] * wq_val.ndim
            shp[wq.axis] = -1
            scale = scale.reshape(shp)
        else:
            scale = np.array(scale.reshape(-1)[0], dtype=np.float32)
        wi = b.init(f"{name}.weight", wq_val)
        b.shapes[wi] = tuple(wq_val.shape)
        # code_bits: a reduced-range quantizer's grid is (b-1)-bit, which is what FINN / hls4ml should see
        return self._quant(b, wi, scale, np.array(0.0), wq.code_bits, True, f"{name}.weight",
                           tuple(wq_val.shape))


class _FloatStyle(QuantStyle):
    """Plain FP32 graph: quantizers dropped, raw float weights (a baseline for benchmarks)."""

    opset = QDQ_OPSET

    def __init__(self) -> None:
        self.domain_opsets = {}

    def act(self, b: Builder, x: str, aq: ActQuantizer, name: str, shape: tuple[int, ...]) -> str:
        return x

    def weight(self, b: Builder, module: nn.Module, wq: WeightQuantizer, name: str) -> str:
        w = raw_weight(module).detach().to(torch.float32).cpu().numpy()
        return b.init(f"{name}.weight", w)


def build_float_onnx(model: nn.Module, example_input: torch.Tensor) -> Any:
    """FP32 ONNX of any traceable model: quantizers of an instrumented one are dropped (masks are
    kept). A baseline for size / latency comparisons, not a deployment format of prunequant."""
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    was = gm.training
    gm.eval()
    try:
        proto, onnx = translate(gm, example_input.detach().float(), _FloatStyle(), dynamic_batch=True,
                                value_info=False, graph_name="fp32", doc="prunequant fp32 baseline")
    finally:
        gm.train(was)
    onnx.checker.check_model(proto)
    return proto


def build_onnx(model: nn.Module, example_input: torch.Tensor, format: str = "qdq", *,
               allow_masked: bool = False, dynamic_batch: bool | None = None, int4: bool = True,
               fold_bn: bool = False) -> Any:
    """The ``onnx.ModelProto`` that :func:`export_onnx` writes (see there for the arguments)."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    check_exportable(model, allow_masked=allow_masked, what=f"export_onnx(format={format!r})")
    if not isinstance(example_input, torch.Tensor):
        raise ExportError("example_input must be a tensor batch shaped like the model's input")
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    if fold_bn and format != "qdq":
        raise ExportError("fold_bn applies to format='qdq' only (FINN / hls4ml fold BatchNorm themselves)")
    style: QuantStyle = QDQStyle(int4=int4, fold_bn=fold_bn) if format == "qdq" else QONNXStyle()
    if dynamic_batch is None:
        dynamic_batch = format == "qdq"  # FINN / hls4ml flows want static shapes
    dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
    was = gm.training
    gm.eval()
    try:
        x = example_input.detach().to(dev, torch.float32)
        proto, onnx = translate(gm, x, style, dynamic_batch=dynamic_batch, value_info=format == "qonnx",
                                graph_name=getattr(gm, "pq_original_class", type(gm).__name__),
                                doc=f"prunequant {format} export")
    finally:
        gm.train(was)
    from .. import __version__

    ranges = sorted({m.weight_range for m in gm.modules()
                     if isinstance(m, WeightQuantizer) and bool(m.enabled)})
    # weight_range: "reduced" = (b-1)-bit codes in b-bit weights (quant.weight_range, see export/cpu.py)
    onnx.helper.set_model_props(proto, {"prunequant_version": __version__, "prunequant_format": format,
                                        "prunequant_weight_range": ",".join(ranges) or "none"})
    if format == "qdq":
        onnx.checker.check_model(proto)
    return proto


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, format: str = "qdq", *,
                allow_masked: bool = False, dynamic_batch: bool | None = None, int4: bool = True,
                fold_bn: bool = False) -> Path:
    """Write a quantized model as one self-contained ``.onnx`` file and return its path.

    Args:
        model: a quantized, finalized model (``Compressor.finalize()``; shrunk with
            :func:`prunequant.graph.shrink` when that exists).
        example_input: a batch shaped like the model's input (used for shapes only).
        path: destination; written atomically.
        format: ``"qdq"`` (QuantizeLinear / DequantizeLinear, opset 21) or ``"qonnx"`` (``Quant``).
        allow_masked: export a model whose pruned channels are still present as zeros (masks), even
            though :func:`prunequant.graph.shrink` is available.
        dynamic_batch: symbolic batch dimension ``N`` (default: True for qdq, False for qonnx).
        int4: store <= 4-bit tensors in the opset-21 INT4 / UINT4 types (default); ``False`` uses 8-bit
            containers with clipping (for runtimes without 4-bit support).
        fold_bn: (qdq only) fold each BatchNorm that follows a conv into the conv's per-channel weight
            scales and an INT32 bias (``s_x * s_w`` scale), the pattern integer kernels (ONNX Runtime
            QLinearConv, TensorRT) consume. The integer weight codes are unchanged; the bias is
            rounded to one accumulator step, so the file equals
            ``fold_batchnorm(model, integer_bias=True)``, not the trained model bit for bit: off by
            default.

    Raises:
        ExportError: not quantized, not finalized, an op the translator does not support, ...
    """
    proto = build_onnx(model, example_input, format, allow_masked=allow_masked, dynamic_batch=dynamic_batch,
                       int4=int4, fold_bn=fold_bn)
    data = proto.SerializeToString()
    return atomic_write(path, lambda p: p.write_bytes(data))


def onnx_input_shape(proto: Any) -> list[Any]:
    """Input dims of an exported model (``"N"`` for a dynamic batch)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


__all__ = ["FORMATS", "QDQStyle", "QONNXStyle", "build_onnx", "export_onnx", "onnx_input_shape"]
