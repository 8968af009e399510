"""What prunequant knows about each op: how channels flow through it, whether it maps 0 to 0, how it
becomes ONNX.

One registry, :data:`RULES`, holds one :class:`OpRule` per op. Discovery (:mod:`.discover`),
physical removal (:mod:`.shrink`), :func:`prunequant.measure` and the ONNX export
(:mod:`prunequant.export._fx2onnx`) all read op knowledge from it, through :func:`rule_of` and the
predicates below (``is_act``, ``is_zero_act``, ``is_pass``, ``is_layer``, ...), so that an op the
channel walker lets channels through is also one the exporter can emit (``tests/graph/test_ops.py``
checks both, statically and by round trips through ONNX Runtime).

Adding an op: append an ``OpRule`` to :data:`RULES` with the modules / functions / methods that
spell it, its ``flow`` (see :data:`FLOWS`), ``zero`` (activations only) and an ``emit`` function
``emit(tr, node, x) -> output name(s)``, where ``tr`` is the export's ``Translator`` (its Builder is
``tr.b``), ``node`` the fx node and ``x`` the ONNX name of the node's first input (``None`` when the
first argument is not a tensor). Emitters only use standard ONNX ops available at opset 13 (QONNX)
and 21 (QDQ); ``tr.b.opset`` tells which one is being written.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = CONV_TYPES + CONVT_TYPES + (nn.Linear,)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: Per-channel modules allowed between a producer layer and its activation.
SIDE_NORM_TYPES = NORM_TYPES + INSTANCE_NORM_TYPES + (nn.GroupNorm,)

#: How channels flow through an op (``OpRule.flow``):
#:
#: * ``layer``: conv / transposed conv / linear (a consumer and a producer of channels);
#: * ``norm``: per-channel normalization (BatchNorm, InstanceNorm, GroupNorm);
#: * ``act``: elementwise activation (``OpRule.zero`` says whether it maps 0 to 0);
#: * ``pass``: keeps every channel separate and maps zeros to zeros (pooling, dropout, zero /
#:   reflection / replication padding, upsampling, identity);
#: * ``flatten`` / ``view``: channels become blocks of features; ``cat``, ``split``, ``slice``:
#:   channels move to an offset / a piece; ``shuffle`` / ``unshuffle``: PixelShuffle blocks;
#:   ``mul`` / ``div``: by a scalar or a per-channel gate; ``reduce``: mean / sum / max over dims;
#: * refused (:data:`REFUSED_FLOWS`): ``add`` (residuals couple channels), ``permute`` (channels
#:   leave dim 1), ``layer_norm`` / ``softmax`` (mix channels), ``pad`` (a constant that need not be
#:   zero), ``shape`` (reads sizes only), ``other``.
FLOWS = ("layer", "norm", "act", "pass", "flatten", "view", "cat", "split", "slice", "shuffle",
         "unshuffle", "mul", "div", "reduce", "add", "permute", "layer_norm", "softmax", "pad", "shape",
         "other")
#: Flows the channel walker never follows a site's channels through (the site is skipped as coupled).
REFUSED_FLOWS = frozenset({"add", "permute", "layer_norm", "softmax", "pad", "shape", "other"})

Emit = Callable[[Any, fx.Node, Any], Any]


@dataclass(frozen=True)
class OpRule:
    """One op: the ways it is spelled in a traced graph and what prunequant does with it.

    ``modules``: module classes (matched on the class or a base class; a string is a class's
    ``"module.QualName"``, for classes of packages that may not be imported, e.g. torchvision);
    ``functions``: call_function targets; ``methods``: tensor method names; ``match``: a predicate on
    a call_function target for functions not importable here. ``flow``: one of :data:`FLOWS`.
    ``zero``: True if the op maps 0 to 0, or a callable on the module (``Hardtanh``: its range must
    include 0; ``PReLU``: one shared slope). ``emit``: the ONNX emitter (module docs)."""

    name: str
    modules: tuple[type | str, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    flow: str = "other"
    zero: bool | Callable[[nn.Module], bool] = False
    emit: Emit | None = None
    match: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.flow not in FLOWS:
            raise ValueError(f"op rule {self.name!r}: unknown flow {self.flow!r}")


# ------------------------------------------------------------------------------ helpers for emitters
def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def param(tr: Any, n: fx.Node, name: str, i: int, default: Any = None) -> Any:
    """An op parameter: the module's attribute ``name`` (call_module), else argument ``i`` / keyword
    ``name`` of the call (its translated value)."""
    if n.op == "call_module":
        return getattr(tr.module(n), name, default)
    return tr.val(arg(n, i, name, default))


def _op(onnx_op: str, **attrs: Any) -> Emit:
    """Emitter of a one-input ONNX op with fixed attributes."""
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        return tr.op(onnx_op, n, [x], **attrs)
    emit.__name__ = f"emit_{onnx_op.lower()}"
    return emit


def _clip(lo: float, hi: float) -> Emit:
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        return tr.op("Clip", n, [x, tr.b.const(lo), tr.b.const(hi)])
    return emit


def _hardtanh(tr: Any, n: fx.Node, x: str) -> str:
    lo, hi = param(tr, n, "min_val", 1, -1.0), param(tr, n, "max_val", 2, 1.0)
    return tr.op("Clip", n, [x, tr.b.const(float(lo)), tr.b.const(float(hi))])


def _leaky_relu(tr: Any, n: fx.Node, x: str) -> str:
    return tr.op("LeakyRelu", n, [x], alpha=float(param(tr, n, "negative_slope", 1, 0.01)))


def _prelu(tr: Any, n: fx.Node, x: str) -> str:
    m = tr.module(n)
    slope = m.weight.detach().to(torch.float32).cpu().numpy()
    rank = len(tr.shape(n))
    if slope.size > 1:
        slope = slope.reshape([-1] + [1] * max(rank - 2, 0))
    return tr.op("PRelu", n, [x, tr.b.init(f"{tr.hint(n)}.weight", slope)])


def _elu(onnx_op: str) -> Emit:
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        return tr.op(onnx_op, n, [x], alpha=float(param(tr, n, "alpha", 1, 1.0)))
    return emit


def _celu(tr: Any, n: fx.Node, x: str) -> str:
    """``max(0, x) + min(0, a * (exp(x / a) - 1))`` (ONNX Celu is a function op some runtimes lack)."""
    b, h = tr.b, tr.hint(n)
    a = float(param(tr, n, "alpha", 1, 1.0))
    e = b.node("Exp", [b.node("Div", [x, b.const(a)], h)], h)
    em1 = b.node("Mul", [b.node("Sub", [e, b.const(1.0)], h), b.const(a)], h)
    neg = b.node("Min", [em1, b.const(0.0)], h)
    return tr.op("Add", n, [b.node("Relu", [x], h), neg])


def _times(inner: Callable[[Any, str, str], str]) -> Emit:
    """``x * inner(x)`` (SiLU, Hardswish, Mish)."""
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        return tr.op("Mul", n, [x, inner(tr.b, x, tr.hint(n))])
    return emit


def _gelu(tr: Any, n: fx.Node, x: str) -> str:
    b, h = tr.b, tr.hint(n)
    if param(tr, n, "approximate", 1, "none") == "tanh":
        x3 = b.node("Mul", [b.node("Mul", [x, x], h), x], h)
        inner = b.node("Add", [x, b.node("Mul", [x3, b.const(0.044715)], h)], h)
        t = b.node("Tanh", [b.node("Mul", [inner, b.const(math.sqrt(2.0 / math.pi))], h)], h)
    else:
        t = b.node("Erf", [b.node("Mul", [x, b.const(1.0 / math.sqrt(2.0))], h)], h)
    one = b.node("Add", [t, b.const(1.0)], h)
    return tr.op("Mul", n, [b.node("Mul", [x, one], h), b.const(0.5)])


def _softplus(tr: Any, n: fx.Node, x: str) -> str:
    """``log(1 + exp(beta x)) / beta``, and ``x`` where ``beta x > threshold`` (as PyTorch)."""
    beta = float(param(tr, n, "beta", 1, 1.0))
    thr = float(param(tr, n, "threshold", 2, 20.0))
    if beta == 1.0 and thr >= 20.0:  # float32 log1p(exp(x)) == x above 20
        return tr.op("Softplus", n, [x])
    b, h = tr.b, tr.hint(n)
    bx = b.node("Mul", [x, b.const(beta)], h)
    sp = b.node("Div", [b.node("Softplus", [bx], h), b.const(beta)], h)
    return tr.op("Where", n, [b.node("Greater", [bx, b.const(thr)], h), x, sp])


def _tanhshrink(tr: Any, n: fx.Node, x: str) -> str:
    return tr.op("Sub", n, [x, tr.b.node("Tanh", [x], tr.hint(n))])


def _shrink(soft: bool) -> Emit:
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        lambd = float(param(tr, n, "lambd", 1, 0.5))
        return tr.op("Shrink", n, [x], lambd=lambd, bias=lambd if soft else 0.0)
    return emit


def _softmax(tr: Any, n: fx.Node, x: str) -> str:
    dim = param(tr, n, "dim", 1, None)
    return tr.op("Softmax", n, [x], axis=int(dim if dim is not None else -1))


def _max_pool(tr: Any, n: fx.Node, x: str) -> str:
    if param(tr, n, "return_indices", 6, False):
        raise tr.fail(n, "max pooling with return_indices=True")
    return tr.pool(n, x, "max", param(tr, n, "kernel_size", 1), param(tr, n, "stride", 2),
                   param(tr, n, "padding", 3, 0), param(tr, n, "ceil_mode", 5, False),
                   param(tr, n, "dilation", 4, 1))


def _avg_pool(tr: Any, n: fx.Node, x: str) -> str:
    if param(tr, n, "divisor_override", 6, None):
        raise tr.fail(n, "average pooling with divisor_override")
    return tr.pool(n, x, "avg", param(tr, n, "kernel_size", 1), param(tr, n, "stride", 2),
                   param(tr, n, "padding", 3, 0), param(tr, n, "ceil_mode", 4, False), 1,
                   param(tr, n, "count_include_pad", 5, True))


def _adaptive(kind: str) -> Emit:
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        if param(tr, n, "return_indices", 2, False):
            raise tr.fail(n, "adaptive max pooling with return_indices=True")
        return tr.adaptive(n, x, kind)
    return emit


def _lp_pool(tr: Any, n: fx.Node, x: str) -> str:
    """PyTorch's definition: ``(avg_pool(x ** p) * prod(k)) ** (1 / p)`` (max of ``|x|`` for p = inf)."""
    p = float(param(tr, n, "norm_type", 1))
    k, s = param(tr, n, "kernel_size", 2), param(tr, n, "stride", 3)
    ceil = param(tr, n, "ceil_mode", 4, False)
    b, h = tr.b, tr.hint(n)
    nd = len(tr.shape(n)) - 2
    if math.isinf(p):
        y = tr.pool(n, b.node("Abs", [x], h) if p > 0 else b.node("Neg", [b.node("Abs", [x], h)], h),
                    "max", k, s, 0, ceil, 1)
        return y if p > 0 else tr.op("Neg", n, [y])
    y = tr.pool(n, b.node("Pow", [x, b.const(p)], h), "avg", k, s, 0, ceil, 1, True)
    kk = k if isinstance(k, (tuple, list)) else [k] * nd
    y = b.node("Mul", [y, b.const(float(math.prod(int(v) for v in kk)))], h)
    return tr.op("Pow", n, [y, b.const(1.0 / p)])


