"""Find prunable channels in a traced model and instrument it with masks and quantizers.

A *site* is a prunable activation: the output of a producer chain
``conv/linear -> [BatchNorm | GroupNorm | InstanceNorm | PixelShuffle]* -> activation`` whose every use
leads, through ops that keep each channel separate and map zero to zero, into the input channels
of conv / linear layers. Those ops are pooling, dropout, stochastic depth, padding, upsampling,
zero-preserving activations, flatten / view-as-flatten (each channel becomes a block of features of the next
linear layer), ``torch.cat`` along channels (the site's channels sit at an offset of the consumer's
input), ``chunk`` / ``split`` / ``x[:, a:b]`` along channels (each piece keeps its share),
PixelShuffle / PixelUnshuffle (blocks of ``r**2`` channels move together), multiplication by a scalar
or by a per-channel gate computed from the same tensor (squeeze-excitation: the gate's last layer
loses the same output channels) and depthwise convs followed by an activation (*tied*: the same
mask is applied after them and the channel disappears from the depthwise conv as well).

Those are exactly the channels a physically smaller network can drop without changing the
function (see :func:`prunequant.graph.shrink`): a masked channel is zero at every consumer input,
so removing it from the producer, the norms, the consumers and the rewritten split sizes computes
the same outputs. Anything else (a residual add, a model output, an op not listed here) makes the
activation *coupled*; it is reported in ``Plan.skipped`` with the reason, naming the op and the
module path, and is not pruned. The network input and the final output are never sites.

Structural constraints travel with each site (:attr:`Site.block`, :attr:`Site.part`) so that the
masks computed for it keep the smaller network valid: blocks of channels that must go together
(GroupNorm groups, PixelShuffle blocks) and partitions that must lose the same number of channels
(groups of grouped convs, pieces of a split).

Instrumentation (:func:`instrument`) traces the model with ``torch.fx``, inserts a
:class:`~prunequant.prune.mask.ChannelMask` after every site's activation, a
:class:`~prunequant.quant.quantizers.ActQuantizer` on the input of every conv / linear layer and a
:class:`~prunequant.quant.quantizers.WeightQuantizer` as a parametrization of its ``weight``.
The returned ``GraphModule`` shares the parameters of the original model and follows
``.train()`` / ``.eval()`` like it: ops that take the mode (dropouts, stochastic depth, functional
norms) read the GraphModule's flags when it runs, not the mode it was traced in (see :func:`trace`).
"""

from __future__ import annotations

import fnmatch
import math
import operator
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..prune.mask import ChannelMask
from ..quant.quantizers import WEIGHT_CLIPS, ActQuantizer, WeightQuantizer, check_percentile
from ..utils import eval_mode

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

MASKS_ATTR = "pq_masks"
AQ_ATTR = "pq_act_quant"


class GraphError(ValueError):
    """A model that cannot be traced, instrumented or shrunk; the message names the op and module."""


@dataclass
class Tap:
    """Where a site's channels ``[lo, hi)`` sit along dim 1 of a tensor (a consumer's input).

    Blocks of ``den`` consecutive site channels occupy ``num`` consecutive positions starting at
    ``offset`` (1/1 for plain channels, ``H*W``/1 after a flatten, 1/``r**2`` after a PixelShuffle).
    """

    site: str
    offset: int
    lo: int
    hi: int
    num: int = 1
    den: int = 1

    @property
    def width(self) -> int:
        """Number of positions the segment covers."""
        return (self.hi - self.lo) // self.den * self.num


@dataclass
class Rewrite:
    """A graph node whose arguments depend on channel counts (split sizes, slice bounds, views)."""

    kind: str  # "split", "slice" or "flatten"
    width: int = 0  # channels of its input along dim 1
    taps: list[Tap] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # split: piece sizes; slice: [start, stop]


@dataclass
class Site:
    """One prunable activation (a set of channels that can be removed together)."""

    name: str  # the producer module's name, e.g. "layer1.0.conv1"; patterns match this
    producer: str
    norm: str | None
    channels: int
    mask: str = ""  # module path of the ChannelMask
    consumers: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # depthwise conv layers that carry the same mask
    tied_norms: list[str] = field(default_factory=list)  # their per-channel modules (norms, PReLU)
    side: list[tuple[str, int]] = field(default_factory=list)  # (per-channel module, channels each)
    repeat: int = 1  # producer output channels per site channel (PixelShuffle between them)
    gates: list[str] = field(default_factory=list)  # layers whose outputs gate this site (SE)
    #: depthwise convs without activation after them: (conv, its BatchNorms, the unpadded convs that
    #: absorb the constant a removed channel has there into their bias)
    folds: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    block: int = 1  # channels are removed in aligned blocks of this size
    part: int = 0  # each aligned partition of this many channels loses the same number (0: all)
    kept: list[int] | None = None  # after shrink(): original indices of the channels that remain
    original_channels: int | None = None  # after shrink(): channel count before removal

    @property
    def channel_modules(self) -> list[str]:
        """Non-layer modules with per-channel parameters that shrink with the site."""
        return [n for n, _ in self.side] + list(self.tied_norms)

    @property
    def parts(self) -> int:
        """Number of partitions that must lose the same number of channels."""
        return 1 if not self.part else self.channels // self.part


@dataclass
class LayerInfo:
    """A conv / linear layer and the quantization / pruning that touch it."""

    name: str
    kind: str  # "conv", "convT" or "linear"
    depthwise: bool = False
    weight_bits: int | None = None
    act_bits: int | None = None
    act_quant: str | None = None  # module path of the ActQuantizer on its input
    input_site: str | None = None  # site whose mask gates this layer's input channels
    output_site: str | None = None  # site whose mask gates this layer's output channels
    in_width: int = 0  # input channels (conv) or features (linear)
    input_taps: list[Tap] = field(default_factory=list)  # sites among its input channels


