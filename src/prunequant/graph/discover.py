"""Find prunable channels in a traced model: sites and (with ``groups``) channel groups.

How channels flow through each op comes from the op registry (:mod:`.ops`, ``flow_of``); this
module walks the graph with it. Masks and quantizers are inserted by :mod:`.instrument`.

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

Also followed: per-channel PReLU and BatchNorm / InstanceNorm reading exactly the site's channels
(they lose them too; the mask is applied again after a norm), and linear layers over channels-last
tensors (``[N, ..., C]``: the site's channels are on the last dim, :attr:`Site.dim` -1). With
``groups`` (:func:`discover_groups`) tensors joined by residual adds / gating products are pruned
together, across layout permutes, with LayerNorms over the channels computed on the kept ones (see
:mod:`.masking`), and outputs without activation (linear bottlenecks) are sites.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import GraphError
from ..utils import eval_mode
from .ops import (
    CONV_TYPES,
    CONVT_TYPES,
    INSTANCE_NORM_TYPES,
    NORM_TYPES,
    SIDE_NORM_TYPES,
    arg,
    calls_op,
    describe,
    flow_of,
    in_width,
    is_act,
    is_depthwise,
    is_layer,
    is_pass,
    is_zero_act,
    module_of,
    node_args,
    out_channels,
    rule_of,
    unpadded,
)
from .plan import Rewrite, Site, Tap
from .trace import is_mode_node


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
    last: bool = False  # channels on the last dim ([N, ..., C]) instead of dim 1


def _permute_dims(n: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (``x.permute(0, 2, 3, 1)`` / ``torch.permute(x, [0, 2, 3, 1])``)."""
    if not calls_op(n, {torch.permute}, {"permute"}):
        return None
    rest = list(n.args[1:]) or [n.kwargs.get("dims")]
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return tuple(dims) if all(isinstance(k, int) for k in dims) else None


def _layout_permute(n: fx.Node, rank: int) -> str | None:
    """``"to_last"`` for ``(0, 2, ..., r-1, 1)``, ``"to_first"`` for ``(0, r-1, 1, ..., r-2)``."""
    dims = _permute_dims(n)
    if dims is None or len(dims) != rank or rank < 3:
        return None
    dims = tuple(k % rank for k in dims)
    if dims == (0, *range(2, rank), 1):
        return "to_last"
    if dims == (0, rank - 1, *range(1, rank - 1)):
        return "to_first"
    return None


def _channel_layer_norm(gm: fx.GraphModule, n: fx.Node, channels: int) -> bool:
    """A LayerNorm over the last dim only, of ``channels`` features (``nn.LayerNorm`` or ``F.layer_norm``)."""
    m = module_of(gm, n)
    if isinstance(m, nn.LayerNorm) and type(m) is nn.LayerNorm:
        shape = tuple(m.normalized_shape)
    elif n.op == "call_function" and n.target is F.layer_norm:
        shape = arg(n, 1, "normalized_shape")
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
    else:
        return False
    return shape == (channels,)