def _dropout(tr: Any, n: fx.Node, x: str) -> str:
    """Identity in eval mode; a functional dropout must get a live or False ``training`` flag."""
    if n.op != "call_function":
        return x
    f = n.target
    sd = is_stochastic_depth(f)
    default = f not in (F.alpha_dropout, F.feature_alpha_dropout)  # those default to training=False
    training = tr.val(arg(n, 3 if sd else 2, "training", default))
    p = tr.val(arg(n, 1, "p", 0.5))
    if training is not False and p != 0:
        raise tr.fail(n, f"{f.__name__} with training={training!r}: active in eval mode")
    return x


def _identity(tr: Any, n: fx.Node, x: str) -> str:
    return x


def _upsample(tr: Any, n: fx.Node, x: str) -> str:
    if n.op == "call_module":
        m = tr.module(n)
        return tr.resize(n, x, m.mode, m.align_corners)
    if n.target is F.upsample_nearest:
        return tr.resize(n, x, "nearest", None)
    if n.target is F.upsample_bilinear:
        return tr.resize(n, x, "bilinear", True)
    return tr.resize(n, x, tr.val(arg(n, 3, "mode", "nearest")), tr.val(arg(n, 4, "align_corners", None)))


def _pad(mode: str | None) -> Emit:
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        if n.op == "call_module":
            m = tr.module(n)
            return tr.pad(n, x, m.padding, mode or "constant", float(getattr(m, "value", 0.0)))
        how = tr.val(arg(n, 2, "mode", "constant"))
        if how not in ("constant", "reflect", "replicate"):
            raise tr.fail(n, f"pad mode {how!r}")
        return tr.pad(n, x, tr.val(arg(n, 1, "pad")), how, float(tr.val(arg(n, 3, "value", None)) or 0.0))
    return emit


