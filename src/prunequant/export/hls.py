"""hls4ml conversion of a finalized model through its QONNX export (optional; needs ``hls4ml[onnx]``).

:func:`to_hls4ml` exports the model with ``format="qonnx"``, rewrites the graph into the form that
hls4ml's ONNX frontend accepts and converts it to an hls4ml ``ModelGraph``. ``ModelGraph.compile()``
then builds hls4ml's bit-accurate C++ emulation of the FPGA design with the host compiler (g++; no
vendor tools) and ``ModelGraph.predict`` runs it.

The graph preparation, in order:

1. per-output-channel conv weight scales are pulled out of the weight ``Quant``: the conv gets the
   integer codes (scale 1, so hls4ml stores them as ``b``-bit integers) and a ``Mul`` by the scales
   follows it (``conv(x, q * s_c) + b_c = s_c * conv(x, q) + b_c``). hls4ml 1.3.0 cannot move a
   per-channel weight scale below a conv whose input is also rescaled (its ``ScaleDownConv`` pass
   combines a per-tensor activation scale and per-channel weight scales with ``@``, which raises and
   makes it give up), and the conversion then fails with an ``IndexError`` in
   ``InferPrecisionTypes`` because the conv's weights are not a constant;
2. qonnx's ``cleanup_model`` (shape inference, constant folding, unique names);
3. ``ConvertToChannelsLastAndClean`` (hls4ml's convolutions are channels-last);
4. ``GemmToMatMul`` (the frontend has no ``Gemm``) and a second cleanup;
5. the constant operands of ``Mul`` / ``Add`` lose their batch axis (``[1, 1, 1, C]`` ->
   ``[1, 1, C]``), which hls4ml broadcasts to the per-sample shape.

hls4ml warns "Failed to propagate quantization bias / scales down ..." where an input quantizer has a
non-zero zero point (e.g. the image input); the rescaling then simply stays in front of that layer.

Precision: hls4ml turns each activation ``Quant`` into ``x * (1/step) + zp -> round/saturate to b bits ->
(q - zp) * step`` and each weight scale into a multiplication after the integer matrix product; the
integer parts (codes, accumulators) are exact at any width, but the scale constants, the input and the
values between the rescaling and the next quantizer are stored in the default fixed-point type. At
hls4ml's usual ``fixed<16,6>`` a scale of ``1e-4`` keeps one or two significant bits and the outputs are
wrong; ``fixed<64,24>`` (40 fractional bits, the default here) reproduces PyTorch to float32 rounding
(measured: docs/export.md, "hls4ml"). This is the emulation's setting for checking the integer design;
a hardware build would give the scale constants and intermediate types narrower, tuned precisions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checks import ExportError
from .onnx_export import build_onnx

#: Default fixed-point type of everything hls4ml does not derive from a ``Quant`` node.
DEFAULT_PRECISION = "fixed<64,24>"


def _init_map(proto: Any) -> dict[str, Any]:
    return {t.name: t for t in proto.graph.initializer}


def _pull_conv_weight_scales(proto: Any) -> int:
    """Move per-channel conv weight scales from the weight ``Quant`` into a ``Mul`` after the conv.

    Returns the number of rewritten convs. Only ``Quant`` nodes on an initializer with zero zero-point
    and a non-uniform ``[C, 1, ...]`` scale are touched (prunequant's conv weights).
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = _init_map(proto)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    count = 0
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        quant = producer.get(conv.input[1])
        if quant is None or quant.op_type != "Quant" or consumers.get(conv.input[1], 0) != 1:
            continue
        w_name, s_name, z_name = quant.input[0], quant.input[1], quant.input[2]
        if w_name not in inits or s_name not in inits or z_name not in inits:
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
        s = numpy_helper.to_array(inits[s_name]).astype(np.float64)
        z = numpy_helper.to_array(inits[z_name])
        if np.any(z != 0) or s.ndim < 2 or s.shape[0] != w.shape[0] or np.all(s == s.flat[0]):
            continue  # per-tensor scales are handled by hls4ml itself
        codes = np.round(w / s)
        inits[w_name].CopyFrom(numpy_helper.from_array(codes.astype(np.float32), w_name))
        one = f"{s_name}.one"
        g.initializer.append(numpy_helper.from_array(np.ones((), np.float32), one))
        quant.input[1] = one
        ch = s.shape[0]
        mul_scale = f"{conv.name or conv.output[0]}.channel_scale"
        g.initializer.append(numpy_helper.from_array(
            s.reshape((ch,) + (1,) * (w.ndim - 2)).astype(np.float32), mul_scale))
        out = conv.output[0]
        raw = f"{out}.int"
        conv.output[0] = raw
        new_nodes = []
        if len(conv.input) > 2 and conv.input[2]:  # bias: add after the scale
            b_name = conv.input[2]
            del conv.input[2]
            b = numpy_helper.to_array(inits[b_name]).astype(np.float32)
            b_bc = f"{b_name}.bcast"
            g.initializer.append(numpy_helper.from_array(b.reshape((ch,) + (1,) * (w.ndim - 2)), b_bc))
            scaled = f"{out}.scaled"
            new_nodes.append(helper.make_node("Mul", [raw, mul_scale], [scaled], name=f"{mul_scale}.mul"))
            new_nodes.append(helper.make_node("Add", [scaled, b_bc], [out], name=f"{b_bc}.add"))
        else:
            new_nodes.append(helper.make_node("Mul", [raw, mul_scale], [out], name=f"{mul_scale}.mul"))
        pos = list(g.node).index(conv) + 1
        for k, n in enumerate(new_nodes):
            g.node.insert(pos + k, n)
        count += 1
    return count


def _drop_batch_axis_of_constants(m: Any) -> None:
    """Give the constant operand of an elementwise ``Mul`` / ``Add`` no batch axis (``[1,1,1,C]`` ->
    ``[1,1,C]``): hls4ml broadcasts it to the input shape without the batch axis."""
    for n in m.graph.node:
        if n.op_type not in ("Mul", "Add"):
            continue
        for name in n.input:
            c = m.get_initializer(name)
            if c is not None and c.ndim >= 2 and c.shape[0] == 1:
                m.set_initializer(name, c.reshape(c.shape[1:]))


def prepare_qonnx_for_hls4ml(proto: Any, channels_last_input: bool = False) -> Any:
    """A qonnx ``ModelWrapper`` of a prunequant QONNX ``ModelProto`` in the form hls4ml's frontend takes.

    Args:
        proto: ``build_onnx(model, x, "qonnx")`` (modified in place).
        channels_last_input: make the graph input channels-last (``N, H, W, C``). By default a transpose
            stays at the input, so the hls4ml model takes the PyTorch layout (flattened ``N, C*H*W``).
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    _pull_conv_weight_scales(proto)
    m = cleanup_model(ModelWrapper(proto))
    m = m.transform(ConvertToChannelsLastAndClean(make_input_channels_last=channels_last_input))
    m = m.transform(GemmToMatMul())
    m = cleanup_model(m)
    _drop_batch_axis_of_constants(m)
    return m


def to_hls4ml(model: nn.Module, example_input: torch.Tensor, output_dir: str | Path, *,
              backend: str = "Vitis", io_type: str = "io_parallel", precision: str = DEFAULT_PRECISION,
              project_name: str = "prunequant_model", channels_last_input: bool = False,
              hls_config: dict | None = None) -> Any:
    """Convert a finalized, quantized model into an hls4ml ``ModelGraph`` through QONNX.

    Call ``.compile()`` on the result to build the C++ emulation (g++ only) and ``.predict(x)`` with a
    float array of shape ``(N, C*H*W)`` (the PyTorch ``NCHW`` layout flattened; ``NHWC`` flattened when
    ``channels_last_input``) to run it. Synthesis (``.build()``) needs the vendor's HLS tools.

    Args:
        model: what ``Compressor.finalize()`` returned (quantized, shrunk).
        example_input: a batch shaped like the model's input; the batch size is irrelevant.
        output_dir: where hls4ml writes the HLS project.
        backend: hls4ml backend (``"Vitis"``, ``"Vivado"``, ...).
        io_type: ``"io_parallel"`` or ``"io_stream"``.
        precision: the model-wide default fixed-point type (scale constants, input, the values between
            a rescaling and the next quantizer); see the module docstring.
        project_name: name of the HLS project / top function.
        channels_last_input: see :func:`prepare_qonnx_for_hls4ml`.
        hls_config: a complete hls4ml configuration to use instead of the generated one.

    Raises:
        ExportError: the model cannot be exported (not quantized / not finalized, unsupported op).
        ImportError: ``hls4ml`` / ``qonnx`` / ``onnx`` are not installed.
    """
    import hls4ml

    x = example_input[:1]
    if x.ndim < 2:
        raise ExportError("example_input must be a batch shaped like the model's input")
    proto = build_onnx(model, x, "qonnx")
    m = prepare_qonnx_for_hls4ml(proto, channels_last_input=channels_last_input)
    if hls_config is None:
        hls_config = hls4ml.utils.config.config_from_onnx_model(
            m, granularity="name", backend=backend, default_precision=precision)
    return hls4ml.converters.convert_from_onnx_model(
        m, output_dir=str(output_dir), project_name=project_name, backend=backend, io_type=io_type,
        hls_config=hls_config)
