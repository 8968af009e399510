"""Translate an instrumented ``torch.fx`` GraphModule into an ONNX graph, node by node.

The graph is built with the ``onnx.helper`` API (no ``torch.onnx`` tracing): every fx node maps to a
few ONNX nodes, with the quantizers emitted by a *quantization style* (:class:`QDQStyle` or
:class:`QONNXStyle`, see :mod:`.onnx_export`). Shapes come from running the model once on the example
input (``torch.fx.passes.shape_prop``). Quantizers and masks are handled here; every other op is
emitted by its entry in the op registry (:data:`prunequant.graph.ops.RULES`, ``OpRule.emit``), the
same entries the channel walker reads. An op with no entry (or no emitter) raises
:class:`~._checks.ExportError` naming the node, the op and the module path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..graph.instrument import raw_weight, weight_quantizer
from ..graph.ops import CONV_TYPES, CONVT_TYPES, NORM_TYPES, RULES, rule_of
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
        where = n.meta.get("pq_module") if n.meta else None
        known = ", ".join(r.name for r in RULES if r.emit is not None)
        return ExportError(
            f"cannot export node {n.name!r} ({n.op} {what}"
            + (f" in module '{where}'" if where and n.op != "call_module" else "")
            + "): not supported by prunequant's ONNX translator. Supported ops "
            f"(prunequant.graph.ops.RULES): {known} (docs/export.md). Rewrite that part of forward() "
            "with these ops or open an issue"
        )

    def module(self, n: fx.Node) -> nn.Module:
        return self.modules[str(n.target)]

    def hint(self, n: fx.Node) -> str:
        """Name hint of the ONNX nodes made for ``n``: the module path, else the fx node name."""
        return str(n.target) if n.op == "call_module" else n.name

    def batch_shape(self, n: fx.Node) -> tuple[Any, ...]:
        """``x.shape`` as python values, with the batch dimension symbolic."""
        return (BATCH,) + self.shape(n)[1:]

    def op(self, op: str, n: fx.Node, inputs: list[str], **attrs: Any) -> str:
        """One ONNX node computing ``n`` (output shape recorded)."""
        return self.set(self.b.node(op, inputs, self.hint(n), **attrs), n)

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
            elif n.op in ("call_module", "call_function", "call_method"):
                self.env[n] = self.call(n)
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

    def call(self, n: fx.Node) -> Any:
        """One call node: quantizers and masks here, every other op through its registry entry."""
        first = self.val(n.args[0]) if n.args else None
        x = first if isinstance(first, str) else None
        if n.op == "call_module":
            m = self.module(n)
            if isinstance(m, ActQuantizer):
                if not bool(m.enabled):
                    return x
                return self.style.act(self.b, x, m, str(n.target), self.shape(n))
            if isinstance(m, ChannelMask):
                return self.mask(n, x, m)
        rule = rule_of(self.gm, n)
        if rule is None or rule.emit is None:
            if n.op == "call_module":
                raise self.fail(n, f"module {n.target} of type {type(self.module(n)).__name__}")
            if n.op == "call_method":
                raise self.fail(n, f"method .{n.target}()")
            raise self.fail(n, getattr(n.target, "__name__", str(n.target)))
        return rule.emit(self, n, x)

    # ------------------------------------------------------------------ emitters the registry calls
    def mask(self, n: fx.Node, x: str, m: ChannelMask) -> str:
        mask = m.mask.detach().to(torch.float32).cpu().numpy()
        if bool(np.all(mask == 1.0)):
            return x
        shp = [1] * len(self.shape(n))
        shp[getattr(m, "dim", 1)] = -1
        return self.op("Mul", n, [x, self.b.init(f"{n.target}.mask", mask.reshape(shp))])

    def conv(self, n: fx.Node, x: str, m: nn.Module) -> str:
        b, name = self.b, str(n.target)
        nd = m.weight.dim() - 2
        bias = None
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
        op = "ConvTranspose" if isinstance(m, CONVT_TYPES) else "Conv"
        if op == "ConvTranspose":
            if getattr(m, "padding_mode", "zeros") != "zeros":
                raise ExportError(f"{name}: padding_mode {m.padding_mode!r} not supported")
            p = _tuple(m.padding, nd)
            attrs.update(pads=p + p, output_padding=_tuple(m.output_padding, nd))
        else:
            attrs["pads"] = _conv_pads(m, nd, name)
        if bias and self.style.bias_as_add:
            return self.op("Add", n, [b.node(op, ins, name, **attrs), bias])
        return self.op(op, n, ins, **attrs)

    def linear(self, n: fx.Node, x: str, m: nn.Module) -> str:
        """Gemm for 2-d inputs; MatMul over the last dim otherwise (e.g. channels-last ConvNeXt MLPs)."""
        b, name = self.b, str(n.target)
        w = _weight(b, self.style, m, name)
        bias = _bias(b, m, name)
        if len(self.shape(n.args[0])) == 2:
            if bias and self.style.bias_as_add:
                return self.op("Add", n, [b.node("Gemm", [x, w], name, transB=1), bias])
            return self.op("Gemm", n, [x, w] + ([bias] if bias else []), transB=1)
        wt = b.node("Transpose", [w], f"{name}.weight_t", perm=[1, 0])
        y = b.node("MatMul", [x, wt], name)
        return self.op("Add", n, [y, bias]) if bias else self.set(y, n)

    def batch_norm(self, n: fx.Node, x: str, m: nn.Module) -> str:
        if n in self.folded_bn:
            return x
        if m.running_mean is None:
            raise ExportError(f"{n.target}: BatchNorm without running statistics cannot be exported")
        return self.running_norm(n, x, m)

    def layer_norm(self, n: fx.Node, x: str, shape: list[int], weight: Any, bias: Any, eps: float,
                   keep: bool = True) -> str:
        """LayerNorm over the trailing ``len(shape)`` dims: LayerNormalization from opset 17, else
        ReduceMean / Sub / Mul / Sqrt / Div (``keep=False``: an intermediate result, shape not recorded)."""
        b, h = self.b, self.hint(n)
        rank = len(self.shape(n))
        axes = list(range(rank - len(shape), rank))

        def arr(t: Any, fill: float) -> np.ndarray:
            if t is None:
                return np.full(shape, fill, np.float32)
            return t.detach().to(torch.float32).cpu().numpy().reshape(shape)

        w, bb = arr(weight, 1.0), (None if bias is None else arr(bias, 0.0))
        if b.opset >= 17:
            ins = [x, b.init(f"{h}.weight", w)] + ([b.init(f"{h}.bias", bb)] if bb is not None else [])
            y = b.node("LayerNormalization", ins, h, axis=axes[0], epsilon=eps)
        else:
            mean = self.reduce_node("ReduceMean", x, axes, True, h)
            d = b.node("Sub", [x, mean], h)
            var = self.reduce_node("ReduceMean", b.node("Mul", [d, d], h), axes, True, h)
            y = b.node("Div", [d, b.node("Sqrt", [b.node("Add", [var, b.const(eps)], h)], h)], h)
            if weight is not None:
                y = b.node("Mul", [y, b.init(f"{h}.weight", w)], h)
            if bb is not None:
                y = b.node("Add", [y, b.init(f"{h}.bias", bb)], h)
        return self.set(y, n) if keep else y

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

    def reduce_node(self, op: str, x: str, axes: list[int], keepdims: bool, hint: str) -> str:
        """ReduceMean / ReduceMax (axes an input from opset 18) or ReduceSum (from opset 13)."""
        if self.b.opset >= 18 or op == "ReduceSum":
            return self.b.node(op, [x, self.b.const(axes, np.int64)], hint, keepdims=int(keepdims))
        return self.b.node(op, [x], hint, axes=axes, keepdims=int(keepdims))

    def reduce(self, n: fx.Node, x: str, op: str, dim: Any, keepdim: bool) -> str:
        rank = len(self.shape(n.args[0]))
        axes = list(range(rank)) if dim is None else [int(d) % rank for d in _tuple(dim, 1)]
        return self.set(self.reduce_node(op, x, axes, bool(keepdim), self.hint(n)), n)


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