def _flatten(tr: Any, n: fx.Node, x: str) -> str:
    return tr.flatten(n, x, param(tr, n, "start_dim", 1, 0), param(tr, n, "end_dim", 2, -1))


def _reshape(tr: Any, n: fx.Node, x: str) -> str:
    sizes = [tr.val(a) for a in n.args[1:]] or [tr.val(n.kwargs["shape"])]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return tr.reshape(n, x, sizes)


def _cat(tr: Any, n: fx.Node, x: Any) -> str:
    tensors = [tr.tensor(t) for t in arg(n, 0, "tensors")]
    dim = int(tr.val(arg(n, 1, "dim", 0)))
    return tr.op("Concat", n, tensors, axis=dim % len(tr.shape(n)))


def _split(tr: Any, n: fx.Node, x: str) -> list[str]:
    return tr.split(n, x, tr.val(arg(n, 2, "dim", 0)))


def _getitem(tr: Any, n: fx.Node, x: Any) -> Any:
    obj, idx = tr.val(n.args[0]), tr.val(n.args[1])
    if isinstance(obj, (tuple, list)):
        return obj[idx]
    if isinstance(obj, str):
        return tr.index(n, obj, idx)
    raise tr.fail(n, f"indexing {type(obj).__name__}")


def _pixel_shuffle(tr: Any, n: fx.Node, x: str) -> str:
    return tr.op("DepthToSpace", n, [x], blocksize=int(param(tr, n, "upscale_factor", 1)), mode="CRD")


