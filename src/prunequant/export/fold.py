"""BatchNorm folding for deployment: ``conv -> BN`` becomes ``conv(q * s') -> sign * x + b'``.

A finalized, quantized model keeps each BatchNorm as four float32 numbers per channel next to the
conv's float32 weight scale. Integer hardware needs only two per channel: a requantization scale
and a bias. :func:`fold_batchnorm` rewrites the model into that form, in a copy:

* the conv's per-output-channel weight scale becomes ``s'_c = s_c * |g_c|`` with
  ``g_c = gamma_c / sqrt(var_c + eps)``; the integer weight codes are unchanged;
* the BatchNorm becomes ``y = sign(g_c) * x + b'_c`` with ``b'_c = beta_c + (bias_c - mean_c) * g_c``
  (weight ``sign(g_c)``, bias ``b'_c``, mean 0, variance 1, ``eps = 0``: PyTorch evaluates that
  exactly, so the folded model is deterministic); a conv bias is absorbed into ``b'_c`` and zeroed;
* channels with ``g_c = 0`` (constant output) get all-zero codes and output ``b'_c``.

``s'`` and ``b'`` are computed in float64 and rounded once to float32. The folded model equals the
trained one up to that rounding, so an activation that sits on a rounding boundary of the next
quantizer can move by one step; the tests bound how often (tests/export/test_fold.py).
:func:`prunequant.export.save_packed` with ``fold_bn=True`` stores the folded model, and reloading
it is bit-identical to it.

Why float32 and not 16 bits: a bias error ``e`` moves an activation across a rounding boundary of
the next quantizer with probability about ``e / step`` per element, and each such move is a whole
step. Rounding the folded biases to float16 (``e`` about 5e-4 of ``|b'|``) changed the argmax of
2.2 % of the 10,000 Fashion-MNIST test images on the W4A4 benchmark model and cost 0.17 points of
accuracy (measured with the script in docs/export.md); float32 changed none.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx, nn

from ..graph.instrument import weight_quantizer
from ..graph.ops import CONV_TYPES, NORM_TYPES
from ..quant.quantizers import ActQuantizer
from ._checks import ExportError


def fold_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names that :func:`fold_batchnorm` folds.

    A conv qualifies when its weight quantizer is enabled, per output channel (axis 0) and not
    power-of-two (a folded scale is no power of two), its only
    user is an affine BatchNorm with running statistics, and that BatchNorm is not folded already.
    """
    modules = dict(gm.named_modules())
    done = set(getattr(gm, "pq_folded", {}) or {})
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(modules.get(str(n.target)), CONV_TYPES):
            continue
        wq = weight_quantizer(modules[str(n.target)])
        users = list(n.users)
        if (wq is None or not bool(wq.enabled) or not wq.per_channel or wq.axis != 0 or wq.power_of_two
                or len(users) != 1
                or users[0].op != "call_module" or users[0].args[:1] != (n,)):
            continue
        bn = modules.get(str(users[0].target))
        if (not isinstance(bn, NORM_TYPES) or bn.running_var is None or bn.weight is None
                or str(users[0].target) in done):
            continue
        pairs.append((str(n.target), str(users[0].target)))
    return pairs


