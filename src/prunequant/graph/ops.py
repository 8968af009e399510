"""What prunequant knows about each op: its kind, how channels flow through it, whether it maps 0 to 0.

The tables and predicates here are the one place discovery (:mod:`.discover`), physical removal
(:mod:`.shrink`), :func:`prunequant.measure` and the ONNX export read op knowledge from.
"""

from __future__ import annotations

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

#: Activations that map 0 to 0 (a masked channel stays zero through them).
ZERO_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU,
    nn.Tanh, nn.Mish, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
)
ZERO_ACT_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.elu, F.celu, F.selu,
    torch.tanh, F.tanh, F.mish, F.hardtanh, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink,
}
ZERO_ACT_METHODS = {"relu", "tanh"}
ACT_MODULES = ZERO_ACT_MODULES + (nn.PReLU, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
ACT_FUNCTIONS = ZERO_ACT_FUNCTIONS | {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
ACT_METHODS = ZERO_ACT_METHODS | {"sigmoid"}

PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Flatten,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)
PASS_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, torch.flatten,
}
PASS_METHODS = {"flatten", "contiguous", "clone"}
SPLIT_FUNCTIONS = {torch.split, torch.chunk}
SPLIT_METHODS = {"split", "chunk"}
VIEW_METHODS = {"view", "reshape"}


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


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
    if n.op == "call_module":
        return isinstance(module_of(gm, n), ACT_MODULES)
    if n.op == "call_function":
        return n.target in ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in ACT_METHODS
    return False


def is_zero_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        m = module_of(gm, n)
        if isinstance(m, nn.PReLU):
            return m.num_parameters == 1
        if isinstance(m, nn.Hardtanh):
            return m.min_val <= 0 <= m.max_val
        return isinstance(m, ZERO_ACT_MODULES)
    if n.op == "call_function":
        return n.target in ZERO_ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in ZERO_ACT_METHODS
    return False


def is_stochastic_depth(f: Any) -> bool:
    """torchvision's ``ops.stochastic_depth`` (drops whole samples and rescales the rest: zero stays zero)."""
    return getattr(f, "__name__", None) == "stochastic_depth" and \
        str(getattr(f, "__module__", "")).startswith("torchvision")


def is_pass(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(module_of(gm, n), PASS_MODULES)
    if n.op == "call_function":
        return n.target in PASS_FUNCTIONS or is_stochastic_depth(n.target)
    if n.op == "call_method":
        return n.target in PASS_METHODS
    return False


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


def arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)