def _pixel_unshuffle(tr: Any, n: fx.Node, x: str) -> str:
    return tr.pixel_unshuffle(n, x, int(param(tr, n, "downscale_factor", 1)))


_PYTHON_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


def _binary(onnx_op: str) -> Emit:
    def emit(tr: Any, n: fx.Node, x: Any) -> Any:
        a, c = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs["other"]
        va, vc = tr.val(a), tr.val(c)
        if isinstance(va, (int, float)) and isinstance(vc, (int, float)):
            return _PYTHON_BINARY[onnx_op](va, vc)  # python arithmetic on sizes / constants
        if n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("rounding_mode") is not None:
            raise tr.fail(n, f"{onnx_op} with alpha / rounding_mode")
        return tr.op(onnx_op, n, [tr.tensor(a), tr.tensor(c)])
    return emit


def _python(tr: Any, n: fx.Node, x: Any) -> Any:
    """``//`` and ``%`` on python numbers (sizes)."""
    vals = [tr.val(a) for a in n.args]
    if any(isinstance(v, str) for v in vals):
        raise tr.fail(n, f"{n.target.__name__} on a tensor")
    return n.target(*vals)


def _reduce(onnx_op: str) -> Emit:
    def emit(tr: Any, n: fx.Node, x: str) -> str:
        dim = tr.val(arg(n, 1, "dim", None))
        return tr.reduce(n, x, onnx_op, None if dim in (None, (), []) else dim,
                         bool(tr.val(arg(n, 2, "keepdim", False))))
    return emit


def _permute(tr: Any, n: fx.Node, x: str) -> str:
    if n.op == "call_module":
        dims = tr.module(n).dims
    elif n.op == "call_function":
        dims = tr.val(arg(n, 1, "dims"))
    else:
        dims = [tr.val(a) for a in n.args[1:]] or tr.val(n.kwargs["dims"])
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
    rank = len(tr.shape(n))
    return tr.op("Transpose", n, [x], perm=[int(d) % rank for d in dims])


def _transpose(tr: Any, n: fx.Node, x: str) -> str:
    rank = len(tr.shape(n))
    perm = list(range(rank))
    d0, d1 = int(tr.val(arg(n, 1, "dim0"))) % rank, int(tr.val(arg(n, 2, "dim1"))) % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tr.op("Transpose", n, [x], perm=perm)


