"""Translate an instrumented ``torch.fx`` GraphModule into an ONNX graph, node by node.

The graph is built with the ``onnx.helper`` API (no ``torch.onnx`` tracing): every fx node maps to a
few ONNX nodes, with the quantizers emitted by a *quantization style* (:class:`QDQStyle` or
:class:`QONNXStyle`, see :mod:`.onnx_export`). Shapes come from running the model once on the example
input (``torch.fx.passes.shape_prop``). An op this translator does not know raises
:class:`~._checks.ExportError` naming the node, the op and the module path.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..graph.instrument import raw_weight, weight_quantizer
from ..graph.ops import CONV_TYPES, CONVT_TYPES, NORM_TYPES, is_stochastic_depth
from ..graph.trace import is_mode_node
from ..prune.mask import ChannelMask
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ._checks import ExportError


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs the `onnx` package: pip install 'prunequant[export]'") from e
    return onnx


class _Batch:
    """Marker for the (dynamic) batch dimension inside a python size tuple."""

    def __repr__(self) -> str:
        return "BATCH"


BATCH = _Batch()


class Builder:
    """Accumulates ONNX nodes, initializers and value infos with unique names."""

    def __init__(self, opset: int, dynamic_batch: bool):
        self.onnx = _onnx()
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.elem_types: dict[str, int] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.producer_op: dict[str, str] = {}  # tensor name -> op type of the node that makes it

    def fresh(self, hint: str) -> str:
        base = hint.replace("/", "_") or "t"
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def init(self, hint: str, array: np.ndarray | Any) -> str:
        """Add an initializer (numpy array or a TensorProto built by the caller)."""
        onnx = self.onnx
        if isinstance(array, np.ndarray):
            name = self.fresh(hint)
            arr = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # keeps 0-d arrays
            t = onnx.numpy_helper.from_array(arr, name)
        else:
            name = self.fresh(hint)
            t = array
            t.name = name
        self.initializers.append(t)
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A small shared constant (scalars, shapes, clip bounds)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("const", arr)
        return self._consts[key]

    def node(self, op: str, inputs: list[str], hint: str, *, outputs: int = 1, domain: str = "",
             shape: tuple[int, ...] | None = None, elem_type: int | None = None, **attrs: Any):
        """Append a node; returns its output name (or list of names when ``outputs > 1``)."""
        outs = [self.fresh(hint if outputs == 1 else f"{hint}_{i}") for i in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outs, name=self.fresh(f"{hint}_node"),
                                                     domain=domain or None, **attrs))
        for o in outs:
            self.producer_op[o] = op
        if shape is not None:
            self.shapes[outs[0]] = tuple(int(s) for s in shape)
        if elem_type is not None:
            self.elem_types[outs[0]] = elem_type
        return outs if outputs > 1 else outs[0]


class QuantStyle(ABC):
    """How quantizers become ONNX nodes (implemented by the QDQ and QONNX styles)."""

    opset: int
    domain_opsets: dict[str, int] = {}
    fold_bn: bool = False  # fold a BatchNorm that follows a per-channel quantized conv into it
    bias_as_add: bool = False  # float biases as a separate Add (keeps runtimes from quantizing them)

    def folded_weight(self, b: Builder, module: nn.Module, wq: WeightQuantizer, name: str,
                      g: np.ndarray) -> tuple[str, np.ndarray]:
        """Weight times the per-output-channel factor ``g`` (BN folding): ``(name, scales)``."""
        raise ExportError(f"{name}: fold_bn is only supported for format='qdq'")

    def bias(self, b: Builder, x: str, bias: np.ndarray, w_scale: np.ndarray, name: str) -> str:
        """A conv bias (float32 by default)."""
        return b.init(f"{name}.bias", bias.astype(np.float32))

    @abstractmethod
    def act(self, b: Builder, x: str, aq: ActQuantizer, name: str, shape: tuple[int, ...]) -> str:
        """The ONNX nodes of an activation quantizer on tensor ``x``; returns the output name."""

    @abstractmethod
    def weight(self, b: Builder, module: nn.Module, wq: WeightQuantizer, name: str) -> str:
        """The ONNX initializer(s) / nodes of a quantized weight; returns the tensor name."""


def _float_weight(b: Builder, module: nn.Module, name: str) -> str:
    w = raw_weight(module).detach().to(torch.float32).cpu().numpy()
    return b.init(f"{name}.weight", w)


def _weight(b: Builder, style: QuantStyle, module: nn.Module, name: str) -> str:
    wq = weight_quantizer(module)
    if wq is None or not bool(wq.enabled):
        return _float_weight(b, module, name)
    return style.weight(b, module, wq, name)


def _bias(b: Builder, module: nn.Module, name: str, shape: list[int] | None = None) -> str | None:
    if getattr(module, "bias", None) is None:
        return None
    arr = module.bias.detach().to(torch.float32).cpu().numpy()
    return b.init(f"{name}.bias", arr.reshape(shape) if shape else arr)


def _bn_factor(bn: nn.Module) -> np.ndarray:
    """Per-channel multiplier ``gamma / sqrt(var + eps)`` of an eval-mode BatchNorm (float64)."""
    var = bn.running_var.detach().double().cpu().numpy()
    gamma = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else np.ones_like(var)
    return gamma / np.sqrt(var + bn.eps)


def _tuple(v: Any, n: int) -> list[int]:
    if isinstance(v, (tuple, list)):
        return [int(x) for x in v]
    return [int(v)] * n


def _conv_pads(m: nn.Module, nd: int, name: str) -> list[int]:
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise ExportError(f"{name}: padding_mode={m.padding_mode!r} is not supported by the exporter "
                          "(only 'zeros')")
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            return [0] * (2 * nd)
        # 'same' (stride 1): total = dilation * (k - 1), the extra one goes to the end (as PyTorch)
        k = _tuple(m.kernel_size, nd)
        d = _tuple(m.dilation, nd)
        tot = [d[i] * (k[i] - 1) for i in range(nd)]
        return [t // 2 for t in tot] + [t - t // 2 for t in tot]
    p = _tuple(pad, nd)
    return p + p


#: Functional dropouts (identity when their ``training`` argument is False).
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


class Translator:
    """Walks the fx graph and emits ONNX through a :class:`Builder` and a :class:`QuantStyle`."""

    def __init__(self, gm: fx.GraphModule, style: QuantStyle, builder: Builder):
        self.gm = gm
        self.style = style
        self.b = builder
        self.env: dict[fx.Node, Any] = {}
        self.modules = dict(gm.named_modules())
        self.folded: dict[fx.Node, fx.Node] = {}  # conv node -> the BN node folded into it
        self.folded_bn: set[fx.Node] = set()

    def _plan_folding(self) -> None:
        """Convs whose only user is a BatchNorm, with a per-output-channel weight quantizer."""
        for n in self.gm.graph.nodes:
            if n.op != "call_module" or not isinstance(self.modules[str(n.target)], CONV_TYPES):
                continue
            conv = self.modules[str(n.target)]
            wq = weight_quantizer(conv)
            users = list(n.users)
            if (wq is None or not bool(wq.enabled) or not wq.per_channel or wq.axis != 0
                    or len(users) != 1 or users[0].op != "call_module" or users[0].args[0] is not n):
                continue
            bn = self.modules[str(users[0].target)]
            if not isinstance(bn, NORM_TYPES) or bn.running_var is None:
                continue
            self.folded[n] = users[0]
            self.folded_bn.add(users[0])

    # ------------------------------------------------------------------ helpers
    def shape(self, n: fx.Node) -> tuple[int, ...]:
        tm = n.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise ExportError(f"node {n.name}: no tensor shape recorded (does it return a tensor?)")
        return tuple(int(s) for s in tm.shape)

    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.val(x) for x in a)
        return a

    def tensor(self, a: Any, like: fx.Node | None = None) -> str:
        """ONNX name of a tensor argument; python numbers become float32 constants."""
        v = self.val(a)
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float, bool)):
            return self.b.const(float(v))
        if isinstance(v, torch.Tensor):
            return self.b.init("const", v.detach().to(torch.float32).cpu().numpy())
        raise ExportError(f"unsupported argument {v!r} (expected a tensor)")

    def fail(self, n: fx.Node, what: str) -> ExportError:
        return ExportError(
            f"cannot export node {n.name!r} ({n.op} {what}): not supported by prunequant's ONNX "
            "translator. Supported: conv / transposed conv / linear, batch / instance / group norm, "
            "ReLU / ReLU6 / LeakyReLU / PReLU / SiLU / GELU / Hardswish / Hardsigmoid / ELU / SELU / CELU "
            "/ Mish / softplus / softsign / sigmoid / tanh / hardtanh / softmax, max / avg / adaptive "
            "pooling, flatten / view / reshape / permute / transpose, slicing, split / chunk, cat, "
            "add / sub / mul / div, mean, pad, nearest / linear upsampling, pixel (un)shuffle, dropout "
            "/ identity (docs/export.md). Rewrite that part of forward() with these ops or open an issue"
        )

    # ------------------------------------------------------------------ main loop
    def run(self, example_input: torch.Tensor) -> tuple[list[str], list[tuple[int, ...]]]:
        ShapeProp(self.gm).propagate(example_input)
        if self.style.fold_bn:
            self._plan_folding()
        outputs: list[str] = []
        out_shapes: list[tuple[int, ...]] = []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if n.meta.get("tensor_meta") is None:
                    raise ExportError("the model must take exactly one tensor input")
                self.env[n] = "input"
                self.b._names.add("input")
                self.b.shapes["input"] = self.shape(n)
            elif is_mode_node(n):
                self.env[n] = False  # a module's training flag: the export computes eval mode
            elif n.op == "get_attr":
                t = self.gm
                for part in str(n.target).split("."):
                    t = getattr(t, part)
                self.env[n] = t
            elif n.op == "call_module":
                self.env[n] = self.call_module(n)
            elif n.op == "call_function":
                self.env[n] = self.call_function(n)
            elif n.op == "call_method":
                self.env[n] = self.call_method(n)
            elif n.op == "output":
                res = n.args[0]
                items = list(res) if isinstance(res, (list, tuple)) else [res]
                for r in items:
                    if not isinstance(r, fx.Node):
                        raise ExportError("the model's outputs must be tensors")
                    outputs.append(self.tensor(r))
                    out_shapes.append(self.shape(r))
        return outputs, out_shapes

    def set(self, name: str, n: fx.Node) -> str:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            self.b.shapes[name] = tuple(int(s) for s in tm.shape)
        return name

    # ------------------------------------------------------------------ modules
    def call_module(self, n: fx.Node) -> Any:
        m = self.modules[str(n.target)]
        name = str(n.target)
        b = self.b
        x = self.tensor(n.args[0]) if n.args else None
        if isinstance(m, ActQuantizer):
            if not bool(m.enabled):
                return x
            return self.style.act(b, x, m, name, self.shape(n))
        if isinstance(m, ChannelMask):
            mask = m.mask.detach().to(torch.float32).cpu().numpy()
            if bool(np.all(mask == 1.0)):
                return x
            shp = [1] * len(self.shape(n))
            shp[1] = -1
            return self.set(b.node("Mul", [x, b.init(f"{name}.mask", mask.reshape(shp))], name), n)
        if isinstance(m, CONV_TYPES + CONVT_TYPES):
            nd = m.weight.dim() - 2
            if n in self.folded:
                bn = self.modules[str(self.folded[n].target)]
                g = _bn_factor(bn)
                beta = bn.bias.detach().double().cpu().numpy() if bn.bias is not None else 0.0
                mean = bn.running_mean.detach().double().cpu().numpy()
                b0 = m.bias.detach().double().cpu().numpy() if m.bias is not None else 0.0
                w, w_scale = self.style.folded_weight(b, m, weight_quantizer(m), name, g)
                ins = [x, w, self.style.bias(b, x, (b0 - mean) * g + beta, w_scale, name)]
            else:
                w = _weight(b, self.style, m, name)
                bias = _bias(b, m, name, shape=[1, -1] + [1] * nd if self.style.bias_as_add else None)
                ins = [x, w] + ([bias] if bias and not self.style.bias_as_add else [])
            attrs = dict(kernel_shape=_tuple(m.kernel_size, nd), strides=_tuple(m.stride, nd),
                         dilations=_tuple(m.dilation, nd), group=int(m.groups))
            if n not in self.folded and bias and self.style.bias_as_add:
                op = "ConvTranspose" if isinstance(m, CONVT_TYPES) else "Conv"
                if op == "ConvTranspose":
                    p = _tuple(m.padding, nd)
                    attrs.update(pads=p + p, output_padding=_tuple(m.output_padding, nd))
                else:
                    attrs["pads"] = _conv_pads(m, nd, name)
                y = b.node(op, ins, name, **attrs)
                return self.set(b.node("Add", [y, bias], name), n)
            if isinstance(m, CONVT_TYPES):
                if getattr(m, "padding_mode", "zeros") != "zeros":
                    raise ExportError(f"{name}: padding_mode {m.padding_mode!r} not supported")
                p = _tuple(m.padding, nd)
                attrs.update(pads=p + p, output_padding=_tuple(m.output_padding, nd))
                return self.set(b.node("ConvTranspose", ins, name, **attrs), n)
            attrs["pads"] = _conv_pads(m, nd, name)
            return self.set(b.node("Conv", ins, name, **attrs), n)
        if isinstance(m, nn.Linear):
            w = _weight(b, self.style, m, name)
            bias = _bias(b, m, name)
            if len(self.shape(n.args[0])) == 2:
                if bias and self.style.bias_as_add:
                    return self.set(b.node("Add", [b.node("Gemm", [x, w], name, transB=1), bias], name), n)
                return self.set(b.node("Gemm", [x, w] + ([bias] if bias else []), name, transB=1), n)
            wt = b.node("Transpose", [w], f"{name}.weight_t", perm=[1, 0])
            y = b.node("MatMul", [x, wt], name)
            return self.set(b.node("Add", [y, bias], name) if bias else y, n)
        if isinstance(m, NORM_TYPES):
            if n in self.folded_bn:
                return x
            if m.running_mean is None:
                raise ExportError(f"{name}: BatchNorm without running statistics cannot be exported")
            return self.running_norm(n, x, m)
        if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            return self.instance_norm(n, x, m)
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(n, x, m.num_groups, m.weight, m.bias, m.eps)
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                          nn.FeatureAlphaDropout, nn.Identity)):
            return x
        if isinstance(m, nn.PixelUnshuffle):
            return self.pixel_unshuffle(n, x, int(m.downscale_factor))
        if isinstance(m, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)):
            return self.resize(n, x, m.mode, m.align_corners)
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                          nn.ConstantPad3d)):
            return self.pad(n, x, m.padding, "constant", float(getattr(m, "value", 0.0)))
        if isinstance(m, (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)):
            return self.pad(n, x, m.padding, "reflect")
        if isinstance(m, (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)):
            return self.pad(n, x, m.padding, "replicate")
        if isinstance(m, nn.Flatten):
            return self.flatten(n, x, m.start_dim, m.end_dim)
        if isinstance(m, nn.PixelShuffle):
            return self.set(b.node("DepthToSpace", [x], name, blocksize=int(m.upscale_factor), mode="CRD"), n)
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return self.adaptive(n, x, "avg")
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return self.adaptive(n, x, "max")
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            if m.return_indices:
                raise self.fail(n, f"{type(m).__name__}(return_indices=True)")
            return self.pool(n, x, "max", m.kernel_size, m.stride, m.padding, m.ceil_mode, m.dilation)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            if getattr(m, "divisor_override", None):
                raise self.fail(n, f"{type(m).__name__}(divisor_override)")
            return self.pool(n, x, "avg", m.kernel_size, m.stride, m.padding, m.ceil_mode, 1,
                             m.count_include_pad)
        act = self.activation(n, x, m)
        if act is not None:
            return act
        raise self.fail(n, f"module {name} of type {type(m).__name__}")

    def activation(self, n: fx.Node, x: str, m: nn.Module) -> str | None:
        b, name = self.b, str(n.target)
        if isinstance(m, nn.ReLU):
            return self.set(b.node("Relu", [x], name), n)
        if isinstance(m, nn.ReLU6):
            return self.set(b.node("Clip", [x, b.const(0.0), b.const(6.0)], name), n)
        if isinstance(m, nn.Hardtanh):
            return self.set(b.node("Clip", [x, b.const(m.min_val), b.const(m.max_val)], name), n)
        if isinstance(m, nn.LeakyReLU):
            return self.set(b.node("LeakyRelu", [x], name, alpha=float(m.negative_slope)), n)
        if isinstance(m, nn.PReLU):
            slope = m.weight.detach().to(torch.float32).cpu().numpy()
            rank = len(self.shape(n))
            if slope.size > 1:
                slope = slope.reshape([-1] + [1] * max(rank - 2, 0))
            return self.set(b.node("PRelu", [x, b.init(f"{name}.weight", slope)], name), n)
        if isinstance(m, nn.ELU):
            return self.set(b.node("Elu", [x], name, alpha=float(m.alpha)), n)
        if isinstance(m, nn.Sigmoid):
            return self.set(b.node("Sigmoid", [x], name), n)
        if isinstance(m, nn.Tanh):
            return self.set(b.node("Tanh", [x], name), n)
        if isinstance(m, nn.SiLU):
            return self.silu(n, x)
        if isinstance(m, nn.Hardswish):
            return self.hardswish(n, x)
        if isinstance(m, nn.GELU):
            return self.gelu(n, x, m.approximate)
        if isinstance(m, nn.Hardsigmoid):
            return self.set(b.node("HardSigmoid", [x], name, alpha=1.0 / 6.0, beta=0.5), n)
        if isinstance(m, nn.Softplus) and float(m.beta) == 1.0:
            return self.set(b.node("Softplus", [x], name), n)
        if isinstance(m, nn.SELU):
            return self.set(b.node("Selu", [x], name), n)
        if isinstance(m, nn.CELU):
            return self.set(b.node("Celu", [x], name, alpha=float(m.alpha)), n)
        if isinstance(m, nn.Softsign):
            return self.set(b.node("Softsign", [x], name), n)
        if isinstance(m, nn.Mish):
            sp = b.node("Softplus", [x], f"{name}_softplus")
            return self.set(b.node("Mul", [x, b.node("Tanh", [sp], f"{name}_tanh")], name), n)
        if isinstance(m, nn.Softmax):
            return self.set(b.node("Softmax", [x], name, axis=int(m.dim if m.dim is not None else -1)), n)
        return None

    def silu(self, n: fx.Node, x: str) -> str:
        s = self.b.node("Sigmoid", [x], f"{n.name}_sigmoid")
        return self.set(self.b.node("Mul", [x, s], n.name), n)

    def hardswish(self, n: fx.Node, x: str) -> str:
        s = self.b.node("HardSigmoid", [x], f"{n.name}_hsig", alpha=1.0 / 6.0, beta=0.5)
        return self.set(self.b.node("Mul", [x, s], n.name), n)

    def gelu(self, n: fx.Node, x: str, approximate: str = "none") -> str:
        b = self.b
        if approximate == "tanh":
            x3 = b.node("Mul", [b.node("Mul", [x, x], n.name), x], n.name)
            inner = b.node("Add", [x, b.node("Mul", [x3, b.const(0.044715)], n.name)], n.name)
            t = b.node("Tanh", [b.node("Mul", [inner, b.const(math.sqrt(2.0 / math.pi))], n.name)], n.name)
        else:
            t = b.node("Erf", [b.node("Mul", [x, b.const(1.0 / math.sqrt(2.0))], n.name)], n.name)
        one = b.node("Add", [t, b.const(1.0)], n.name)
        return self.set(b.node("Mul", [b.node("Mul", [x, one], n.name), b.const(0.5)], n.name), n)

    def running_norm(self, n: fx.Node, x: str, m: nn.Module) -> str:
        """A BatchNormalization node from a norm's affine parameters and running statistics."""
        b, name = self.b, str(n.target)
        c = m.num_features
        g = m.weight.detach() if m.weight is not None else torch.ones(c)
        be = m.bias.detach() if m.bias is not None else torch.zeros(c)
        arrs = [t.to(torch.float32).cpu().numpy() for t in (g, be, m.running_mean, m.running_var)]
        ins = [x] + [b.init(f"{name}.{k}", a) for k, a in zip(("weight", "bias", "mean", "var"), arrs)]
        return self.set(b.node("BatchNormalization", ins, name, epsilon=float(m.eps)), n)

    def instance_norm(self, n: fx.Node, x: str, m: nn.Module) -> str:
        b, name = self.b, str(n.target)
        if m.track_running_stats and m.running_mean is not None:  # eval uses the running statistics
            return self.running_norm(n, x, m)
        c = self.shape(n)[1]
        g = m.weight.detach() if m.weight is not None else torch.ones(c)
        be = m.bias.detach() if m.bias is not None else torch.zeros(c)
        ins = [x, b.init(f"{name}.weight", g.float().cpu().numpy()),
               b.init(f"{name}.bias", be.float().cpu().numpy())]
        return self.set(b.node("InstanceNormalization", ins, name, epsilon=float(m.eps)), n)

    def group_norm(self, n: fx.Node, x: str, groups: int, weight: Any, bias: Any, eps: float) -> str:
        """GroupNorm as Reshape -> InstanceNormalization over the groups -> Reshape -> affine."""
        b, name = self.b, n.name
        shape = self.shape(n)
        c = shape[1]
        t = b.node("Reshape", [x, b.const([0, groups, -1], np.int64)], f"{name}_groups",
                   shape=(shape[0], groups, int(np.prod(shape[1:])) // groups))
        t = b.node("InstanceNormalization", [t, b.const(np.ones(groups)), b.const(np.zeros(groups))],
                   f"{name}_norm", epsilon=float(eps), shape=b.shapes[t])
        y = b.node("Reshape", [t, b.const([0] + list(shape[1:]), np.int64)], f"{name}_back", shape=shape)
        aff = [1, c] + [1] * (len(shape) - 2)
        if weight is not None:
            w = b.init(f"{name}.weight", weight.detach().float().cpu().numpy().reshape(aff))
            y = b.node("Mul", [y, w], name, shape=shape)
        if bias is not None:
            bb = b.init(f"{name}.bias", bias.detach().float().cpu().numpy().reshape(aff))
            y = b.node("Add", [y, bb], name, shape=shape)
        return self.set(y, n)

    def pixel_unshuffle(self, n: fx.Node, x: str, r: int) -> str:
        _, c, h, w = self.shape(n.args[0])
        t = self.b.node("Reshape", [x, self.b.const([0, c, h // r, r, w // r, r], np.int64)], n.name)
        t = self.b.node("Transpose", [t], n.name, perm=[0, 1, 3, 5, 2, 4])
        return self.set(self.b.node("Reshape", [t, self.b.const([0, c * r * r, h // r, w // r], np.int64)],
                                    n.name), n)

    def resize(self, n: fx.Node, x: str, mode: str, align_corners: bool | None) -> str:
        ins, out = self.shape(n.args[0]), self.shape(n)
        scales = [1.0, 1.0] + [o / i for i, o in zip(ins[2:], out[2:])]
        if mode == "nearest":
            attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif mode in ("bilinear", "linear", "trilinear"):
            ctm = "align_corners" if align_corners else "pytorch_half_pixel"
            attrs = dict(mode="linear", coordinate_transformation_mode=ctm)
        else:
            raise self.fail(n, f"interpolation mode {mode!r}")
        if any(float(o) / i != int(o / i) or o % i for i, o in zip(ins[2:], out[2:])) and mode == "nearest":
            raise self.fail(n, "nearest upsampling by a non-integer factor")
        return self.set(self.b.node("Resize", [x, "", self.b.const(scales)], n.name, **attrs), n)

    def pad(self, n: fx.Node, x: str, padding: Any, mode: str, value: float = 0.0) -> str:
        rank = len(self.shape(n))
        p = list(padding) if isinstance(padding, (tuple, list)) else [int(padding)] * (2 * (rank - 2))
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(p) // 2):  # torch: (last_begin, last_end, second_last_begin, ...)
            begins[rank - 1 - i], ends[rank - 1 - i] = int(p[2 * i]), int(p[2 * i + 1])
        onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
        ins = [x, self.b.const(begins + ends, np.int64)]
        if onnx_mode == "constant":
            ins.append(self.b.const(value))
        return self.set(self.b.node("Pad", ins, n.name, mode=onnx_mode), n)

    def index(self, n: fx.Node, x: str, index: Any) -> str:
        """Tensor indexing with slices, integers and an Ellipsis (``x[:, a:b]``, ``x[..., 0]``)."""
        idx = index if isinstance(index, tuple) else (index,)
        rank = len(self.shape(n.args[0]))
        if any(i is None for i in idx):
            raise self.fail(n, "indexing with None")
        n_real = sum(1 for i in idx if i is not Ellipsis)
        starts, ends, axes, steps, squeeze = [], [], [], [], []
        dim = 0
        for i in idx:
            if i is Ellipsis:
                dim += rank - n_real
                continue
            if isinstance(i, slice):
                if (i.start, i.stop, i.step) != (None, None, None):
                    starts.append(0 if i.start is None else int(i.start))
                    ends.append(2**62 if i.stop is None else int(i.stop))
                    steps.append(1 if i.step is None else int(i.step))
                    axes.append(dim)
            elif isinstance(i, int):
                starts.append(i)
                ends.append(i + 1 if i != -1 else 2**62)
                steps.append(1)
                axes.append(dim)
                squeeze.append(dim)
            else:
                raise self.fail(n, f"indexing with {type(i).__name__}")
            dim += 1
        b = self.b
        y = x
        if axes:
            y = b.node("Slice", [x, b.const(starts, np.int64), b.const(ends, np.int64),
                                 b.const(axes, np.int64), b.const(steps, np.int64)], n.name)
        if squeeze:
            y = b.node("Squeeze", [y, b.const(squeeze, np.int64)], n.name)
        if y == x:
            y = b.node("Identity", [x], n.name)
        return self.set(y, n)

    def split(self, n: fx.Node, x: str, dim: int) -> list[str]:
        tm = n.meta.get("tensor_meta")
        shapes = [tuple(int(v) for v in t.shape) for t in tm]
        dim = int(dim) % len(shapes[0])
        sizes = [sh[dim] for sh in shapes]
        outs = self.b.node("Split", [x, self.b.const(sizes, np.int64)], n.name, outputs=len(sizes), axis=dim)
        outs = outs if isinstance(outs, list) else [outs]
        for o, sh in zip(outs, shapes):
            self.b.shapes[o] = sh
        return outs

    def flatten(self, n: fx.Node, x: str, start: int, end: int) -> str:
        rank = len(self.shape(n.args[0]))
        start, end = start % rank, end % rank
        if end == rank - 1:
            if start == 0:
                return self.set(self.b.node("Reshape", [x, self.b.const([1, -1], np.int64)], n.name), n)
            if start == 1:
                return self.set(self.b.node("Flatten", [x], n.name, axis=1), n)
        out = list(self.shape(n))
        return self.reshape(n, x, [BATCH] + out[1:] if start > 0 else out)

    def reshape(self, n: fx.Node, x: str, sizes: list[Any]) -> str:
        spec: list[int] = []
        for i, s in enumerate(sizes):
            if s is BATCH:
                if i != 0:
                    raise self.fail(n, "reshape moving the batch dimension")
                spec.append(0)
            else:
                spec.append(int(s))
        if spec and spec[0] != 0 and self.b.dynamic_batch and -1 not in spec:
            spec[0] = 0 if spec[0] == self.shape(n.args[0])[0] else spec[0]
        return self.set(self.b.node("Reshape", [x, self.b.const(spec, np.int64)], n.name), n)

    def pool(self, n: fx.Node, x: str, kind: str, k: Any, s: Any, p: Any, ceil: bool, d: Any = 1,
             count_include_pad: bool = True) -> str:
        nd = len(self.shape(n)) - 2
        k = _tuple(k, nd)
        s = _tuple(s if s not in (None, [], ()) else k, nd)
        pp = _tuple(p, nd)
        attrs = dict(kernel_shape=k, strides=s, pads=pp + pp, ceil_mode=int(bool(ceil)))
        if kind == "max":
            attrs["dilations"] = _tuple(d, nd)
            return self.set(self.b.node("MaxPool", [x], n.name, **attrs), n)
        attrs["count_include_pad"] = int(bool(count_include_pad))
        return self.set(self.b.node("AveragePool", [x], n.name, **attrs), n)

    def adaptive(self, n: fx.Node, x: str, kind: str) -> str:
        ins, out = self.shape(n.args[0])[2:], self.shape(n)[2:]
        if all(o == 1 for o in out):
            op = "GlobalAveragePool" if kind == "avg" else "GlobalMaxPool"
            return self.set(self.b.node(op, [x], n.name), n)
        if all(i % o == 0 for i, o in zip(ins, out)):
            k = [i // o for i, o in zip(ins, out)]
            return self.pool(n, x, kind, k, k, 0, False)
        raise self.fail(n, f"adaptive pooling {tuple(ins)} -> {tuple(out)} with uneven windows")

    # ------------------------------------------------------------------ functions and methods
    _BINARY: dict[Any, str] = {
        operator.add: "Add", torch.add: "Add", operator.iadd: "Add",
        operator.sub: "Sub", torch.sub: "Sub",
        operator.mul: "Mul", torch.mul: "Mul", operator.imul: "Mul",
        operator.truediv: "Div", torch.div: "Div",
    }
    _UNARY: dict[Any, str] = {
        F.relu: "Relu", torch.relu: "Relu", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid",
        torch.tanh: "Tanh", F.tanh: "Tanh",
    }

    def call_function(self, n: fx.Node) -> Any:
        f = n.target
        b = self.b
        if f is operator.getitem:
            obj, idx = self.val(n.args[0]), self.val(n.args[1])
            if isinstance(obj, (tuple, list)):
                return obj[idx]
            if isinstance(obj, str):
                return self.index(n, obj, idx)
            raise self.fail(n, f"indexing {type(obj).__name__}")
        if f in (operator.floordiv, operator.mod) and not any(isinstance(self.val(a), str) for a in n.args):
            return f(self.val(n.args[0]), self.val(n.args[1]))
        if f is getattr:
            obj, attr = n.args[0], n.args[1]
            if attr == "shape" and isinstance(obj, fx.Node):
                return (BATCH,) + self.shape(obj)[1:]
            raise self.fail(n, f"getattr {attr}")
        if f in self._BINARY:
            a, c = n.args[0], n.args[1]
            va, vc = self.val(a), self.val(c)
            if isinstance(va, (int, float)) and isinstance(vc, (int, float)):
                return f(va, vc)  # python arithmetic on sizes / constants
            if n.kwargs.get("alpha", 1) != 1:
                raise self.fail(n, "add/sub with alpha")
            return self.set(b.node(self._BINARY[f], [self.tensor(a), self.tensor(c)], n.name), n)
        if f in self._UNARY:
            return self.set(b.node(self._UNARY[f], [self.tensor(n.args[0])], n.name), n)
        x = self.tensor(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        kw = dict(n.kwargs)
        if f is F.relu6:
            return self.set(b.node("Clip", [x, b.const(0.0), b.const(6.0)], n.name), n)
        if f is F.hardtanh:
            lo = n.args[1] if len(n.args) > 1 else kw.get("min_val", -1.0)
            hi = n.args[2] if len(n.args) > 2 else kw.get("max_val", 1.0)
            return self.set(b.node("Clip", [x, b.const(lo), b.const(hi)], n.name), n)
        if f is F.leaky_relu:
            slope = n.args[1] if len(n.args) > 1 else kw.get("negative_slope", 0.01)
            return self.set(b.node("LeakyRelu", [x], n.name, alpha=float(slope)), n)
        if f is F.elu:
            alpha = n.args[1] if len(n.args) > 1 else kw.get("alpha", 1.0)
            return self.set(b.node("Elu", [x], n.name, alpha=float(alpha)), n)
        if f in (torch.split, torch.chunk):
            dim = n.args[2] if len(n.args) > 2 else kw.get("dim", 0)
            return self.split(n, x, dim)
        if f is F.pad:
            pad = n.args[1] if len(n.args) > 1 else kw["pad"]
            mode = n.args[2] if len(n.args) > 2 else kw.get("mode", "constant")
            value = n.args[3] if len(n.args) > 3 else kw.get("value", None)
            return self.pad(n, x, pad, mode, float(value or 0.0))
        if f is F.interpolate:
            mode = n.args[3] if len(n.args) > 3 else kw.get("mode", "nearest")
            ac = n.args[4] if len(n.args) > 4 else kw.get("align_corners", None)
            return self.resize(n, x, mode, ac)
        if f is torch.transpose:
            return self.transpose(n, x, n.args[1], n.args[2])
        if f is F.pixel_unshuffle:
            return self.pixel_unshuffle(n, x, int(n.args[1] if len(n.args) > 1 else kw["downscale_factor"]))
        if f is F.hardsigmoid:
            return self.set(b.node("HardSigmoid", [x], n.name, alpha=1.0 / 6.0, beta=0.5), n)
        if f is F.softplus and (n.args[1] if len(n.args) > 1 else kw.get("beta", 1.0)) == 1.0:
            return self.set(b.node("Softplus", [x], n.name), n)
        if f is F.silu:
            return self.silu(n, x)
        if f is F.hardswish:
            return self.hardswish(n, x)
        if f is F.gelu:
            return self.gelu(n, x, kw.get("approximate", "none"))
        if f in _DROPOUTS or is_stochastic_depth(f):  # identity in eval mode; the flag is live (trace())
            i = 3 if is_stochastic_depth(f) else 2
            training = self.val(n.args[i] if len(n.args) > i else kw.get("training", True))
            p = self.val(n.args[1] if len(n.args) > 1 else kw.get("p", 0.5))
            if training is not False and p != 0:
                raise self.fail(n, f"{f.__name__} with training={training!r}: active in eval mode")
            return x
        if f is torch.flatten:
            start = n.args[1] if len(n.args) > 1 else kw.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else kw.get("end_dim", -1)
            return self.flatten(n, x, start, end)
        if f in (torch.cat, torch.concat):
            tensors = [self.tensor(t) for t in n.args[0]]
            dim = n.args[1] if len(n.args) > 1 else kw.get("dim", 0)
            return self.set(b.node("Concat", tensors, n.name, axis=int(dim) % len(self.shape(n))), n)
        if f is F.pixel_shuffle:
            r = n.args[1] if len(n.args) > 1 else kw["upscale_factor"]
            return self.set(b.node("DepthToSpace", [x], n.name, blocksize=int(r), mode="CRD"), n)
        if f in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d):
            return self.adaptive(n, x, "avg")
        if f is F.adaptive_max_pool2d:
            return self.adaptive(n, x, "max")
        if f in (F.avg_pool2d, F.max_pool2d):
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
            if f is F.max_pool2d:
                names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
            a = dict(zip(names, n.args))
            a.update(kw)
            kind = "max" if f is F.max_pool2d else "avg"
            return self.pool(n, x, kind, a["kernel_size"], a.get("stride"), a.get("padding", 0),
                             a.get("ceil_mode", False), a.get("dilation", 1),
                             a.get("count_include_pad", True))
        if f is torch.mean:
            return self.mean(n, x, n.args[1] if len(n.args) > 1 else kw.get("dim"),
                             n.args[2] if len(n.args) > 2 else kw.get("keepdim", False))
        if f in (torch.reshape,):
            return self.reshape(n, x, list(self.val(n.args[1])))
        raise self.fail(n, getattr(f, "__name__", str(f)))

    def transpose(self, n: fx.Node, x: str, d0: int, d1: int) -> str:
        rank = len(self.shape(n))
        perm = list(range(rank))
        d0, d1 = int(d0) % rank, int(d1) % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.set(self.b.node("Transpose", [x], n.name, perm=perm), n)

    def mean(self, n: fx.Node, x: str, dim: Any, keepdim: bool) -> str:
        rank = len(self.shape(n.args[0]))
        axes = list(range(rank)) if dim is None else [int(d) % rank for d in _tuple(dim, 1)]
        if self.b.opset >= 18:
            return self.set(self.b.node("ReduceMean", [x, self.b.const(axes, np.int64)], n.name,
                                        keepdims=int(bool(keepdim))), n)
        return self.set(self.b.node("ReduceMean", [x], n.name, axes=axes, keepdims=int(bool(keepdim))), n)

    def call_method(self, n: fx.Node) -> Any:
        meth = n.target
        b = self.b
        if meth == "size":
            shp = (BATCH,) + self.shape(n.args[0])[1:]
            idx = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return shp if idx is None else shp[idx]
        x = self.tensor(n.args[0])
        if meth in ("contiguous", "clone", "detach", "float"):
            return x
        if meth == "relu":
            return self.set(b.node("Relu", [x], n.name), n)
        if meth == "sigmoid":
            return self.set(b.node("Sigmoid", [x], n.name), n)
        if meth == "tanh":
            return self.set(b.node("Tanh", [x], n.name), n)
        if meth == "flatten":
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            return self.flatten(n, x, start, end)
        if meth in ("view", "reshape"):
            sizes = [self.val(a) for a in n.args[1:]]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            return self.reshape(n, x, sizes)
        if meth == "mean":
            return self.mean(n, x, n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"),
                             n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        if meth in ("add", "sub", "mul", "div"):
            op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}[meth]
            return self.set(b.node(op, [x, self.tensor(n.args[1])], n.name), n)
        if meth in ("split", "chunk"):
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            return self.split(n, x, dim)
        if meth == "transpose":
            return self.transpose(n, x, n.args[1], n.args[2])
        if meth == "permute":
            perm = n.args[1:] if len(n.args) > 2 else n.args[1]
            return self.set(b.node("Transpose", [x], n.name, perm=[int(p) for p in perm]), n)
        raise self.fail(n, f"method .{meth}()")


def translate(gm: fx.GraphModule, example_input: torch.Tensor, style: QuantStyle, *,
              dynamic_batch: bool, value_info: bool, graph_name: str, doc: str) -> Any:
    """Build the ``onnx.ModelProto`` of ``gm`` (in eval mode) under ``style``."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    b = Builder(style.opset, dynamic_batch)
    tr = Translator(gm, style, b)
    with torch.no_grad():
        outputs, out_shapes = tr.run(example_input)
    # Graph outputs are called output / output_i: rename the producing node's output when it is
    # produced by exactly one node, else add an Identity.
    producers: dict[str, int] = {}
    for nd in b.nodes:
        for o in nd.output:
            producers[o] = producers.get(o, 0) + 1
    renamed: dict[str, str] = {}
    final: list[str] = []
    for i, o in enumerate(outputs):
        want = "output" if len(outputs) == 1 else f"output_{i}"
        if producers.get(o) == 1 and o not in renamed:
            for nd in b.nodes:
                for lst in (nd.input, nd.output):
                    for j, v in enumerate(lst):
                        if v == o:
                            lst[j] = want
            if o in b.shapes:
                b.shapes[want] = b.shapes[o]
            renamed[o] = want
        else:
            b.node("Identity", [renamed.get(o, o)], want)
            b.nodes[-1].output[0] = want
        final.append(want)

    def dims(shape: tuple[int, ...]) -> list[Any]:
        d: list[Any] = list(shape)
        if dynamic_batch and d:
            d[0] = "N"
        return d

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims(b.shapes["input"]))]
    outs = [helper.make_tensor_value_info(f, TensorProto.FLOAT, dims(s)) for f, s in zip(final, out_shapes)]
    vinfo = []
    if value_info:
        skip = {"input", *final}
        inits = {t.name for t in b.initializers}
        for nd in b.nodes:
            for o in nd.output:
                if o in skip or o in inits or o not in b.shapes:
                    continue
                vinfo.append(helper.make_tensor_value_info(o, b.elem_types.get(o, TensorProto.FLOAT),
                                                           dims(b.shapes[o])))
    graph = helper.make_graph(b.nodes, graph_name, inputs, outs, b.initializers, doc_string=doc,
                              value_info=vinfo)
    opsets = [helper.make_opsetid("", style.opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in style.domain_opsets.items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="prunequant")
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", style.opset)])
    if value_info:  # tensors inside composite ops (e.g. SiLU's sigmoid): shapes by ONNX inference
        model = onnx.shape_inference.infer_shapes(model)
    return model, onnx


StyleFactory = Callable[[], QuantStyle]