@dataclass
class Plan:
    """Everything :func:`instrument` decided, kept on the model as ``model.pq_plan``."""

    sites: list[Site]
    layers: dict[str, LayerInfo]
    skipped: dict[str, str]  # activation / producer -> why it is not prunable
    rewrites: dict[str, Rewrite] = field(default_factory=dict)  # fx node name -> rewrite
    shrunk: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # the instrument() arguments

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def input_fraction(self, layer: str, masks: dict[str, torch.Tensor]) -> float:
        """Fraction of ``layer``'s input channels / features kept under ``{site: 0/1 mask}``."""
        info = self.layers.get(layer)
        if info is None or not info.input_taps or not info.in_width:
            if info is not None and info.depthwise and info.input_site in masks:
                m = masks[info.input_site]
                return float(m.count_nonzero()) / m.numel()
            return 1.0
        keep = kept_positions(info.in_width, info.input_taps, masks)
        return float(keep.count_nonzero()) / info.in_width


def kept_positions(width: int, taps: list[Tap], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean vector over ``width`` positions: False where every site channel there is pruned."""
    keep = torch.ones(width, dtype=torch.bool)
    for t in taps:
        m = masks[t.site].detach().cpu()[t.lo:t.hi] != 0
        gone = (~m).reshape(-1, t.den).all(dim=1).repeat_interleave(t.num)
        keep[t.offset:t.offset + gone.numel()] &= ~gone
    return keep


#: Name of the module attribute holding the train / eval mode; ``get_attr`` nodes reading it (targets
#: ``"training"`` or ``"<module path>.training"``) give each op the mode the model is in at run time.
MODE_ATTR = "training"


def is_mode_node(n: Any) -> bool:
    """True for a ``get_attr`` node reading a module's ``training`` flag at run time (see :func:`trace`)."""
    return isinstance(n, fx.Node) and n.op == "get_attr" and str(n.target).rsplit(".", 1)[-1] == MODE_ATTR


def _mode_flags(n: fx.Node) -> set[str]:
    """Paths of the modules whose ``training`` flag ``n`` is computed from (``""``: the root)."""
    out: set[str] = set()
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if is_mode_node(m):
            out.add(str(m.target).rpartition(".")[0])
        else:
            todo.extend(m.all_input_nodes)
    return out


def _mode_functions() -> tuple[list[Any], list[Any]]:
    """Functions that branch on their mode argument, recorded as one op each, and the modules exposing them.

    torchvision's ``ops.stochastic_depth`` (``if not training: return input``) is wrapped by torchvision
    only where ``StochasticDepth`` calls it; user code calling ``torchvision.ops.stochastic_depth(...,
    self.training)`` or importing it by name reaches it too. Looked up only if torchvision is imported.
    """
    ops = sys.modules.get("torchvision.ops")
    fn = getattr(ops, "stochastic_depth", None)
    if ops is None or not callable(fn):
        return [], []
    return [fn], [m for m in (ops, sys.modules.get("torchvision.ops.stochastic_depth")) if m is not None]


class _ModeBranch(fx.proxy.TraceError):
    """Python control flow on ``self.training`` (``if self.training:``) met while tracing."""

    def __init__(self, flags: set[str]):
        super().__init__("forward() branches on self.training (Python control flow on the train / eval mode)")
        self.flags = flags  # the modules whose flags the condition reads


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps leaves, records the module of each op and keeps the mode live.

    While tracing, every module's ``training`` attribute is a proxy of a ``get_attr`` node reading the
    *GraphModule's* flag at the same path, so ``F.dropout(x, p, self.training)``,
    ``stochastic_depth(..., self.training)`` or ``F.batch_norm(..., training=self.training)`` (also
    with a child's flag, ``self.drop.training``) receive the mode at run time instead of the constant
    it had while tracing. Python control flow on it raises :class:`_ModeBranch` (see :func:`trace`),
    except on the flags in ``frozen``, which are constants (``{module path: flag}``).
    """

    def __init__(self, leaves: set[str] | None = None, frozen: dict[str, bool] | None = None):
        fns, where = _mode_functions()
        super().__init__(autowrap_functions=tuple(fns))
        self._autowrap_search.extend(where)  # also patched there while tracing (fx's own list of modules)
        self.leaves = leaves or set()
        self.frozen = frozen or {}
        self.stack: list[str] = []
        self.failed_at: str | None = None
        self.modes: list[tuple[nn.Module, Any]] = []  # (module, its own flag) while a proxy replaces it

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (ChannelMask, ActQuantizer)) or parametrize.is_parametrized(m):
            return True
        if qualname in self.leaves:
            return True
        return super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        try:
            return super().trace(root, concrete_args)
        finally:
            while self.modes:  # the model gets its own flags back whatever happened
                m, was = self.modes.pop()
                m.__dict__[MODE_ATTR] = was

    def create_args_for_root(self, fn, is_module, concrete_args=None):
        out = super().create_args_for_root(fn, is_module, concrete_args)
        if is_module:  # every module's flag, read at its path when the graph runs (unused ones erased)
            for path, m in self.root.named_modules():
                was = m.__dict__.get(MODE_ATTR)
                if not isinstance(was, bool):
                    continue
                self.modes.append((m, was))
                if path in self.frozen:
                    m.__dict__[MODE_ATTR] = self.frozen[path]
                else:
                    target = f"{path}.{MODE_ATTR}" if path else MODE_ATTR
                    m.__dict__[MODE_ATTR] = self.create_proxy("get_attr", target, (), {})
        return out

    def to_bool(self, obj: fx.Proxy) -> bool:
        flags = _mode_flags(obj.node)
        if flags:
            raise _ModeBranch(flags)
        return super().to_bool(obj)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.stack:
            node.meta["pq_module"] = self.stack[-1]  # the module whose forward made this op
        return node

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = path  # the innermost module whose forward raised
            raise
        finally:
            self.stack.pop()


def _holds_layers(m: nn.Module) -> bool:
    """Whether ``m`` is or contains a conv / linear layer."""
    return any(isinstance(s, LAYER_TYPES) for s in m.modules())


def trace(model: nn.Module, exclude: list[str] | tuple[str, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear :class:`GraphError` when it cannot be traced.

    A submodule that cannot be traced may be named in ``exclude`` (an fnmatch pattern matching its
    path): it is then kept as one opaque call (not pruned, not quantized inside).

    The traced model follows ``.train()`` / ``.eval()`` like the original: every read of a module's
    ``training`` in traced code becomes a ``get_attr`` node of the flag at that module's path in the
    GraphModule (``"training"`` for the root), which ``.train()`` / ``.eval()`` set. Python control
    flow on the mode (``if self.training:``) cannot be recorded that way. A submodule whose
    ``forward`` branches on it is kept as one opaque call (it then runs eagerly with its own flag) when
    it holds no conv / linear layer. Otherwise the flags it branches on are traced as constants, which
    is exact only if the graph is the same with each of them flipped (``if self.training and
    self.aux_logits:`` with ``aux_logits`` False): that is checked by tracing again, and
    :class:`GraphError` names the module when the graphs differ.
    """
    if isinstance(model, fx.GraphModule):
        return model
    leaves: set[str] = set()
    frozen: dict[str, bool] = {}  # flags Python control flow reads: constants, checked below
    branch_at: dict[str, str] = {}  # frozen flag -> the module whose forward branched on it
    for _ in range(100):
        tracer = _Tracer(leaves, frozen)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:  # fx raises many types; all mean "not traceable"
            where = tracer.failed_at or ""
            branch = isinstance(e, _ModeBranch)
            if where and where not in leaves and (
                    any(fnmatch.fnmatchcase(where, p) for p in exclude)
                    or branch and not _holds_layers(model.get_submodule(where))):
                leaves.add(where)
                continue
            if branch and not e.flags <= frozen.keys():
                for p in e.flags:
                    frozen.setdefault(p, model.get_submodule(p).training)
                    branch_at.setdefault(p, where)
                continue
            raise _untraceable(model, e, where) from e
    for p, value in frozen.items():
        try:
            same = str(_Tracer(leaves, {**frozen, p: not value}).trace(model)) == str(graph)
        except Exception:  # the other mode's branch does not even trace
            same = False
        if not same:
            where = branch_at[p]
            kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
            loc = f"module '{where}' ({kind})" if where else f"{kind}.forward"
            fix = (f" Add '{where}' to prune.exclude to keep it as one opaque block that follows train() / "
                   "eval() (not pruned, not quantized inside), or pass" if where else " Pass")
            holds = " and holds conv / linear layers" if where else ""
            raise GraphError(
                f"cannot trace {type(model).__name__} with torch.fx: {loc} branches on self.training "
                f"(Python control flow on the train / eval mode){holds}, and its graph differs between the "
                f"two modes: one fx graph cannot follow train() / eval() there.{fix} the flag to an op "
                "instead (e.g. F.dropout(x, p, training=self.training))."
            )
    for n in list(graph.nodes):
        if is_mode_node(n) and not n.users:
            graph.erase_node(n)  # modules that never read their flag
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.pq_original_class = type(model).__name__
    gm.pq_leaves = sorted(leaves)
    return gm


def _untraceable(model: nn.Module, e: Exception, where: str) -> GraphError:
    """The error for a model fx cannot trace, naming the innermost module that failed."""
    kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
    loc = f"in module '{where}' ({kind})" if where else f"in {kind}.forward"
    hint = (f" Add '{where}' to prune.exclude to keep that module as one opaque block (not "
            "pruned, not quantized inside)." if where else "")
    return GraphError(
        f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e} ({loc}). "
        f"Data-dependent control flow in forward() is not supported.{hint}"
    )


# ---------------------------------------------------------------------------------------- helpers
def _mod(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    """Human-readable op name and module path of a node, for error messages."""
    if n.op == "call_module":
        return f"module '{n.target}' ({type(_mod(gm, n)).__name__})"
    if n.op == "output":
        return "the model output"
    what = getattr(n.target, "__name__", str(n.target))
    path = n.meta.get("pq_module") if n.meta else None
    where = f" in module '{path}'" if path else ""
    return f"{n.op} '{what}' (node {n.name}{where})"


def _is_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_mod(gm, n), ACT_MODULES)
    if n.op == "call_function":
        return n.target in ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in ACT_METHODS
    return False


def _is_zero_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        m = _mod(gm, n)
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


def _is_pass(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_mod(gm, n), PASS_MODULES)
    if n.op == "call_function":
        return n.target in PASS_FUNCTIONS or is_stochastic_depth(n.target)
    if n.op == "call_method":
        return n.target in PASS_METHODS
    return False


def _is_layer(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(_mod(gm, n), LAYER_TYPES)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _unpadded(m: nn.Module) -> bool:
    if isinstance(m.padding, str):
        return m.padding == "valid" or all(k == 1 for k in m.kernel_size)
    return all(p == 0 for p in m.padding)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _calls(n: fx.Node, functions: set, methods: set) -> bool:
    if n.op == "call_function":
        return n.target in functions
    return n.op == "call_method" and n.target in methods


def _node_args(n: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a))
    return out


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


class _Shapes:
    """Output shapes of every node on an example input (``None`` when not recorded)."""

    def __init__(self, gm: fx.GraphModule, example_input: torch.Tensor | None):
        self.shapes: dict[fx.Node, Any] = {}
        if example_input is None:
            return
        shapes = self.shapes

        class _Rec(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if isinstance(out, torch.Tensor):
                    shapes[n] = tuple(out.shape)
                elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
                    shapes[n] = [tuple(o.shape) for o in out]
                else:
                    shapes[n] = "value"
                return out

        try:
            with eval_mode(gm), torch.no_grad():  # gm shares its leaf modules with the model
                _Rec(gm).run(example_input)
        except Exception as e:
            raise GraphError(f"the traced model failed on the example input: {type(e).__name__}: {e}") from e

    @property
    def known(self) -> bool:
        return bool(self.shapes)

    def get(self, n: Any) -> Any:
        return self.shapes.get(n) if isinstance(n, fx.Node) else None

    def is_tensor(self, n: fx.Node) -> bool:
        return isinstance(self.get(n), tuple)


class _Reject(Exception):
    pass


@dataclass(frozen=True)
class _State:
    offset: int
    lo: int
    hi: int
    f: Fraction | None  # positions per site channel; None: unknown (no example input)


# ---------------------------------------------------------------------------------------- discovery
def _producer_chain(gm: fx.GraphModule, act: fx.Node, calls: dict[str, int]):
    """``(layer_node, side, repeat, block)`` for ``act = act(ops(layer(x)))`` with private intermediates.

    ``side`` lists (module, channels per site channel) of per-channel modules in the chain; raises
    :class:`_Reject` when the chain exists but cannot be pruned; returns ``None`` if it is no chain.
    """
    if not act.args or not isinstance(act.args[0], fx.Node):
        return None
    side: list[tuple[str, int]] = []
    block = 1
    expand = 1
    am = _mod(gm, act)
    if isinstance(am, nn.PReLU) and am.num_parameters > 1:
        side.append((str(act.target), 1))
    p = act.args[0]
    while True:
        m = _mod(gm, p)
        if len(p.users) != 1:
            return None
        if isinstance(m, SIDE_NORM_TYPES):
            if isinstance(m, nn.GroupNorm):
                if expand != 1 or m.num_groups == 1:
                    raise _Reject(f"{_describe(gm, p)} normalizes across all channels")
                block = math.lcm(block, m.num_channels // m.num_groups)
            side.append((str(p.target), expand))
            p = p.args[0]
        elif isinstance(m, nn.PixelShuffle) or (p.op == "call_function" and p.target is F.pixel_shuffle):
            r = m.upscale_factor if m is not None else int(_arg(p, 1, "upscale_factor"))
            expand *= r * r
            p = p.args[0]
        else:
            break
        if not isinstance(p, fx.Node):
            return None
    if not _is_layer(gm, p) or len(p.users) != 1:
        return None
    for name in [str(p.target)] + [n for n, _ in side]:
        if calls.get(name, 0) > 1:
            raise _Reject(f"module '{name}' is called more than once")
    layer = _mod(gm, p)
    if isinstance(layer, CONVT_TYPES) and layer.groups != 1:
        raise _Reject(f"{_describe(gm, p)} is a grouped transposed conv")
    return p, side, expand, block


class _Walk:
    """Follows one site's channels from its mask to every consumer (see module docs)."""

    def __init__(self, gm: fx.GraphModule, shapes: _Shapes, calls: dict[str, int], site: Site):
        self.gm, self.shapes, self.calls, self.site = gm, shapes, calls, site
        self.taps: dict[str, list[tuple[fx.Node, Tap]]] = {}  # consumer module -> taps
        self.rewrites: dict[fx.Node, Rewrite] = {}
        self.tied: list[tuple[fx.Node, fx.Node, list[fx.Node]]] = []  # (dw conv, act, side nodes)
        self.gates: list[fx.Node] = []
        self.folds: list[tuple[fx.Node, list[fx.Node], list[fx.Node]]] = []  # (dw, norms, consumers)
        self.bounds: set[int] = set()  # site channel indices where a partition must start
        self.block = site.block
        self.seen: set[tuple[fx.Node, _State]] = set()

    def reject(self, msg: str) -> None:
        raise _Reject(msg)

    def run(self, act: fx.Node) -> None:
        c = self.site.channels
        full = _State(0, 0, c, Fraction(1))
        stack = [(act, full)]
        while stack:
            node, st = stack.pop()
            if (node, st) in self.seen:
                continue
            self.seen.add((node, st))
            for u in list(node.users):
                stack.extend(self.step(node, st, u))

    # one user ------------------------------------------------------------------------------------
    def step(self, node: fx.Node, st: _State, u: fx.Node) -> list[tuple[fx.Node, _State]]:
        gm, sh = self.gm, self.shapes
        d = _describe(gm, u)
        if u.op == "output":
            self.reject("coupled: is (part of) the model output")
        if _is_layer(gm, u):
            return self.layer(node, st, u, d)
        tensor_args = [a for a in _node_args(u)
                       if a is not node and sh.get(a) != "value" and not is_mode_node(a)]
        if _is_zero_act(gm, u) or _is_pass(gm, u):
            other = tensor_args and (not sh.known or any(sh.is_tensor(a) for a in tensor_args))
            if u.args[0] is not node or other:
                self.reject(f"coupled: feeds {d} through an argument other than its input")
            m = _mod(gm, u)
            flat = isinstance(m, nn.Flatten) or u.target in (torch.flatten, "flatten")
            if flat:
                return [(u, self.flatten(node, st, u, d))]
            return [(u, st)]
        if _calls(u, {torch.reshape}, VIEW_METHODS):
            if u.args[0] is not node:
                self.reject(f"coupled: feeds {d} through an argument other than its input")
            st2 = self.flatten(node, st, u, d, view=True)
            self.rewrites.setdefault(u, Rewrite("flatten"))
            return [(u, st2)]
        if u.op == "call_function" and u.target is torch.cat:
            return self.cat(node, st, u, d)
        if _calls(u, SPLIT_FUNCTIONS, SPLIT_METHODS):
            return self.split(node, st, u, d)
        if u.op == "call_function" and u.target is operator.getitem:
            return self.slice(node, st, u, d)
        if _calls(u, {operator.mul, torch.mul}, {"mul"}):
            return self.mul(node, st, u, d)
        if _calls(u, {operator.truediv, torch.div}, {"div"}):
            if u.args[0] is node and len(u.args) == 2 and isinstance(u.args[1], (int, float)) and u.args[1]:
                return [(u, st)]
            self.reject(f"coupled: feeds {d}")
        if isinstance(_mod(gm, u), nn.PixelShuffle) or u.target is F.pixel_shuffle:
            return self.shuffle(node, st, u, d, up=True)
        if isinstance(_mod(gm, u), nn.PixelUnshuffle) or u.target is F.pixel_unshuffle:
            return self.shuffle(node, st, u, d, up=False)
        if _calls(u, {torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"}):
            return self.reduce(node, st, u, d)
        if self.harmless(node, u):
            return []
        self.reject(f"coupled: feeds {d}")
        return []

    def reduce(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        """``x.mean(dims)`` / sum / amax over spatial dims only (global pooling written by hand)."""
        shape = self.shapes.get(node)
        dims = _arg(u, 1, "dim")
        if u.args[0] is not node or not isinstance(shape, tuple) or dims is None or st.f != 1:
            self.reject(f"coupled: feeds {d}")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [k + len(shape) if k < 0 else k for k in dims]
        if any(k < 2 for k in dims):
            self.reject(f"coupled: {d} reduces over the batch or channel dimension")
        return [(u, st)]

    def harmless(self, node: fx.Node, u: fx.Node) -> bool:
        """Uses that read no channel count: ``x.size(0)``, ``x.dim()``, ``x.shape[0]``, dtype, device."""
        if u.op == "call_method" and u.target in ("dim", "ndimension"):
            return True
        if u.op == "call_function" and u.target is getattr and u.args[1] in ("dtype", "device", "ndim"):
            return True
        if u.op == "call_method" and u.target == "size" and len(u.args) + len(u.kwargs) > 1:
            return _arg(u, 1, "dim") == 0
        if (u.op == "call_method" and u.target == "size") or (
                u.op == "call_function" and u.target is getattr and u.args[1] == "shape"):
            return all(w.op == "call_function" and w.target is operator.getitem and w.args[1] == 0
                       for w in u.users)
        return False

    # layers ----------------------------------------------------------------------------------------
    def layer(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        gm = self.gm
        if u.args[0] is not node or node in _node_args(u)[1:]:
            self.reject(f"coupled: reaches {d} through an argument other than its input")
        m = _mod(gm, u)
        name = str(u.target)
        if self.calls.get(name, 0) > 1:
            self.reject(f"coupled: reaches {d}, which is called more than once")
        width = _in_width(m)
        if _is_depthwise(m):
            return self.depthwise(node, st, u, d, m)
        f = st.f
        if f is None:  # no shapes: only a whole site feeding a linear (after flatten) can be resolved
            if not isinstance(m, nn.Linear) or st.offset or st.lo or st.hi != self.site.channels \
                    or width % self.site.channels:
                self.reject(f"coupled: needs an example input to follow the channels into {d}")
            f = Fraction(width // self.site.channels)
        if isinstance(m, nn.Linear):
            shape = self.shapes.get(node)
            if isinstance(shape, tuple) and len(shape) != 2:
                self.reject(f"coupled: feeds {d} with a {len(shape)}-d input (features are not on dim 1)")
        if isinstance(m, CONV_TYPES) and m.groups > 1:
            per = width // m.groups
            if st.offset or st.hi - st.lo != width or f != 1:
                self.reject(f"coupled: feeds grouped {d} together with other channels")
            if per == 1:
                self.reject(f"coupled: feeds grouped {d} with one input channel per group")
            self.bounds.update(st.lo + k * per for k in range(m.groups + 1))
        if isinstance(m, CONVT_TYPES) and m.groups != 1:
            self.reject(f"coupled: feeds grouped transposed {d}")
        tap = Tap(self.site.name, st.offset, st.lo, st.hi, f.numerator, f.denominator)
        if tap.offset + tap.width > width:
            self.reject(f"internal: channel offsets do not fit {d}")
        self.taps.setdefault(name, []).append((u, tap))
        return []

    def depthwise(self, node: fx.Node, st: _State, u: fx.Node, d: str, m: nn.Module) -> list:
        gm = self.gm
        if st != _State(0, 0, self.site.channels, Fraction(1)) or m.in_channels != self.site.channels:
            self.reject(f"coupled: reaches depthwise {d} together with other channels")
        side: list[fx.Node] = []
        p = u
        while True:
            users = list(p.users)
            if len(users) == 1:
                q = users[0]
                qm = _mod(gm, q)
                if isinstance(qm, NORM_TYPES + INSTANCE_NORM_TYPES):
                    side.append(q)
                    p = q
                    continue
                if _is_act(gm, q):
                    if isinstance(qm, nn.PReLU) and qm.num_parameters > 1:
                        side.append(q)
                    self._check_once([u] + side)
                    self.tied.append((u, q, side))
                    return [(q, st)]
            return self.fold(u, side, p, d)

    def _check_once(self, nodes: list[fx.Node]) -> None:
        for n in nodes:
            if self.calls.get(str(n.target), 0) > 1:
                self.reject(f"coupled: module '{n.target}' is called more than once")

    def fold(self, u: fx.Node, side: list[fx.Node], p: fx.Node, d: str) -> list:
        """Depthwise conv + BatchNorm without activation: a removed channel is a constant there.

        Unpadded convs that read it absorb the constant into their bias (exact in eval mode).
        """
        gm = self.gm
        if any(not isinstance(_mod(gm, n), NORM_TYPES) for n in side):
            self.reject(f"coupled: depthwise {d} is followed by a norm other than BatchNorm and no "
                        "activation")
        self._check_once([u] + side)
        consumers = []
        for w in p.users:
            m = _mod(gm, w)
            ok = _is_layer(gm, w) and isinstance(m, CONV_TYPES) and m.groups == 1 and w.args[0] is p \
                and p not in _node_args(w)[1:] and self.calls.get(str(w.target), 0) == 1 and _unpadded(m)
            if not ok:
                self.reject(f"coupled: depthwise {d} has no activation after it and feeds {_describe(gm, w)} "
                            "(only unpadded convs can absorb the constant it outputs for a removed channel)")
            consumers.append(w)
        for w in consumers:
            self.taps.setdefault(str(w.target), []).append((w, Tap(self.site.name, 0, 0, self.site.channels)))
        self.folds.append((u, side, consumers))
        return []

    # reshaping ops ---------------------------------------------------------------------------------
    def flatten(self, node: fx.Node, st: _State, u: fx.Node, d: str, view: bool = False) -> _State:
        shape_in, shape_out = self.shapes.get(node), self.shapes.get(u)
        m = _mod(self.gm, u)
        if isinstance(m, nn.Flatten):
            ok = m.start_dim == 1 and m.end_dim == -1
        elif view:
            ok = isinstance(shape_in, tuple) and isinstance(shape_out, tuple) and len(shape_out) == 2 \
                and shape_out[0] == shape_in[0] and shape_out[1] == math.prod(shape_in[1:])
        else:
            start = _arg(u, 1, "start_dim", 0)
            end = _arg(u, 2, "end_dim", -1)
            ok = start == 1 and end == -1
        if not ok:
            self.reject(f"coupled: {d} does not flatten from dim 1 to the end")
        if not isinstance(shape_in, tuple):
            if view:
                self.reject(f"coupled: needs an example input to follow the channels through {d}")
            return _State(st.offset, st.lo, st.hi, None) if st.f == 1 and not st.offset else self._unknown(d)
        k = math.prod(shape_in[2:])
        f = None if st.f is None else st.f * k
        return _State(st.offset * k, st.lo, st.hi, f)

    def _unknown(self, d: str):
        self.reject(f"coupled: needs an example input to follow the channels through {d}")

    def cat(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        tensors = _arg(u, 0, "tensors")
        dim = _arg(u, 1, "dim", 0)
        shape = self.shapes.get(u)
        if not isinstance(shape, tuple) or st.f is None:
            self.reject(f"coupled: needs an example input to follow the channels through {d}")
        if dim < 0:
            dim += len(shape)
        if dim != 1:
            self.reject(f"coupled: {d} concatenates along dim {dim}, not channels")
        out, off = [], 0
        for t in tensors:
            if t is node:
                out.append((u, _State(off + st.offset, st.lo, st.hi, st.f)))
            ts = self.shapes.get(t)
            if not isinstance(ts, tuple):
                self.reject(f"coupled: {d} concatenates a non-tensor")
            off += ts[1]
        return out

    def _pieces(self, node: fx.Node, st: _State, ranges: list[tuple[int, int]], d: str) -> list:
        if st.f is None or st.f.denominator != 1 or st.f.numerator != 1:
            self.reject(f"coupled: {d} splits channels that are spread over several positions")
        end = st.offset + (st.hi - st.lo)
        out: list[_State | None] = []
        for a, b in ranges:
            lo, hi = max(a, st.offset), min(b, end)
            if lo >= hi:
                out.append(None)
                continue
            out.append(_State(lo - a, st.lo + lo - st.offset, st.lo + hi - st.offset, st.f))
            self.bounds.update((st.lo + lo - st.offset, st.lo + hi - st.offset))
        return out

    def split(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        if u.args[0] is not node:
            self.reject(f"coupled: feeds {d} through an argument other than its input")
        dim = _arg(u, 2, "dim", 0)
        shapes = self.shapes.get(u)
        if not isinstance(shapes, list):
            self.reject(f"coupled: needs an example input to follow the channels through {d}")
        if dim < 0:
            dim += len(shapes[0])
        if dim != 1:
            return self._batch_split(node, st, u, d, dim)
        sizes = [s[1] for s in shapes]
        ranges, a = [], 0
        for s in sizes:
            ranges.append((a, a + s))
            a += s
        pieces = self._pieces(node, st, ranges, d)
        rw = self.rewrites.setdefault(u, Rewrite("split", self.shapes.get(node)[1], sizes=sizes))
        rw.taps.append(Tap(self.site.name, st.offset, st.lo, st.hi, 1, 1))
        out = []
        for w in u.users:
            if not (w.op == "call_function" and w.target is operator.getitem and isinstance(w.args[1], int)):
                self.reject(f"coupled: the pieces of {d} are used by {_describe(self.gm, w)}")
            p = pieces[w.args[1]]
            if p is not None:
                out.append((w, p))
        return out

    def _batch_split(self, node, st, u, d, dim):
        self.reject(f"coupled: {d} splits along dim {dim}, not channels")

    def slice(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        idx = u.args[1]
        shape = self.shapes.get(node)
        if u.args[0] is not node or not isinstance(idx, tuple) or len(idx) < 2 \
                or not isinstance(shape, tuple):
            self.reject(f"coupled: feeds {d}")
        full = slice(None, None, None)
        s = idx[1]
        rest_ok = all(x == full or x is Ellipsis for x in idx[2:])
        if idx[0] != full or not isinstance(s, slice) or s.step not in (None, 1) or not rest_ok or \
                any(isinstance(v, fx.Node) for v in (s.start, s.stop)):
            self.reject(f"coupled: feeds {d} (only x[:, a:b] slices of channels are followed)")
        a, b, _ = s.indices(shape[1])
        piece = self._pieces(node, st, [(a, max(a, b))], d)[0]
        tap = Tap(self.site.name, st.offset, st.lo, st.hi, 1, 1)
        self.rewrites.setdefault(u, Rewrite("slice", shape[1], sizes=[a, max(a, b)])).taps.append(tap)
        return [] if piece is None else [(u, piece)]

    def shuffle(self, node: fx.Node, st: _State, u: fx.Node, d: str, up: bool) -> list:
        m = _mod(self.gm, u)
        if u.args[0] is not node:
            self.reject(f"coupled: feeds {d} through an argument other than its input")
        if m is not None:
            r = m.upscale_factor if up else m.downscale_factor
        else:
            r = int(_arg(u, 1, "upscale_factor" if up else "downscale_factor"))
        k = r * r
        if st.f is None or st.f != 1:
            self.reject(f"coupled: {d} after a flatten")
        if up:
            if st.offset % k or st.lo % k or (st.hi - st.lo) % k:
                self.reject(f"coupled: {d} mixes these channels with others in one output channel")
            self.block = math.lcm(self.block, k)
            return [(u, _State(st.offset // k, st.lo, st.hi, st.f / k))]
        return [(u, _State(st.offset * k, st.lo, st.hi, st.f * k))]

    def mul(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        args = list(u.args)
        if len(args) != 2 or u.kwargs:
            self.reject(f"coupled: feeds {d}")
        other = args[1] if args[0] is node else args[0]
        if other is node:
            self.reject(f"coupled: feeds {d} (squared)")
        if isinstance(other, (int, float)):
            return [(u, st)]
        shp, oshp, ushp = self.shapes.get(node), self.shapes.get(other), self.shapes.get(u)
        if not (isinstance(shp, tuple) and isinstance(oshp, tuple) and ushp == shp):
            self.reject(f"coupled: feeds {d} (a product with a tensor; needs an example input)")
        if len(oshp) < 2 or oshp[1] == 1 or len(oshp) < len(shp) and len(oshp) != 0:
            if len(oshp) >= 2 and oshp[1] == 1 and len(oshp) == len(shp):
                return [(u, st)]  # broadcast over channels (spatial attention)
            self.reject(f"coupled: feeds {d} (a product with a tensor of shape {oshp})")
        # A per-channel gate: other = act(layer(...)) whose channels must follow this site.
        if st != _State(0, 0, self.site.channels, Fraction(1)) or oshp[1] != shp[1] or oshp[0] != shp[0] \
                or any(s != 1 for s in oshp[2:]):
            self.reject(f"coupled: feeds {d} (a product with a tensor that is not a per-channel gate)")
        p = other
        while True:
            if len(p.users) != 1:
                self.reject(f"coupled: the gate of {d} is used elsewhere")
            if _is_layer(self.gm, p):
                break
            ok = _is_act(self.gm, p) or (p.op in ("call_function", "call_method") and p.target in (
                operator.add, operator.mul, operator.truediv, "add", "mul", "div") and len(p.args) == 2
                and isinstance(p.args[1], (int, float)))
            if not ok or not isinstance(p.args[0], fx.Node):
                self.reject(f"coupled: the gate of {d} comes from {_describe(self.gm, p)}")
            if isinstance(_mod(self.gm, p), nn.PReLU) and _mod(self.gm, p).num_parameters > 1:
                self.reject(f"coupled: the gate of {d} has a per-channel PReLU")
            p = p.args[0]
        gm_ = _mod(self.gm, p)
        if isinstance(gm_, CONV_TYPES) and gm_.groups != 1 or isinstance(gm_, CONVT_TYPES):
            self.reject(f"coupled: the gate of {d} comes from grouped / transposed {_describe(self.gm, p)}")
        if self.calls.get(str(p.target), 0) > 1:
            self.reject(f"coupled: the gate layer '{p.target}' is called more than once")
        self.gates.append(p)
        return [(u, st)]


def discover(
    gm: fx.GraphModule,
    exclude: list[str] | tuple[str, ...] = (),
    example_input: torch.Tensor | None = None,
) -> tuple[list[Site], dict]:
    """Prunable sites of a traced model in forward order, and ``{name: reason}`` for those skipped.

    ``example_input`` gives the tensor shapes needed to follow channels through concatenations,
    splits and flattening views; without it those sites are skipped.

    Returns sites together with, for each, the activation nodes that carry its mask (the site's own
    activation first, then those of tied depthwise convs) and the routes, as a private ``_nodes``
    attribute used by :func:`instrument`.
    """
    shapes = _Shapes(gm, example_input)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    claimed: set[str] = set()  # modules whose output channels belong to a site
    for n in gm.graph.nodes:
        if not _is_act(gm, n):
            continue
        try:
            chain = _producer_chain(gm, n, calls)
        except _Reject as e:
            name = str(n.target) if n.op == "call_module" else n.name
            skipped[name] = str(e)
            continue
        if chain is None:
            continue  # e.g. relu after a residual add: not a producer chain
        layer_node, side, repeat, block = chain
        layer = _mod(gm, layer_node)
        pname = str(layer_node.target)
        if pname in claimed:
            continue  # tied depthwise conv or gate of an earlier site
        if any(fnmatch.fnmatchcase(pname, pat) for pat in exclude):
            skipped[pname] = "excluded by pattern"
            continue
        if _is_depthwise(layer):
            skipped[pname] = "depthwise conv whose input channels are not prunable"
            continue
        out = _out_channels(layer)
        if out % repeat:
            skipped[pname] = "PixelShuffle does not divide the channels"
            continue
        channels = out // repeat
        ashape = shapes.get(n)
        if isinstance(layer, nn.Linear):
            if channels < 2:
                continue
            if isinstance(ashape, tuple) and len(ashape) != 2:
                skipped[pname] = f"linear output has {len(ashape)} dims; its features are not on dim 1"
                continue
        norm = next((s for s, _ in side if isinstance(gm.get_submodule(s), NORM_TYPES)), None)
        site = Site(name=pname, producer=pname, norm=norm, channels=int(channels), side=side,
                    repeat=repeat, block=block)
        bounds: set[int] = set()
        if isinstance(layer, CONV_TYPES) and layer.groups > 1:
            per = out // layer.groups
            if per % repeat:
                skipped[pname] = "grouped conv groups do not align with PixelShuffle blocks"
                continue
            bounds.update(range(0, channels + 1, per // repeat))
        walk = _Walk(gm, shapes, calls, site)
        try:
            walk.run(n)
        except _Reject as e:
            skipped[pname] = str(e)
            continue
        owned = [str(t.target) for t, _, _ in walk.tied] + [str(g.target) for g in walk.gates]
        owned += [str(s.target) for _, _, sd in walk.tied for s in sd]
        owned += [str(t.target) for t, _, _ in walk.folds]
        owned += [str(s.target) for _, sd, _ in walk.folds for s in sd]
        if any(o in claimed for o in owned) or len(set(owned)) != len(owned):
            skipped[pname] = "coupled: shares a depthwise conv or gate with another site"
            continue
        if not walk.taps and not walk.tied and not walk.folds:
            skipped[pname] = "feeds no conv / linear layer"
            continue
        # Structure: blocks and balanced partitions.
        site.block = walk.block
        bounds |= walk.bounds
        part = 0
        for b in bounds:
            part = math.gcd(part, b)
        part = math.gcd(part, channels) if part else 0
        if part == channels:
            part = 0
        if part and part % site.block:
            skipped[pname] = "coupled: split / group boundaries cut through channel blocks"
            continue
        if (part or channels) // site.block < 2:
            skipped[pname] = "coupled: channels can only be removed all together"
            continue
        site.part = part
        claimed.add(pname)
        claimed.update(owned)
        site.tied = [str(t.target) for t, _, _ in walk.tied] + [str(t.target) for t, _, _ in walk.folds]
        site.tied_norms = [str(s.target) for _, _, sd in walk.tied for s in sd]
        site.tied_norms += [str(s.target) for _, sd, _ in walk.folds for s in sd]
        site.folds = [(str(t.target), [str(n.target) for n in sd], [str(c.target) for c in cs])
                      for t, sd, cs in walk.folds]
        site.gates = [str(g.target) for g in walk.gates]
        site.consumers = list(walk.taps)
        site._nodes = {"acts": [n] + [a for _, a, _ in walk.tied], "walk": walk}  # type: ignore[attr-defined]
        sites.append(site)
    return sites, skipped


def _match(name: str, table: dict) -> object | None:
    """Value of the last pattern in ``table`` that matches ``name`` (later entries win)."""
    hit = None
    for pat, val in table.items():
        if fnmatch.fnmatchcase(name, pat):
            hit = val
    return hit


def _safe(name: str) -> str:
    return name.replace(".", "_")


def instrument(
    model: nn.Module,
    *,
    prune_stat: str | None = "a_l1",
    exclude: list[str] | tuple[str, ...] = (),
    weight_bits: int | None = None,
    act_bits: int | None = None,
    power_of_two: bool = False,
    layer_bits: dict[str, dict] | None = None,
    example_input: torch.Tensor | None = None,
    act_percentile: float | None = None,
    weight_clip: str = "max",
    weight_range: str = "full",
) -> tuple[fx.GraphModule, Plan]:
    """Trace ``model`` and insert masks (when ``prune_stat`` is not None) and quantizers.

    Args:
        prune_stat: statistic the masks gather ("a_l1", "a_l0", or "none" for weight / random
            importance); ``None`` inserts no masks.
        exclude: fnmatch patterns of producer names never pruned (and of submodules that cannot be
            traced, which are then kept as opaque calls).
        weight_bits / act_bits: global bit-widths; ``None`` leaves that part in floating point.
        layer_bits: ``{pattern: {"weight_bits": b|None, "act_bits": b|None}}`` per-layer overrides
            (``act_bits`` is the bit-width of that layer's *input*).
        act_percentile: ``None`` (activation bounds from batch min / max, the paper's) or a
            percentile in (50, 100) used as the per-batch statistic instead (see
            :class:`~prunequant.quant.quantizers.ActQuantizer`).
        weight_clip: ``"max"`` (the paper's weight scale) or ``"mse"`` (MSE-optimal clipped max, see
            :class:`~prunequant.quant.quantizers.WeightQuantizer`).
        weight_range: ``"full"`` b-bit weight codes or ``"reduced"`` (7-bit codes in 8-bit weights),
            for integer kernels that would saturate (see ``prunequant.export.cpu``).
        example_input: a batch used to record tensor shapes; needed to follow channels through
            concatenations, splits and views (without it those activations are not pruned).
    """
    options = {"prune_stat": prune_stat, "exclude": list(exclude), "weight_bits": weight_bits,
               "act_bits": act_bits, "power_of_two": power_of_two, "layer_bits": layer_bits}
    if act_percentile is not None:  # recorded only when used, so older records stay identical
        options["act_percentile"] = check_percentile(act_percentile)
    if weight_clip != "max":
        if weight_clip not in WEIGHT_CLIPS:
            raise ValueError(f"weight_clip must be one of {list(WEIGHT_CLIPS)}, got {weight_clip!r}")
        options["weight_clip"] = weight_clip
    if weight_range != "full":  # recorded only when used, like the two above
        options["weight_range"] = weight_range
    gm = trace(model, exclude)
    graph = gm.graph
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    if prune_stat is not None:
        sites, skipped = discover(gm, exclude, example_input)
    layers: dict[str, LayerInfo] = {}
    layer_nodes = [n for n in graph.nodes if _is_layer(gm, n)]
    for n in layer_nodes:
        m = _mod(gm, n)
        kind = "linear" if isinstance(m, nn.Linear) else ("convT" if isinstance(m, CONVT_TYPES) else "conv")
        layers[str(n.target)] = LayerInfo(name=str(n.target), kind=kind, depthwise=_is_depthwise(m),
                                          in_width=_in_width(m))

    # Masks.
    rewrites: dict[str, Rewrite] = {}
    for site in sites:
        walk: _Walk = site._nodes["walk"]  # type: ignore[attr-defined]
        site.mask = f"{MASKS_ATTR}.{_safe(site.name)}"
        gm.add_submodule(site.mask, ChannelMask(site.channels, stat=prune_stat or "none"))
        for i, act in enumerate(site._nodes["acts"]):  # type: ignore[attr-defined]
            with graph.inserting_after(act):
                # Tied (depthwise) points reuse the module but never gather statistics.
                args = (act,) if i == 0 else (act, False)
                new = graph.call_module(site.mask, args)
            act.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        layers[site.producer].output_site = site.name
        for t in site.tied:
            layers[t].output_site = site.name
            layers[t].input_site = site.name
        for g in site.gates:
            layers[g].output_site = site.name
        for c, taps in walk.taps.items():
            info = layers[c]
            if info.input_site is None:
                info.input_site = site.name
            info.input_taps.extend(t for _, t in taps)
        for node, rw in walk.rewrites.items():
            if node.name in rewrites:
                rewrites[node.name].taps.extend(rw.taps)
            else:
                rewrites[node.name] = rw
        del site._nodes  # type: ignore[attr-defined]

    # Quantizers.
    overrides = layer_bits or {}
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for n in layer_nodes:
        info = layers[str(n.target)]
        o = _match(info.name, overrides) or {}
        info.weight_bits = o.get("weight_bits", weight_bits) if isinstance(o, dict) else weight_bits
        info.act_bits = o.get("act_bits", act_bits) if isinstance(o, dict) else act_bits
        if info.weight_bits is not None:
            m = _mod(gm, n)
            axis = 1 if info.kind == "convT" else 0
            channels = None if info.kind == "linear" else m.weight.shape[axis]
            parametrize.register_parametrization(
                m, "weight", WeightQuantizer(info.weight_bits, channels, axis, power_of_two, weight_clip,
                                                weight_range),
                unsafe=True,
            )
        if info.act_bits is not None:
            by_input.setdefault(n.args[0], []).append(n)
    for src, users in by_input.items():
        bits = max(layers[str(u.target)].act_bits for u in users)
        name = f"{AQ_ATTR}.{_safe(str(users[0].target))}"
        gm.add_submodule(name, ActQuantizer(bits, act_percentile))
        with graph.inserting_before(users[0]):
            q = graph.call_module(name, (src,))
        for u in users:
            u.replace_input_with(src, q)
            layers[str(u.target)].act_quant = name
            layers[str(u.target)].act_bits = bits
    graph.lint()
    gm.recompile()
    plan = Plan(sites=sites, layers=layers, skipped=skipped, rewrites=rewrites, options=options)
    gm.pq_plan = plan
    return gm, plan


def weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` parametrizing ``module.weight``, if any."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, WeightQuantizer):
                return p
    return None


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The unquantized weight tensor of a (possibly parametrized) layer."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


__all__ = [
    "GraphError", "LayerInfo", "Plan", "Rewrite", "Site", "Tap", "discover", "instrument",
    "is_mode_node", "is_stochastic_depth", "kept_positions", "raw_weight", "trace", "weight_quantizer",
]