def _layer_norm(tr: Any, n: fx.Node, x: str) -> str:
    if n.op == "call_module":
        m = tr.module(n)
        shape, w, bias, eps = m.normalized_shape, m.weight, m.bias, m.eps
    else:
        shape = tr.val(arg(n, 1, "normalized_shape"))
        w, bias = tr.val(arg(n, 2, "weight")), tr.val(arg(n, 3, "bias"))
        eps = tr.val(arg(n, 4, "eps", 1e-5))
    shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
    return tr.layer_norm(n, x, shape, w, bias, float(eps))


def _layer_norm2d(tr: Any, n: fx.Node, x: str) -> str:
    """torchvision's ``LayerNorm2d``: LayerNorm over the channels of an NCHW tensor."""
    m, b, h = tr.module(n), tr.b, tr.hint(n)
    rank = len(tr.shape(n))
    to_last = [0] + list(range(2, rank)) + [1]
    t = b.node("Transpose", [x], h, perm=to_last)
    y = tr.layer_norm(n, t, [m.normalized_shape[0]], m.weight, m.bias, float(m.eps), keep=False)
    return tr.op("Transpose", n, [y], perm=[0, rank - 1] + list(range(1, rank - 1)))


def _getattr(tr: Any, n: fx.Node, x: Any) -> Any:
    obj, attr = n.args[0], n.args[1]
    if attr == "shape" and isinstance(obj, fx.Node):
        return tr.batch_shape(obj)
    if attr == "ndim" and isinstance(obj, fx.Node):
        return len(tr.shape(obj))
    raise tr.fail(n, f"getattr {attr}")


def _size(tr: Any, n: fx.Node, x: Any) -> Any:
    shp = tr.batch_shape(n.args[0])
    idx = tr.val(arg(n, 1, "dim"))
    return shp if idx is None else shp[idx]


def _dim(tr: Any, n: fx.Node, x: Any) -> int:
    return len(tr.shape(n.args[0]))


def _layer(tr: Any, n: fx.Node, x: str) -> str:
    m = tr.module(n)
    return tr.linear(n, x, m) if isinstance(m, nn.Linear) else tr.conv(n, x, m)


def _batch_norm(tr: Any, n: fx.Node, x: str) -> str:
    return tr.batch_norm(n, x, tr.module(n))


def _instance_norm(tr: Any, n: fx.Node, x: str) -> str:
    return tr.instance_norm(n, x, tr.module(n))


def _group_norm(tr: Any, n: fx.Node, x: str) -> str:
    m = tr.module(n)
    return tr.group_norm(n, x, m.num_groups, m.weight, m.bias, m.eps)


def is_stochastic_depth(f: Any) -> bool:
    """torchvision's ``ops.stochastic_depth`` (drops whole samples and rescales the rest: zero stays zero)."""
    return getattr(f, "__name__", None) == "stochastic_depth" and \
        str(getattr(f, "__module__", "")).startswith("torchvision")


def _hardtanh_zero(m: nn.Module) -> bool:
    return m.min_val <= 0 <= m.max_val


def _prelu_zero(m: nn.Module) -> bool:
    return m.num_parameters == 1  # per-channel slopes: a side module of the producer chain instead


def _opt(*names: str, where: Any = nn) -> tuple:
    """The attributes of ``where`` that this torch version has."""
    return tuple(getattr(where, k) for k in names if hasattr(where, k))


_SIGMOID = lambda b, x, h: b.node("Sigmoid", [x], f"{h}_sigmoid")  # noqa: E731
_HSIG = lambda b, x, h: b.node("HardSigmoid", [x], f"{h}_hsig", alpha=1.0 / 6.0, beta=0.5)  # noqa: E731
_MISH = lambda b, x, h: b.node("Tanh", [b.node("Softplus", [x], f"{h}_softplus")], f"{h}_tanh")  # noqa: E731