def folded_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` for each BatchNorm already folded (listed in ``gm.pq_folded``)."""
    folded = set(getattr(gm, "pq_folded", []) or [])
    pairs = []
    for n in gm.graph.nodes:
        if (n.op == "call_module" and str(n.target) in folded and n.args and isinstance(n.args[0], fx.Node)
                and n.args[0].op == "call_module"):
            pairs.append((str(n.args[0].target), str(n.target)))
    if len(pairs) != len(folded):
        raise ExportError("a folded BatchNorm no longer follows its conv in this graph")
    return pairs


def _to_f32(x: np.ndarray, what: str) -> np.ndarray:
    y = x.astype(np.float32)
    if not np.all(np.isfinite(y)):
        raise ExportError(f"fold_batchnorm: {what} is not finite in float32 (BatchNorm statistics broken?)")
    return y


def input_step(gm: fx.GraphModule, conv_name: str) -> float | None:
    """The float32 step of the enabled activation quantizer that feeds conv ``conv_name`` directly,
    or ``None`` (float input, or a mask / other op in between)."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) == conv_name:
            src = n.args[0] if n.args else None
            if isinstance(src, fx.Node) and src.op == "call_module":
                aq = gm.get_submodule(str(src.target))
                if isinstance(aq, ActQuantizer) and bool(aq.enabled):
                    return float(np.float32(aq.qparams()[0].item()))
    return None


def integer_bias_codes(bias: np.ndarray, step_x: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scale)``: ``bias`` rounded to the accumulator grid ``s_x * s_w[c]`` as INT32 codes.

    The grid is the float32 product of the input step and each channel's (float32) weight scale; the
    rounding is half to even from the float64 bias. The ONNX ``fold_bn`` export stores exactly these
    codes and scales, and :func:`fold_batchnorm` (``integer_bias=True``) adds ``codes * scale``
    (float32), which is what ``DequantizeLinear`` of the INT32 bias computes.
    """
    sb = (np.float32(step_x) * np.asarray(w_scale, dtype=np.float32)).astype(np.float32)
    q = np.clip(np.round(np.asarray(bias, np.float64) / sb.astype(np.float64)), -(2**31), 2**31 - 1)
    return q.astype(np.int32), sb


@torch.no_grad()
def fold_batchnorm(model: nn.Module, integer_bias: bool = False) -> fx.GraphModule:
    """A copy of ``model`` with every foldable BatchNorm folded into the conv before it.

    Args:
        model: a quantized model from ``Compressor.finalize()`` (shrunk or not), in eval use.
        integer_bias: round each folded bias to the accumulator grid ``s_x * s'_c`` where the conv's
            input is quantized (:func:`integer_bias_codes`), as integer kernels hold it and as the ONNX
            ``fold_bn`` export stores it (INT32): the exact PyTorch reference of that export. Off by
            default (the packed ``fold_bn`` format keeps the float32 bias).

    Returns:
        The folded copy; its ``pq_folded`` attribute lists the folded BatchNorms.
    """
    if not isinstance(model, fx.GraphModule) or getattr(model, "pq_plan", None) is None:
        raise ExportError("fold_batchnorm needs a model instrumented by prunequant (the model "
                          "Compressor.finalize() returns)")
    gm = copy.deepcopy(model)
    for attr in ("pq_plan", "pq_original_class", "pq_leaves", "pq_folded"):  # fx's deepcopy drops these
        if hasattr(model, attr) and not hasattr(gm, attr):
            setattr(gm, attr, copy.deepcopy(getattr(model, attr)))
    folded = list(getattr(gm, "pq_folded", []) or [])
    for conv_name, bn_name in fold_pairs(gm):
        conv, bn = gm.get_submodule(conv_name), gm.get_submodule(bn_name)
        wq = weight_quantizer(conv)
        w = conv.parametrizations["weight"].original.detach().to(torch.float32).cpu()
        codes = wq.int_codes(w)
        s = wq.scale(w).cpu().double().numpy()
        s = np.broadcast_to(s, (codes.shape[0],)) if s.size == 1 else s
        var = bn.running_var.detach().double()
        g = (bn.weight.detach().double() / torch.sqrt(var + bn.eps)).cpu().numpy()
        b_conv = conv.bias.detach().double().cpu().numpy() if conv.bias is not None else 0.0
        bias = bn.bias.detach().double().cpu().numpy()
        b64 = bias + (b_conv - bn.running_mean.detach().double().cpu().numpy()) * g
        b_new = _to_f32(b64, f"{bn_name}: the folded bias")
        zero = g == 0
        s_new = _to_f32(np.where(zero, s, s * np.abs(g)), f"{conv_name}: the folded weight scale")
        s_new = np.maximum(s_new, np.float32(1e-12))  # the quantizer clamps scales to its epsilon
        sx = input_step(gm, conv_name) if integer_bias else None
        if sx is not None:
            q, sb = integer_bias_codes(b64, sx, s_new)
            b_new = (q.astype(np.float32) * sb).astype(np.float32)
        sign = np.where(g < 0, -1.0, 1.0).astype(np.float32)
        codes[torch.from_numpy(zero)] = 0
        st = torch.from_numpy(s_new)
        orig = conv.parametrizations["weight"].original
        orig.copy_((codes.to(torch.float32) * wq._broadcast(st, codes)).to(orig.device))
        wq.stat_sum.copy_(st.to(torch.float64))
        wq.stat_count.fill_(1.0)
        if conv.bias is not None:
            conv.bias.zero_()
        bn.weight.copy_(torch.from_numpy(sign).to(bn.weight.device))
        bn.bias.copy_(torch.from_numpy(b_new).to(bn.bias.device))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.eps = 0.0
        folded.append(bn_name)
    gm.pq_folded = folded
    return gm


__all__ = ["fold_batchnorm", "fold_pairs", "folded_pairs", "input_step", "integer_bias_codes"]