def _param_of(gm: fx.GraphModule, n: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a parameter or buffer), else ``None``."""
    if not isinstance(n, fx.Node) or n.op != "get_attr":
        return None
    try:
        t = gm.get_parameter(str(n.target))
    except AttributeError:
        try:
            t = gm.get_buffer(str(n.target))
        except AttributeError:
            return None
    return t if isinstance(t, torch.Tensor) else None


def _channel_param(t: torch.Tensor | None, channels: int, rank: int, last: bool) -> bool:
    """A per-channel scale ("layer scale"): ``[C]`` channels-last, else ``[C, 1, ..]`` / ``[1, C, 1, ..]``."""
    if t is None:
        return False
    shape = tuple(t.shape)
    if last:
        return shape == (channels,)
    ones = (1,) * (rank - 2)
    return shape in ((channels, *ones), (1, channels, *ones))


# ---------------------------------------------------------------------------------------- discovery
#: ops inside a producer chain that keep every channel where it is (seen through)
_SEE_THROUGH = frozenset({"identity", "dropout", "stochastic_depth"})


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
    am = module_of(gm, act)
    if isinstance(am, nn.PReLU) and am.num_parameters > 1:
        side.append((str(act.target), 1))
    p = act.args[0]
    while True:
        m = module_of(gm, p)
        if len(p.users) != 1:
            return None
        if isinstance(m, SIDE_NORM_TYPES):
            if isinstance(m, nn.GroupNorm):
                if expand != 1 or m.num_groups == 1:
                    raise _Reject(f"{describe(gm, p)} normalizes across all channels")
                block = math.lcm(block, m.num_channels // m.num_groups)
            side.append((str(p.target), expand))
            p = p.args[0]
        elif isinstance(m, nn.PixelShuffle) or (p.op == "call_function" and p.target is F.pixel_shuffle):
            r = m.upscale_factor if m is not None else int(arg(p, 1, "upscale_factor"))
            expand *= r * r
            p = p.args[0]
        elif getattr(rule_of(gm, p), "name", None) in _SEE_THROUGH and p.args:
            p = p.args[0]  # keeps every channel where it is: see through it
        else:
            break
        if not isinstance(p, fx.Node):
            return None
    if not is_layer(gm, p) or len(p.users) != 1:
        return None
    for name in [str(p.target)] + [n for n, _ in side]:
        if calls.get(name, 0) > 1:
            raise _Reject(f"module '{name}' is called more than once")
    layer = module_of(gm, p)
    if isinstance(layer, CONVT_TYPES) and layer.groups != 1:
        raise _Reject(f"{describe(gm, p)} is a grouped transposed conv")
    return p, side, expand, block


class Walk:
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
        self.joins: set[fx.Node] = set()  # a group's adds / products: every input is one of its tensors
        #: per-channel modules on the channels' way (a per-channel PReLU, a BatchNorm / InstanceNorm of a
        #: pre-activation block): they lose the same channels; after a norm the mask is applied again
        self.channelwise: list[fx.Node] = []
        self.layer_norms: list[fx.Node] = []  # LayerNorms over these channels: computed on the kept ones
        self.params: list[str] = []  # per-channel scales ("layer scale") read by get_attr
        self.tied_ln: list[fx.Node] = []  # depthwise convs whose output goes to such a LayerNorm

    def reject(self, msg: str) -> None:
        raise _Reject(msg)

    def run(self, *starts: fx.Node, last: dict[fx.Node, bool] | None = None) -> None:
        """Walk from ``starts`` (all channels; on the last dim where ``last`` says so)."""
        c = self.site.channels
        lay = last or {}
        stack = [(a, _State(0, 0, c, Fraction(1), lay.get(a, self.site.dim == -1))) for a in starts]
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
        d = describe(gm, u)
        if u.op == "output":
            self.reject("coupled: is (part of) the model output")
        if u in self.joins:
            if not self.full(st):
                self.reject(f"coupled: reaches {d} together with other channels")
            return []  # a start of the walk itself
        if st.last:
            return self.channels_last(node, st, u, d)
        flow = flow_of(gm, u)  # the op registry (graph.ops) says how channels flow through u
        if flow == "layer":
            return self.layer(node, st, u, d)
        m = module_of(gm, u)
        if flow == "norm" and isinstance(m, NORM_TYPES + INSTANCE_NORM_TYPES) or \
                isinstance(m, nn.PReLU) and m.num_parameters > 1:
            return self.per_channel(node, st, u, d, m)
        if flow in ("pass", "flatten") or flow == "act" and is_zero_act(gm, u):
            tensor_args = [a for a in node_args(u)
                           if a is not node and sh.get(a) != "value" and not is_mode_node(a)]
            other = tensor_args and (not sh.known or any(sh.is_tensor(a) for a in tensor_args))
            if u.args[0] is not node or other:
                self.reject(f"coupled: feeds {d} through an argument other than its input")
            if flow == "flatten":
                return [(u, self.flatten(node, st, u, d))]
            return [(u, st)]
        if flow == "view":
            if u.args[0] is not node:
                self.reject(f"coupled: feeds {d} through an argument other than its input")
            st2 = self.flatten(node, st, u, d, view=True)
            self.rewrites.setdefault(u, Rewrite("flatten"))
            return [(u, st2)]
        handlers = {"cat": self.cat, "split": self.split, "slice": self.slice, "mul": self.mul,
                    "div": self.div, "reduce": self.reduce}
        if flow in handlers:
            return handlers[flow](node, st, u, d)
        if flow in ("shuffle", "unshuffle"):
            return self.shuffle(node, st, u, d, up=flow == "shuffle")
        if flow == "shape" and self.harmless(node, u):
            return []
        shape = self.shapes.get(node)
        if flow == "permute" and isinstance(shape, tuple) and self.full(st) and u.args[0] is node \
                and _layout_permute(u, len(shape)) == "to_last":
            return [(u, _State(0, 0, st.hi, st.f, last=True))]
        self.reject(f"coupled: feeds {d}")
        return []

    def full(self, st: _State) -> bool:
        """All of the site's channels, in order, one position each (either layout)."""
        return (st.offset, st.lo, st.hi, st.f) == (0, 0, self.site.channels, 1)

    def div(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        """``x / c`` with a nonzero number ``c``."""
        if u.args[0] is node and len(u.args) == 2 and isinstance(u.args[1], (int, float)) and u.args[1]:
            return [(u, st)]
        self.reject(f"coupled: feeds {d}")
        return []

    def channels_last(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        """Channels on the last dim (``[N, ..., C]`` read by linear layers): followed through zero-preserving
        elementwise activations, dropout, identity and products with numbers, into linear layers."""
        gm = self.gm
        why = f"coupled: feeds {d} (channels on the last dim are followed only through activations, " \
              "dropout and products with numbers into linear layers)"
        m = module_of(gm, u)
        if is_layer(gm, u):
            if not isinstance(m, nn.Linear) or u.args[0] is not node or node in node_args(u)[1:]:
                self.reject(why)
            if self.calls.get(str(u.target), 0) > 1:
                self.reject(f"coupled: reaches {d}, which is called more than once")
            if m.in_features != self.site.channels:
                self.reject(why)
            self.taps.setdefault(str(u.target), []).append((u, Tap(self.site.name, 0, 0, self.site.channels)))
            return []
        others = [a for a in node_args(u) if a is not node and not is_mode_node(a)
                  and self.shapes.get(a) != "value"]
        elementwise = is_zero_act(gm, u) or isinstance(m, (nn.Dropout, nn.Identity)) or u.target is F.dropout
        if elementwise and u.args[0] is node and not others:
            return [(u, st)]
        shape = self.shapes.get(node)
        first = bool(u.args) and u.args[0] is node and node not in node_args(u)[1:]
        if first and isinstance(shape, tuple) and _layout_permute(u, len(shape)) == "to_first":
            return [(u, _State(0, 0, st.hi, st.f, last=False))]
        if first and self.full(st) and _channel_layer_norm(gm, u, self.site.channels):
            self._check_once([u])
            self.layer_norms.append(u)
            return [(u, st)]
        if calls_op(u, {operator.mul, torch.mul}, {"mul"}) and len(u.args) == 2 and not u.kwargs:
            other = u.args[1] if u.args[0] is node else u.args[0]
            if _channel_param(_param_of(gm, other), self.site.channels, 0, last=True):
                self.params.append(str(other.target))
                return [(u, st)]
        number = any(isinstance(a, (int, float)) and a for a in u.args)
        if calls_op(u, {operator.mul, torch.mul, operator.truediv, torch.div}, {"mul", "div"}) \
                and len(u.args) == 2 and not others and number:
            return [(u, st)]
        if self.harmless(node, u):
            return []
        self.reject(why)
        return []

    def per_channel(self, node: fx.Node, st: _State, u: fx.Node, d: str, m: nn.Module) -> list:
        """A per-channel PReLU or norm reading exactly these channels: it loses them too."""
        width = m.num_parameters if isinstance(m, nn.PReLU) else m.num_features
        if u.args[0] is not node or st != _State(0, 0, self.site.channels, Fraction(1)) \
                or width != self.site.channels:
            self.reject(f"coupled: feeds {d} together with other channels")
        self._check_once([u])
        self.channelwise.append(u)
        return [(u, st)]

    def reduce(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        """``x.mean(dims)`` / sum / amax over spatial dims only (global pooling written by hand)."""
        shape = self.shapes.get(node)
        dims = arg(u, 1, "dim")
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
            return arg(u, 1, "dim") == 0
        if (u.op == "call_method" and u.target == "size") or (
                u.op == "call_function" and u.target is getattr and u.args[1] == "shape"):
            return all(w.op == "call_function" and w.target is operator.getitem and w.args[1] == 0
                       for w in u.users)
        return False

    # layers ----------------------------------------------------------------------------------------
    def layer(self, node: fx.Node, st: _State, u: fx.Node, d: str) -> list:
        gm = self.gm
        if u.args[0] is not node or node in node_args(u)[1:]:
            self.reject(f"coupled: reaches {d} through an argument other than its input")
        m = module_of(gm, u)
        name = str(u.target)
        if self.calls.get(name, 0) > 1:
            self.reject(f"coupled: reaches {d}, which is called more than once")
        width = in_width(m)
        if is_depthwise(m):
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
        users = list(u.users)
        if len(users) == 1 and len(users[0].users) == 1 and isinstance(self.shapes.get(u), tuple) \
                and _layout_permute(users[0], len(self.shapes.get(u))) == "to_last":
            ln = next(iter(users[0].users))
            if ln.args and ln.args[0] is users[0] and _channel_layer_norm(gm, ln, self.site.channels):
                # A removed channel holds the conv's bias there; the LayerNorm, computed on the kept
                # channels, ignores it and outputs 0: the depthwise conv loses the channel (ConvNeXt).
                self._check_once([u, ln])
                self.tied_ln.append(u)
                self.layer_norms.append(ln)
                return [(ln, _State(0, 0, st.hi, st.f, last=True))]
        side: list[fx.Node] = []
        p = u
        while True:
            users = list(p.users)
            if len(users) == 1:
                q = users[0]
                qm = module_of(gm, q)
                if isinstance(qm, NORM_TYPES + INSTANCE_NORM_TYPES):
                    side.append(q)
                    p = q
                    continue
                if is_act(gm, q):
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
        if any(not isinstance(module_of(gm, n), NORM_TYPES) for n in side):
            self.reject(f"coupled: depthwise {d} is followed by a norm other than BatchNorm and no "
                        "activation")
        self._check_once([u] + side)
        consumers = []
        for w in p.users:
            m = module_of(gm, w)
            ok = is_layer(gm, w) and isinstance(m, CONV_TYPES) and m.groups == 1 and w.args[0] is p \
                and p not in node_args(w)[1:] and self.calls.get(str(w.target), 0) == 1 and unpadded(m)
            if not ok:
                self.reject(f"coupled: depthwise {d} has no activation after it and feeds {describe(gm, w)} "
                            "(only unpadded convs can absorb the constant it outputs for a removed channel)")
            consumers.append(w)
        for w in consumers:
            self.taps.setdefault(str(w.target), []).append((w, Tap(self.site.name, 0, 0, self.site.channels)))
        self.folds.append((u, side, consumers))
        return []

    # reshaping ops ---------------------------------------------------------------------------------
    def flatten(self, node: fx.Node, st: _State, u: fx.Node, d: str, view: bool = False) -> _State:
        shape_in, shape_out = self.shapes.get(node), self.shapes.get(u)
        m = module_of(self.gm, u)
        if isinstance(m, nn.Flatten):
            ok = m.start_dim == 1 and m.end_dim == -1
        elif view:
            ok = isinstance(shape_in, tuple) and isinstance(shape_out, tuple) and len(shape_out) == 2 \
                and shape_out[0] == shape_in[0] and shape_out[1] == math.prod(shape_in[1:])
        else:
            start = arg(u, 1, "start_dim", 0)
            end = arg(u, 2, "end_dim", -1)
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
        tensors = arg(u, 0, "tensors")
        dim = arg(u, 1, "dim", 0)
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
        dim = arg(u, 2, "dim", 0)
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
                self.reject(f"coupled: the pieces of {d} are used by {describe(self.gm, w)}")
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
        m = module_of(self.gm, u)
        if u.args[0] is not node:
            self.reject(f"coupled: feeds {d} through an argument other than its input")
        if m is not None:
            r = m.upscale_factor if up else m.downscale_factor
        else:
            r = int(arg(u, 1, "upscale_factor" if up else "downscale_factor"))
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
        shape = self.shapes.get(node)
        if self.full(st) and isinstance(shape, tuple) and \
                _channel_param(_param_of(self.gm, other), self.site.channels, len(shape), last=False):
            self.params.append(str(other.target))  # a per-channel scale loses the same channels
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
            if is_layer(self.gm, p):
                break
            ok = is_act(self.gm, p) or (p.op in ("call_function", "call_method") and p.target in (
                operator.add, operator.mul, operator.truediv, "add", "mul", "div") and len(p.args) == 2
                and isinstance(p.args[1], (int, float)))
            if not ok or not isinstance(p.args[0], fx.Node):
                self.reject(f"coupled: the gate of {d} comes from {describe(self.gm, p)}")
            if isinstance(module_of(self.gm, p), nn.PReLU) and module_of(self.gm, p).num_parameters > 1:
                self.reject(f"coupled: the gate of {d} has a per-channel PReLU")
            p = p.args[0]
        gm_ = module_of(self.gm, p)
        if isinstance(gm_, CONV_TYPES) and gm_.groups != 1 or isinstance(gm_, CONVT_TYPES):
            self.reject(f"coupled: the gate of {d} comes from grouped / transposed {describe(self.gm, p)}")
        if self.calls.get(str(p.target), 0) > 1:
            self.reject(f"coupled: the gate layer '{p.target}' is called more than once")
        self.gates.append(p)
        return [(u, st)]


def discover(
    gm: fx.GraphModule,
    exclude: list[str] | tuple[str, ...] = (),
    example_input: torch.Tensor | None = None,
    groups: bool = False,
) -> tuple[list[Site], dict]:
    """Prunable sites of a traced model in forward order, and ``{name: reason}`` for those skipped.

    ``example_input`` gives the tensor shapes needed to follow channels through concatenations,
    splits and flattening views; without it those sites are skipped.

    ``groups``: also find channel groups across residual adds and gating products (see
    :func:`discover_groups`); sites and groups are then returned in forward order of their first
    producer.

    Returns sites together with, for each, where its mask goes (``inserts``: ``(node, collect)``, the
    site's own activation first with ``True``, then tied depthwise activations with ``False``; a
    group's member outputs and statistics points, the latter with their index), the number of
    statistics points and the routes, as a private ``_nodes`` attribute used by :func:`instrument`.
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
        lone = False  # an output without activation (a linear bottleneck): a site only with groups on
        if not is_act(gm, n):
            chain = _lone_end(gm, n, calls) if groups else None
            if chain is None:
                continue
            lone = True
            chain = (chain[0], chain[1], 1, chain[2])
        else:
            try:
                chain = _producer_chain(gm, n, calls)
            except _Reject as e:
                name = str(n.target) if n.op == "call_module" else n.name
                skipped[name] = str(e)
                continue
        if chain is None:
            continue  # e.g. relu after a residual add: not a producer chain
        layer_node, side, repeat, block = chain
        layer = module_of(gm, layer_node)
        pname = str(layer_node.target)
        if pname in claimed:
            continue  # tied depthwise conv or gate of an earlier site
        if any(fnmatch.fnmatchcase(pname, pat) for pat in exclude):
            _skip(skipped, lone, pname, "excluded by pattern")
            continue
        if is_depthwise(layer):
            _skip(skipped, lone, pname, "depthwise conv whose input channels are not prunable")
            continue
        out = out_channels(layer)
        if out % repeat:
            _skip(skipped, lone, pname, "PixelShuffle does not divide the channels")
            continue
        channels = out // repeat
        ashape = shapes.get(n)
        dim = 1
        if isinstance(layer, nn.Linear):
            if channels < 2:
                continue
            if isinstance(ashape, tuple) and len(ashape) > 2:
                dim = -1  # features on the last dim: [N, ..., C] (tokens, channels-last images)
                if side:
                    _skip(skipped, lone, pname, f"a per-channel module on dim 1 ({side[0][0]}) follows the "
                          "channels-last linear layer")
                    continue
        norm = next((s for s, _ in side if isinstance(gm.get_submodule(s), NORM_TYPES)), None)
        site = Site(name=pname, producer=pname, norm=norm, channels=int(channels), side=side,
                    repeat=repeat, block=block, dim=dim)
        bounds: set[int] = set()
        if isinstance(layer, CONV_TYPES) and layer.groups > 1:
            per = out // layer.groups
            if per % repeat:
                _skip(skipped, lone, pname, "grouped conv groups do not align with PixelShuffle blocks")
                continue
            bounds.update(range(0, channels + 1, per // repeat))
        walk = Walk(gm, shapes, calls, site)
        try:
            walk.run(n)
        except _Reject as e:
            _skip(skipped, lone, pname, str(e))
            continue
        why = _finish(site, walk, bounds, claimed, [pname])
        if why:
            _skip(skipped, lone, pname, why)
            continue
        inserts = [(n, True)] + [(a, False) for _, a, _ in walk.tied] + _remasks(gm, walk)
        site._nodes = {"inserts": inserts, "walk": walk, "points": 1,  # type: ignore[attr-defined]
                       "first": layer_node}
        sites.append(site)
    if groups:
        found, why_not = discover_groups(gm, shapes, calls, claimed, exclude)
        skipped.update(why_not)
        for g in found:  # a producer coupled as a site, pruned as a member of a group
            for p in g.producers:
                skipped.pop(p, None)
        sites += found
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        sites.sort(key=lambda s: order[s._nodes["first"]])  # type: ignore[attr-defined]
    return sites, skipped


def _skip(skipped: dict[str, str], lone: bool, name: str, why: str) -> None:
    """Record why a site is not pruned (not for outputs without activation: a classifier is no site)."""
    if not lone:
        skipped[name] = why


def _lone_end(gm: fx.GraphModule, n: fx.Node, calls: dict[str, int]):
    """``(layer_node, side, block)`` when ``n`` ends ``norm*(layer(x))`` and no activation follows."""
    if not (is_layer(gm, n) or isinstance(module_of(gm, n), SIDE_NORM_TYPES)):
        return None
    users = list(n.users)
    if len(users) == 1 and (is_act(gm, users[0]) or isinstance(module_of(gm, users[0]), SIDE_NORM_TYPES)):
        return None  # the chain goes on
    try:
        return _member_chain(gm, n, calls)
    except _Reject:
        return None


def _ln_owner(n: fx.Node) -> str | None:
    """The module holding a LayerNorm's parameters (``nn.LayerNorm`` called, or ``F.layer_norm`` whose
    weight is read from a module, e.g. torchvision's ``LayerNorm2d``)."""
    if n.op == "call_module":
        return str(n.target)
    w = arg(n, 2, "weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return str(w.target).rpartition(".")[0]
    return None  # no parameters: nothing to slice


def _remasks(gm: fx.GraphModule, walk: Walk) -> list[tuple[fx.Node, bool]]:
    """Norms on the way get the mask again after them (a removed channel's shift would be nonzero)."""
    return [(n, False) for n in walk.channelwise if not isinstance(module_of(gm, n), nn.PReLU)]


def _finish(site: Site, walk: Walk, bounds: set[int], claimed: set[str], producers: list[str]) -> str | None:
    """Fill in a site's structure from its walk and claim its modules; the reason it cannot be pruned."""
    channels = site.channels
    owned = [str(t.target) for t, _, _ in walk.tied] + [str(g.target) for g in walk.gates]
    owned += [str(s.target) for _, _, sd in walk.tied for s in sd]
    owned += [str(t.target) for t, _, _ in walk.folds]
    owned += [str(s.target) for _, sd, _ in walk.folds for s in sd]
    owned += [str(n.target) for n in walk.channelwise] + [str(n.target) for n in walk.tied_ln]
    owners = [o for o in map(_ln_owner, walk.layer_norms) if o is not None]
    owned += owners + walk.params
    if any(o in claimed for o in owned) or len(set(owned)) != len(owned):
        return "coupled: shares a depthwise conv, gate or norm with another site"
    if not walk.taps and not walk.tied and not walk.folds:
        return "feeds no conv / linear layer"
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
        return "coupled: split / group boundaries cut through channel blocks"
    if (part or channels) // site.block < 2:
        return "coupled: channels can only be removed all together"
    site.part = part
    claimed.update(producers)
    claimed.update(owned)
    site.tied = [str(t.target) for t, _, _ in walk.tied] + [str(t.target) for t, _, _ in walk.folds]
    site.tied_norms = [str(s.target) for _, _, sd in walk.tied for s in sd]
    site.tied_norms += [str(s.target) for _, sd, _ in walk.folds for s in sd]
    site.tied_norms += [str(n.target) for n in walk.channelwise]
    site.tied += [str(n.target) for n in walk.tied_ln]
    site.layer_norms = owners
    site.params = list(walk.params)
    site.folds = [(str(t.target), [str(n.target) for n in sd], [str(c.target) for c in cs])
                  for t, sd, cs in walk.folds]
    site.gates = [str(g.target) for g in walk.gates]
    site.consumers = list(walk.taps)
    return None


# ------------------------------------------------------------------------------------------- groups
JOIN_FUNCTIONS = {operator.add, torch.add, operator.iadd, operator.mul, torch.mul, operator.imul}
JOIN_METHODS = {"add", "mul"}


def _is_join(shapes: _Shapes, n: fx.Node) -> bool:
    """An elementwise add / product of two tensors of one shape (a residual add or a gate)."""
    if not calls_op(n, JOIN_FUNCTIONS, JOIN_METHODS) or len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    sa = shapes.get(a)
    return isinstance(sa, tuple) and len(sa) >= 2 and sa == shapes.get(b) == shapes.get(n)


def _transparent(gm: fx.GraphModule, shapes: _Shapes, n: fx.Node) -> fx.Node | None:
    """The input of a one-input op that keeps every channel where it is and maps 0 to 0 (between
    members and joins), or ``None``."""
    if calls_op(n, {operator.mul, torch.mul}, {"mul"}) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args  # x * c or c * x with a nonzero number c, or x * g with a per-channel gate g
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            so = shapes.get(n)
            for x, g in ((a, b), (b, a)):
                sg = shapes.get(g)
                if isinstance(sg, tuple) and shapes.get(x) == so and len(sg) == len(so) > 2 \
                        and sg[:2] == so[:2] and all(k == 1 for k in sg[2:]):
                    return x  # the walk checks the gate (its last layer then loses the same channels)
            return None
        x, c = (a, b) if isinstance(a, fx.Node) else (b, a)
        return x if isinstance(x, fx.Node) and isinstance(c, (int, float)) and c else None
    if calls_op(n, {operator.truediv, torch.div}, {"div"}):
        ok = len(n.args) == 2 and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], (int, float))
        return n.args[0] if ok and n.args[1] else None
    if not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if any(shapes.is_tensor(a) for a in node_args(n)[1:] if not is_mode_node(a)):
        return None
    if is_zero_act(gm, n) or isinstance(module_of(gm, n), nn.PReLU):
        return n.args[0]
    if is_pass(gm, n):
        m = module_of(gm, n)
        return None if isinstance(m, nn.Flatten) or n.target in (torch.flatten, "flatten") else n.args[0]
    return None


def _member_chain(gm: fx.GraphModule, end: fx.Node, calls: dict[str, int]):
    """``(layer_node, side, block)`` when ``end`` is ``[act](norm*(layer(x)))`` with private intermediates."""
    if is_act(gm, end):
        chain = _producer_chain(gm, end, calls)
        if chain is None:
            return None
        layer_node, side, repeat, block = chain
        if repeat != 1:
            raise _Reject(f"a PixelShuffle sits between {describe(gm, layer_node)} and the join")
        return layer_node, side, block
    side: list[tuple[str, int]] = []
    block = 1
    p = end
    while True:
        m = module_of(gm, p)
        if isinstance(m, SIDE_NORM_TYPES):
            if isinstance(m, nn.GroupNorm):
                if m.num_groups == 1:
                    raise _Reject(f"{describe(gm, p)} normalizes across all channels")
                block = math.lcm(block, m.num_channels // m.num_groups)
            side.append((str(p.target), 1))
        elif not (_SEE_THROUGH & {getattr(rule_of(gm, p), "name", None)} and p.args):
            break
        p = p.args[0]
        if not isinstance(p, fx.Node) or len(p.users) != 1:
            return None
    if not is_layer(gm, p):
        return None
    for name in [str(p.target)] + [n for n, _ in side]:
        if calls.get(name, 0) > 1:
            raise _Reject(f"module '{name}' is called more than once")
    return p, side, block


def _at(p: fx.Node, collect: bool | int, last: dict[fx.Node, bool]) -> tuple:
    """A mask insertion at ``p``, with ``dim=-1`` where its channels are last (a join's point after its
    activation has the join's layout)."""
    src = p
    while src not in last:
        src = src.args[0]
    return (p, collect, -1) if last[src] else (p, collect)


def _layout_step(gm: fx.GraphModule, shapes: _Shapes, n: fx.Node) -> tuple[fx.Node | None, int]:
    """Going back from a join: ``(input, 1)`` through a layout permute, ``(input, 0)`` through a
    LayerNorm over the channels or a per-channel scale; ``(None, 0)`` otherwise."""
    shape = shapes.get(n)
    if not isinstance(shape, tuple) or not n.args or not isinstance(n.args[0], fx.Node):
        return None, 0
    if _layout_permute(n, len(shape)) is not None:
        return n.args[0], 1
    if _channel_layer_norm(gm, n, shape[-1]):
        return n.args[0], 0
    if calls_op(n, {operator.mul, torch.mul}, {"mul"}) and len(n.args) == 2:
        for x, p in (n.args, n.args[::-1]):
            t = _param_of(gm, p)
            if isinstance(x, fx.Node) and t is not None and \
                    (_channel_param(t, shape[1], len(shape), False) or _channel_param(t, shape[-1], 0, True)):
                return x, 0
    return None, 0


def _layouts(gm: fx.GraphModule, shapes: _Shapes, chains: dict, ends: list[fx.Node],
             edges: list[tuple[fx.Node, fx.Node, int]]) -> dict[fx.Node, bool] | None:
    """Whether each member and join of a group has its channels last; ``None`` when they disagree.

    A member's layout is its own (a linear layer over an N-d tensor: last); joins follow through the
    number of layout permutes between them and their operands' members / joins."""
    last: dict[fx.Node, bool] = {}
    for e in ends:
        shape = shapes.get(e)
        last[e] = isinstance(module_of(gm, chains[e][0]), nn.Linear) and len(shape) > 2
    changed = True
    while changed:
        changed = False
        for j, r, parity in edges:
            for a, b in ((j, r), (r, j)):
                if a in last:
                    want = last[a] != bool(parity)
                    if b not in last:
                        last[b] = want
                        changed = True
                    elif last[b] != want:
                        return None
    return last


def discover_groups(
    gm: fx.GraphModule, shapes: _Shapes, calls: dict[str, int], claimed: set[str],
    exclude: list[str] | tuple[str, ...] = (),
) -> tuple[list[Site], dict[str, str]]:
    """Channel groups: tensors joined by residual adds (or gating products) lose the same channels.

    Every operand of an add / product of two same-shape tensors is traced back, through ops that keep
    channels in place and map 0 to 0 (:func:`_transparent`), to either another join or a *member*: the
    output of a producer chain ``conv/linear -> [norms] -> [activation]``. Joins and members that meet
    form one group. Its mask multiplies every member's output, so a masked channel is zero in every
    tensor of the group (``0 + 0``, ``0 * g``), and the group is walked from all of them to its
    consumers like a site. A group is named ``group:<first member>``; :attr:`Site.members` lists the
    other producers. Statistics are gathered where consumers read the group (each join's output after
    its activation, and members read by anything other than a join), one row per point, so that the
    group's importance can be aggregated over them (see :class:`~prunequant.prune.mask.ChannelMask`).
    Anything else that reaches a join (the network input, a concatenation, a depthwise conv, a
    non-zero-preserving op) leaves the whole group unpruned, with the reason in ``skipped``.
    """
    if not shapes.known:
        return [], {}
    parent: dict[fx.Node, fx.Node] = {}

    def find(x: fx.Node) -> fx.Node:
        while parent.setdefault(x, x) is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: fx.Node, b: fx.Node) -> None:
        parent[find(a)] = find(b)

    joins = [n for n in gm.graph.nodes if _is_join(shapes, n)]
    chains: dict[fx.Node, tuple] = {}  # member end -> (layer node, side, block)
    inner: set[fx.Node] = set()  # transparent nodes between members / joins and joins
    blocked: dict[fx.Node, str] = {}  # component root -> reason (resolved after all unions)
    edges: list[tuple[fx.Node, fx.Node, int]] = []  # (join, root, number of layout permutes between)
    for j in joins:
        find(j)
        for a in j.args:
            n, why, flips = a, None, 0
            while True:
                if n in chains or _is_join(shapes, n):
                    break
                try:
                    chain = _member_chain(gm, n, calls)
                except _Reject as e:
                    why = str(e)
                    break
                if chain is not None:
                    chains[n] = chain
                    break
                src = _transparent(gm, shapes, n)  # (a per-channel PReLU is found again by the walk)
                if src is None:
                    src, flip = _layout_step(gm, shapes, n)
                    flips += flip
                if src is not None:
                    inner.add(n)
                    n = src
                    continue
                why = f"joined with {describe(gm, n)}"
                break
            union(n, j)
            edges.append((j, n, flips % 2))
            if why:
                blocked.setdefault(j, why)
    comps: dict[fx.Node, list[fx.Node]] = {}
    for n in list(parent):
        comps.setdefault(find(n), []).append(n)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    for nodes in sorted(comps.values(), key=lambda ns: min(order[n] for n in ns)):
        nodes.sort(key=order.__getitem__)
        gjoins = [n for n in nodes if n in joins and n not in chains]
        ends = [n for n in nodes if n in chains]
        name = f"group:{chains[ends[0]][0].target}" if ends else f"group:{gjoins[0].name}"
        why = next((blocked[j] for j in gjoins if j in blocked), None)
        if why is None and not ends:
            why = "no conv / linear layer produces these channels"
        if why is not None:
            skipped[name] = f"coupled: {why}" if not why.startswith("coupled") else why
            continue
        last = _layouts(gm, shapes, chains, ends, [e for e in edges if e[0] in set(gjoins)])
        if last is None:
            skipped[name] = "coupled: its tensors put the channels on different dims"
            continue
        layers = [str(chains[e][0].target) for e in ends]
        sides = [x for e in ends for x in chains[e][1]]
        owned = layers + [x for x, _ in sides]
        hit = next((x for x in layers if any(fnmatch.fnmatchcase(x, p) for p in exclude)), None)
        if hit is not None or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            skipped[name] = "excluded by pattern" + (f" (member '{hit}')" if hit else "")
            continue
        if any(o in claimed for o in owned) or len(set(owned)) != len(owned):
            skipped[name] = "coupled: a member belongs to another site or group"
            continue
        widths = {shapes.get(e)[-1 if last[e] else 1] for e in ends}
        if len(widths) != 1:
            skipped[name] = "coupled: members of different widths"
            continue
        mods = {x: gm.get_submodule(x) for x in layers}
        bad = next((x for x, m in mods.items()
                    if is_depthwise(m) or isinstance(m, CONVT_TYPES) and m.groups != 1), None)
        if bad is not None:
            skipped[name] = f"coupled: member '{bad}' is a depthwise or grouped transposed conv"
            continue
        channels = int(widths.pop())
        block = 1
        bounds: set[int] = set()
        for e in ends:
            block = math.lcm(block, chains[e][2])
            m = module_of(gm, chains[e][0])
            if isinstance(m, CONV_TYPES) and m.groups > 1:
                bounds.update(range(0, channels + 1, channels // m.groups))
        norm = next((x for x, _ in sides if isinstance(gm.get_submodule(x), NORM_TYPES)), None)
        site = Site(name=name, producer=layers[0], norm=norm, channels=channels, side=sides, block=block,
                    members=layers[1:], kind="group")
        walk = Walk(gm, shapes, calls, site)
        walk.joins = set(gjoins)
        try:
            walk.run(*ends, *gjoins, last=last)
        except _Reject as e:
            skipped[name] = str(e)
            continue
        why = _finish(site, walk, bounds, claimed, layers + [x for x, _ in sides])
        if why:
            skipped[name] = why
            continue
        # Statistics points: where consumers read the group.
        internal = set(gjoins) | inner
        points: list[fx.Node] = []
        for j in gjoins:
            p = j
            while len(p.users) == 1 and is_zero_act(gm, next(iter(p.users))):
                p = next(iter(p.users))
            points.append(p)
        points += [e for e in ends if any(u not in internal for u in e.users)]
        points = sorted(set(points), key=order.__getitem__)
        index = {p: i for i, p in enumerate(points)}
        inserts = [_at(e, index.get(e, False), last) for e in ends]
        inserts += [_at(p, i, last) for p, i in index.items() if p not in chains] + _remasks(gm, walk)
        site._nodes = {"inserts": inserts, "walk": walk, "points": len(points),  # type: ignore[attr-defined]
                       "first": chains[ends[0]][0]}
        sites.append(site)
    return sites, skipped


__all__ = ["discover", "discover_groups"]