#: The registry: one entry per op (module docs).
RULES: tuple[OpRule, ...] = (
    # layers and per-channel norms
    OpRule("conv", CONV_TYPES, flow="layer", emit=_layer),
    OpRule("conv_transpose", CONVT_TYPES, flow="layer", emit=_layer),
    OpRule("linear", (nn.Linear,), flow="layer", emit=_layer),
    OpRule("batch_norm", NORM_TYPES, flow="norm", emit=_batch_norm),
    OpRule("instance_norm", INSTANCE_NORM_TYPES, flow="norm", emit=_instance_norm),
    OpRule("group_norm", (nn.GroupNorm,), flow="norm", emit=_group_norm),
    OpRule("layer_norm", (nn.LayerNorm,), (F.layer_norm,), flow="layer_norm", emit=_layer_norm),
    OpRule("layer_norm2d", ("torchvision.models.convnext.LayerNorm2d",), flow="layer_norm",
           emit=_layer_norm2d),
    # activations that map 0 to 0
    OpRule("relu", (nn.ReLU,), (F.relu, torch.relu), ("relu",), flow="act", zero=True, emit=_op("Relu")),
    OpRule("relu6", (nn.ReLU6,), (F.relu6,), flow="act", zero=True, emit=_clip(0.0, 6.0)),
    OpRule("hardtanh", (nn.Hardtanh,), (F.hardtanh,), flow="act", zero=_hardtanh_zero, emit=_hardtanh),
    OpRule("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu,), flow="act", zero=True, emit=_leaky_relu),
    OpRule("elu", (nn.ELU,), (F.elu,), flow="act", zero=True, emit=_elu("Elu")),
    OpRule("celu", (nn.CELU,), (F.celu,), flow="act", zero=True, emit=_celu),
    OpRule("selu", (nn.SELU,), (F.selu,), flow="act", zero=True, emit=_op("Selu")),
    OpRule("silu", (nn.SiLU,), (F.silu,), flow="act", zero=True, emit=_times(_SIGMOID)),
    OpRule("gelu", (nn.GELU,), (F.gelu,), flow="act", zero=True, emit=_gelu),
    OpRule("hardswish", (nn.Hardswish,), (F.hardswish,), flow="act", zero=True, emit=_times(_HSIG)),
    OpRule("mish", (nn.Mish,), (F.mish,), flow="act", zero=True, emit=_times(_MISH)),
    OpRule("tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",), flow="act", zero=True, emit=_op("Tanh")),
    OpRule("softsign", (nn.Softsign,), (F.softsign,), flow="act", zero=True, emit=_op("Softsign")),
    OpRule("tanhshrink", (nn.Tanhshrink,), (F.tanhshrink,), flow="act", zero=True, emit=_tanhshrink),
    OpRule("hardshrink", (nn.Hardshrink,), (F.hardshrink,), flow="act", zero=True, emit=_shrink(False)),
    OpRule("softshrink", (nn.Softshrink,), (F.softshrink,), flow="act", zero=True, emit=_shrink(True)),
    OpRule("prelu", (nn.PReLU,), flow="act", zero=_prelu_zero, emit=_prelu),
    # activations that do not map 0 to 0 (a site ends at them; squeeze-excitation gates)
    OpRule("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",), flow="act",
           emit=_op("Sigmoid")),
    OpRule("hardsigmoid", (nn.Hardsigmoid,), (F.hardsigmoid,), flow="act",
           emit=_op("HardSigmoid", alpha=1.0 / 6.0, beta=0.5)),
    OpRule("softplus", (nn.Softplus,), (F.softplus,), flow="act", emit=_softplus),
    OpRule("softmax", (nn.Softmax,), (F.softmax, torch.softmax), ("softmax",), flow="softmax", emit=_softmax),
    # ops that keep channels apart and zeros zero
    OpRule("max_pool", (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), (F.max_pool1d, F.max_pool2d, F.max_pool3d),
           flow="pass", emit=_max_pool),
    OpRule("avg_pool", (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
           flow="pass", emit=_avg_pool),
    OpRule("adaptive_avg_pool", (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
           (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d), flow="pass",
           emit=_adaptive("avg")),
    OpRule("adaptive_max_pool", (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
           (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d), flow="pass",
           emit=_adaptive("max")),
    OpRule("lp_pool", _opt("LPPool1d", "LPPool2d", "LPPool3d"), _opt("lp_pool1d", "lp_pool2d", "lp_pool3d",
                                                                      where=F),
           flow="pass", emit=_lp_pool),
    OpRule("dropout", (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
           (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d), flow="pass", emit=_dropout),
    OpRule("stochastic_depth", ("torchvision.ops.stochastic_depth.StochasticDepth",), flow="pass",
           emit=_dropout, match=is_stochastic_depth),
    OpRule("identity", (nn.Identity,), methods=("contiguous", "clone"), flow="pass", emit=_identity),
    OpRule("upsample", (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
           (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), flow="pass", emit=_upsample),
    OpRule("zero_pad", _opt("ZeroPad1d", "ZeroPad2d", "ZeroPad3d"), flow="pass", emit=_pad("constant")),
    OpRule("reflection_pad", (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d), flow="pass",
           emit=_pad("reflect")),
    OpRule("replication_pad", (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d), flow="pass",
           emit=_pad("replicate")),
    # reshaping and routing
    OpRule("flatten", (nn.Flatten,), (torch.flatten,), ("flatten",), flow="flatten", emit=_flatten),
    OpRule("reshape", functions=(torch.reshape,), methods=("view", "reshape"), flow="view", emit=_reshape),
    OpRule("cat", functions=(torch.cat, torch.concat), flow="cat", emit=_cat),
    OpRule("split", functions=(torch.split, torch.chunk), methods=("split", "chunk"), flow="split",
           emit=_split),
    OpRule("getitem", functions=(operator.getitem,), flow="slice", emit=_getitem),
    OpRule("pixel_shuffle", (nn.PixelShuffle,), (F.pixel_shuffle,), flow="shuffle", emit=_pixel_shuffle),
    OpRule("pixel_unshuffle", (nn.PixelUnshuffle,), (F.pixel_unshuffle,), flow="unshuffle",
           emit=_pixel_unshuffle),
    OpRule("mul", functions=(operator.mul, torch.mul, operator.imul), methods=("mul",), flow="mul",
           emit=_binary("Mul")),
    OpRule("div", functions=(operator.truediv, torch.div), methods=("div",), flow="div", emit=_binary("Div")),
    OpRule("mean", functions=(torch.mean,), methods=("mean",), flow="reduce", emit=_reduce("ReduceMean")),
    OpRule("sum", functions=(torch.sum,), methods=("sum",), flow="reduce", emit=_reduce("ReduceSum")),
    OpRule("amax", functions=(torch.amax,), methods=("amax",), flow="reduce", emit=_reduce("ReduceMax")),
    # ops the channel walker refuses (the export emits them)
    OpRule("add", functions=(operator.add, torch.add, operator.iadd), methods=("add",), flow="add",
           emit=_binary("Add")),
    OpRule("sub", functions=(operator.sub, torch.sub), methods=("sub",), flow="add",
           emit=_binary("Sub")),
    OpRule("permute", ("torchvision.ops.misc.Permute",), (torch.permute,), ("permute",), flow="permute",
           emit=_permute),
    OpRule("transpose", functions=(torch.transpose,), methods=("transpose",), flow="permute",
           emit=_transpose),
    OpRule("pad", (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), (F.pad,), flow="pad",
           emit=_pad(None)),
    OpRule("alpha_dropout", (nn.AlphaDropout, nn.FeatureAlphaDropout),
           (F.alpha_dropout, F.feature_alpha_dropout), flow="other", emit=_dropout),
    OpRule("cast", methods=("detach", "float"), flow="other", emit=_identity),
    OpRule("shape", functions=(getattr,), flow="shape", emit=_getattr),
    OpRule("size", methods=("size",), flow="shape", emit=_size),
    OpRule("dim", methods=("dim", "ndimension"), flow="shape", emit=_dim),
    OpRule("int_arith", functions=(operator.floordiv, operator.mod), flow="other", emit=_python),
)

_BY_MODULE: dict[type | str, OpRule] = {}
_BY_FUNCTION: dict[Any, OpRule] = {}
_BY_METHOD: dict[str, OpRule] = {}
_MATCHERS: list[OpRule] = []
for _r in RULES:
    for _k in _r.modules:
        assert _k not in _BY_MODULE, f"{_k} in two op rules"
        _BY_MODULE[_k] = _r
    for _f in _r.functions:
        assert _f not in _BY_FUNCTION, f"{_f} in two op rules"
        _BY_FUNCTION[_f] = _r
    for _m in _r.methods:
        assert _m not in _BY_METHOD, f"{_m} in two op rules"
        _BY_METHOD[_m] = _r
    if _r.match is not None:
        _MATCHERS.append(_r)


def rule_of_module(m: nn.Module) -> OpRule | None:
    """The rule of the most specific class of ``m`` (or of a base class) that has one."""
    for cls in type(m).__mro__:
        r = _BY_MODULE.get(cls) or _BY_MODULE.get(f"{cls.__module__}.{cls.__qualname__}")
        if r is not None:
            return r
    return None


def rule_of_target(op: str, target: Any) -> OpRule | None:
    """The rule of a call_function target or a call_method name."""
    if op == "call_method":
        return _BY_METHOD.get(target)
    if op == "call_function":
        try:
            r = _BY_FUNCTION.get(target)
        except TypeError:  # unhashable target
            r = None
        if r is None:
            r = next((m for m in _MATCHERS if m.match(target)), None)
        return r
    return None


def rule_of(gm: fx.GraphModule, node: fx.Node) -> OpRule | None:
    """The registry entry of an fx node (``None``: an op prunequant does not know, or no op)."""
    if node.op == "call_module":
        return rule_of_module(gm.get_submodule(node.target))
    return rule_of_target(node.op, node.target)


def flow_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    r = rule_of(gm, node)
    return None if r is None else r.flow


def zero_of(rule: OpRule, m: nn.Module | None) -> bool:
    """Whether the op maps 0 to 0 (``m``: its module, for a module-dependent answer)."""
    z = rule.zero
    if callable(z):
        return m is None or bool(z(m))  # function forms: see is_zero_act (F.hardtanh's arguments)
    return bool(z)


# ------------------------------------------------------------------- tables derived from the registry
def _modules(pred: Callable[[OpRule], bool]) -> tuple[type, ...]:
    return tuple(t for r in RULES if pred(r) for t in r.modules if isinstance(t, type))


def _functions(pred: Callable[[OpRule], bool]) -> set:
    return {f for r in RULES if pred(r) for f in r.functions}


def _methods(pred: Callable[[OpRule], bool]) -> set[str]:
    return {m for r in RULES if pred(r) for m in r.methods}


def _act(r: OpRule) -> bool:
    return r.flow == "act"


def _zero_act(r: OpRule) -> bool:
    return r.flow == "act" and r.zero is not False


def _pass(r: OpRule) -> bool:
    return r.flow in ("pass", "flatten")


#: Activations that map 0 to 0 (a masked channel stays zero through them; for classes with a
#: callable ``zero``, e.g. Hardtanh, PReLU, it depends on the module: use :func:`is_zero_act`).
ZERO_ACT_MODULES = _modules(_zero_act)
ZERO_ACT_FUNCTIONS = _functions(_zero_act)
ZERO_ACT_METHODS = _methods(_zero_act)
ACT_MODULES = _modules(_act)
ACT_FUNCTIONS = _functions(_act)
ACT_METHODS = _methods(_act)
PASS_MODULES = _modules(_pass)
PASS_FUNCTIONS = _functions(_pass)
PASS_METHODS = _methods(_pass)
SPLIT_FUNCTIONS = _functions(lambda r: r.flow == "split")
SPLIT_METHODS = _methods(lambda r: r.flow == "split")
VIEW_METHODS = _methods(lambda r: r.flow == "view")


# ------------------------------------------------------------------------------------ predicates
def describe(gm: fx.GraphModule, n: fx.Node) -> str:
    """Human-readable op name and module path of a node, for error messages."""
    if n.op == "call_module":
        return f"module '{n.target}' ({type(module_of(gm, n)).__name__})"
    if n.op == "output":
        return "the model output"
    what = getattr(n.target, "__name__", str(n.target))
    path = n.meta.get("pq_module") if n.meta else None
    where = f" in module '{path}'" if path else ""
    return f"{n.op} '{what}' (node {n.name}{where})"


def is_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    r = rule_of(gm, n)
    return r is not None and r.flow == "act"


def is_zero_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    r = rule_of(gm, n)
    if r is None or r.flow != "act":
        return False
    m = module_of(gm, n)
    if m is None and r.name == "hardtanh":  # F.hardtanh(x, min_val, max_val): its arguments decide
        lo, hi = arg(n, 1, "min_val", -1.0), arg(n, 2, "max_val", 1.0)
        return isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= 0 <= hi
    return zero_of(r, m)


def is_pass(gm: fx.GraphModule, n: fx.Node) -> bool:
    r = rule_of(gm, n)
    return r is not None and _pass(r)


def is_layer(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(module_of(gm, n), LAYER_TYPES)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def unpadded(m: nn.Module) -> bool:
    if isinstance(m.padding, str):
        return m.padding == "valid" or all(k == 1 for k in m.kernel_size)
    return all(p == 0 for p in m.padding)


def out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def calls_op(n: fx.Node, functions: set, methods: set) -> bool:
    if n.op == "call_function":
        return n.target in functions
    return n.op == "call_method" and n.target in methods


def node_args(n: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a))
    return out

