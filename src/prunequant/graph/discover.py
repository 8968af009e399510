"""Find prunable channels in a traced model and instrument it with masks and quantizers.

A *site* is a prunable activation: the output of a ``conv/linear -> [BatchNorm] -> activation``
chain whose every path leads, through channel-preserving ops only (pooling, dropout, flatten,
identity), into the input of conv / linear layers. Those are the channels a physically smaller
network can drop (producer output channels + consumer input channels). Activations that also feed
a residual add, a concatenation or the network output are *coupled*; they are reported in
``Plan.skipped`` with the reason and are not pruned by this release. The network input and the final
output are never sites.

A depthwise conv (``groups == in == out``) fed by a site is *tied* to that site: the same mask is
applied again after its activation, so the channel disappears from the depthwise conv as well.

Instrumentation (:func:`instrument`) traces the model with ``torch.fx``, inserts a
:class:`~prunequant.prune.mask.ChannelMask` after every site's activation, a
:class:`~prunequant.quant.quantizers.ActQuantizer` on the input of every conv / linear layer and a
:class:`~prunequant.quant.quantizers.WeightQuantizer` as a parametrization of its ``weight``.
The returned ``GraphModule`` shares the parameters of the original model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..prune.mask import ChannelMask
from ..quant.quantizers import ActQuantizer, WeightQuantizer

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = CONV_TYPES + CONVT_TYPES + (nn.Linear,)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.ELU)
ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.elu}
ACT_METHODS = {"relu"}
PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten,
)
PASS_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout, torch.flatten}
PASS_METHODS = {"flatten"}

MASKS_ATTR = "pq_masks"
AQ_ATTR = "pq_act_quant"


class GraphError(ValueError):
    """A model that cannot be traced or instrumented; the message names the op and module."""


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
    tied_norms: list[str] = field(default_factory=list)


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


@dataclass
class Plan:
    """Everything :func:`instrument` decided, kept on the model as ``model.pq_plan``."""

    sites: list[Site]
    layers: dict[str, LayerInfo]
    skipped: dict[str, str]  # activation / producer -> why it is not prunable

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (ChannelMask, ActQuantizer)) or parametrize.is_parametrized(m):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear :class:`GraphError` when it cannot be traced."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types; all mean "not traceable"
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}). Models with "
            "data-dependent control flow in forward() are not supported yet; move that logic out of "
            "forward or exclude the module."
        ) from e
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.pq_original_class = type(model).__name__
    return gm


def _mod(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def _is_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_mod(gm, n), ACT_MODULES)
    if n.op == "call_function":
        return n.target in ACT_FUNCTIONS
    if n.op == "call_method":
        return n.target in ACT_METHODS
    return False


def _is_pass(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_mod(gm, n), PASS_MODULES)
    if n.op == "call_function":
        return n.target in PASS_FUNCTIONS
    if n.op == "call_method":
        return n.target in PASS_METHODS
    return False


def _is_layer(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(_mod(gm, n), LAYER_TYPES)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _producer_chain(gm: fx.GraphModule, act: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """``(layer_node, norm_node)`` when ``act`` = act(norm?(layer(x))) with private intermediates."""
    if not act.args or not isinstance(act.args[0], fx.Node):
        return None
    p = act.args[0]
    norm = None
    if p.op == "call_module" and isinstance(_mod(gm, p), NORM_TYPES):
        if len(p.users) != 1:
            return None
        norm, p = p, p.args[0]
    if not _is_layer(gm, p) or len(p.users) != 1:
        return None
    return p, norm


def _consumers(gm: fx.GraphModule, start: fx.Node) -> tuple[list[fx.Node], str | None]:
    """Layers reached from ``start`` through channel-preserving ops, or a reason it is coupled."""
    found: list[fx.Node] = []
    stack = [(start, u) for u in start.users]
    seen: set[fx.Node] = set()
    while stack:
        parent, u = stack.pop()
        if _is_layer(gm, u):
            if u.args[0] is not parent or parent in u.args[1:]:
                return [], f"reaches {u.target} through an argument other than its input"
            if u not in found:
                found.append(u)
            continue
        if u in seen:
            continue
        seen.add(u)
        if _is_pass(gm, u):
            stack.extend((u, w) for w in u.users)
        else:
            what = u.target if u.op != "call_function" else getattr(u.target, "__name__", str(u.target))
            return [], f"coupled: feeds {u.op} {what}"
    if not found:
        return [], "feeds no conv / linear layer"
    return found, None


def discover(gm: fx.GraphModule, exclude: list[str] | tuple[str, ...] = ()) -> tuple[list[Site], dict]:
    """Prunable sites of a traced model in forward order, and ``{name: reason}`` for those skipped.

    Returns sites together with, for each, the activation nodes that carry its mask (the site's own
    activation first, then those of tied depthwise convs) and consumer nodes, as a private
    ``_nodes`` attribute used by :func:`instrument`.
    """
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    act_to_site: dict[fx.Node, Site] = {}
    for n in gm.graph.nodes:
        if not _is_act(gm, n):
            continue
        chain = _producer_chain(gm, n)
        if chain is None:
            continue  # e.g. relu after a residual add: not a producer chain
        layer_node, norm_node = chain
        layer = _mod(gm, layer_node)
        pname = str(layer_node.target)
        # Depthwise conv fed by a site's mask: the same channels, tie it to that site.
        if _is_depthwise(layer):
            src = layer_node.args[0]
            while isinstance(src, fx.Node) and _is_pass(gm, src):
                src = src.args[0]
            if isinstance(src, fx.Node) and src in act_to_site:
                owner = act_to_site[src]
                owner.tied.append(pname)
                if norm_node is not None:
                    owner.tied_norms.append(str(norm_node.target))
                owner._nodes["acts"].append(n)  # type: ignore[attr-defined]
                act_to_site[n] = owner
                continue
        if any(fnmatch.fnmatchcase(pname, pat) for pat in exclude):
            skipped[pname] = "excluded by pattern"
            continue
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if isinstance(layer, nn.Linear) and channels < 2:
            continue
        site = Site(name=pname, producer=pname, norm=str(norm_node.target) if norm_node else None,
                    channels=int(channels))
        site._nodes = {"acts": [n]}  # type: ignore[attr-defined]
        act_to_site[n] = site
        sites.append(site)
    # Consumers are checked once all ties are known (a tied act's users are consumers too).
    valid: list[Site] = []
    for site in sites:
        consumers: list[fx.Node] = []
        reason = None
        for act in site._nodes["acts"]:  # type: ignore[attr-defined]
            found, why = _consumers(gm, act)
            if why:
                reason = why
                break
            consumers += [c for c in found if str(c.target) not in site.tied]
        if reason:
            skipped[site.name] = reason
            continue
        if any(_is_depthwise(_mod(gm, c)) for c in consumers):
            skipped[site.name] = "feeds a depthwise conv whose output is not prunable"
            continue
        site.consumers = [str(c.target) for c in consumers]
        valid.append(site)
    return valid, skipped


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
) -> tuple[fx.GraphModule, Plan]:
    """Trace ``model`` and insert masks (when ``prune_stat`` is not None) and quantizers.

    Args:
        prune_stat: statistic the masks gather ("a_l1", "a_l0", or "none" for weight / random
            importance); ``None`` inserts no masks.
        exclude: fnmatch patterns of producer names never pruned.
        weight_bits / act_bits: global bit-widths; ``None`` leaves that part in floating point.
        layer_bits: ``{pattern: {"weight_bits": b|None, "act_bits": b|None}}`` per-layer overrides
            (``act_bits`` is the bit-width of that layer's *input*).
    """
    gm = trace(model)
    graph = gm.graph
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    if prune_stat is not None:
        sites, skipped = discover(gm, exclude)
    layers: dict[str, LayerInfo] = {}
    layer_nodes = [n for n in graph.nodes if _is_layer(gm, n)]
    for n in layer_nodes:
        m = _mod(gm, n)
        kind = "linear" if isinstance(m, nn.Linear) else ("convT" if isinstance(m, CONVT_TYPES) else "conv")
        layers[str(n.target)] = LayerInfo(name=str(n.target), kind=kind, depthwise=_is_depthwise(m))

    # Masks.
    for site in sites:
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
        for c in site.consumers:
            layers[c].input_site = site.name
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
                m, "weight", WeightQuantizer(info.weight_bits, channels, axis, power_of_two),
                unsafe=True,
            )
        if info.act_bits is not None:
            by_input.setdefault(n.args[0], []).append(n)
    for src, users in by_input.items():
        bits = max(layers[str(u.target)].act_bits for u in users)
        name = f"{AQ_ATTR}.{_safe(str(users[0].target))}"
        gm.add_submodule(name, ActQuantizer(bits))
        with graph.inserting_before(users[0]):
            q = graph.call_module(name, (src,))
        for u in users:
            u.replace_input_with(src, q)
            layers[str(u.target)].act_quant = name
            layers[str(u.target)].act_bits = bits
    graph.lint()
    gm.recompile()
    plan = Plan(sites=sites, layers=layers, skipped=skipped)
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
    "GraphError", "LayerInfo", "Plan", "Site", "discover", "instrument", "raw_weight", "trace",
    "weight_quantizer",
]
