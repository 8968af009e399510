"""Instrumentation (:func:`instrument`) traces the model with ``torch.fx``, inserts a
:class:`~prunequant.prune.mask.ChannelMask` after every site's activation and, where a
:class:`~prunequant.quant.policy.QuantPolicy` gives a layer bits, the activation quantizer it returns
on the layer's input and its weight quantizer as a parametrization of the layer's ``weight``.
The returned ``GraphModule`` shares the parameters of the original model and follows
``.train()`` / ``.eval()`` like it: ops that take the mode (dropouts, stochastic depth, functional
norms) read the GraphModule's flags when it runs, not the mode it was traced in (see :func:`trace`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..prune.mask import GROUP_AGGREGATES, ChannelMask
from ..quant.policy import QuantPolicy, find_weight_quantizer
from .discover import Walk, discover
from .masking import place_mask
from .ops import CONVT_TYPES, in_width, is_depthwise, is_layer, module_of
from .plan import LayerInfo, Plan, Rewrite, Site
from .trace import trace

MASKS_ATTR = "pq_masks"
AQ_ATTR = "pq_act_quant"


#: the quantizer keywords :func:`instrument` still takes (they build a :class:`QuantPolicy`).
LEGACY_QUANT_KEYWORDS = ("weight_bits", "act_bits", "power_of_two", "layer_bits", "act_percentile",
                         "weight_clip", "weight_range")


def _policy(quant: QuantPolicy | None, legacy: dict[str, Any]) -> QuantPolicy:
    unknown = [k for k in legacy if k not in LEGACY_QUANT_KEYWORDS]
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise TypeError(f"instrument() got unexpected keyword argument{s} {', '.join(map(repr, unknown))}")
    if quant is None:
        return QuantPolicy(**legacy)
    if legacy:
        raise TypeError(f"instrument(): pass either quant= or the quantizer keywords, not both "
                        f"(got quant= and {sorted(legacy)})")
    if not isinstance(quant, QuantPolicy):
        raise TypeError(f"instrument(): quant must be a QuantPolicy, got {type(quant).__name__}")
    return quant


def _safe(name: str) -> str:
    return name.replace(".", "_").replace(":", "_")


def instrument(
    model: nn.Module,
    *,
    prune_stat: str | None = "a_l1",
    exclude: list[str] | tuple[str, ...] = (),
    example_input: torch.Tensor | None = None,
    groups: bool = False,
    group_stat: str = "mean",
    quant: QuantPolicy | None = None,
    **legacy: Any,
) -> tuple[fx.GraphModule, Plan]:
    """Trace ``model`` and insert masks (when ``prune_stat`` is not None) and quantizers.

    Args:
        prune_stat: statistic the masks gather ("a_l1", "a_l0", or "none" for weight / random
            importance); ``None`` inserts no masks.
        exclude: fnmatch patterns of producer names never pruned (and of submodules that cannot be
            traced, which are then kept as opaque calls).
        example_input: a batch used to record tensor shapes; needed to follow channels through
            concatenations, splits and views (without it those activations are not pruned).
        groups: also prune channel groups across residual adds and gating products (every tensor
            joined by an add loses the same channels; see :func:`~prunequant.graph.discover.discover_groups`).
            Off by default: the paper prunes block-internal channels only.
        group_stat: how a group's importance combines its statistics points, ``"mean"`` or ``"max"``
            (see :class:`~prunequant.prune.mask.ChannelMask`).
        quant: the bits and quantizers of every layer; ``None``: built from the legacy keywords
            ``weight_bits``, ``act_bits``, ``power_of_two``, ``layer_bits``, ``act_percentile``,
            ``weight_clip``, ``weight_range`` (the :class:`QuantPolicy` fields; not with ``quant``),
            and without them nothing is quantized.
    """
    policy = _policy(quant, legacy)
    options = {"prune_stat": prune_stat, "exclude": list(exclude), **policy.options()}
    if groups:
        if group_stat not in GROUP_AGGREGATES:
            raise ValueError(f"group_stat must be one of {list(GROUP_AGGREGATES)}, got {group_stat!r}")
        options["groups"] = True
        options["group_stat"] = group_stat
    gm = trace(model, exclude)
    graph = gm.graph
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    if prune_stat is not None:
        sites, skipped = discover(gm, exclude, example_input, groups=groups)
    layers: dict[str, LayerInfo] = {}
    layer_nodes = [n for n in graph.nodes if is_layer(gm, n)]
    for n in layer_nodes:
        m = module_of(gm, n)
        kind = "linear" if isinstance(m, nn.Linear) else ("convT" if isinstance(m, CONVT_TYPES) else "conv")
        layers[str(n.target)] = LayerInfo(name=str(n.target), kind=kind, depthwise=is_depthwise(m),
                                          in_width=in_width(m))

    # Masks.
    rewrites: dict[str, Rewrite] = {}
    for site in sites:
        walk: Walk = site._nodes["walk"]  # type: ignore[attr-defined]
        site.mask = f"{MASKS_ATTR}.{_safe(site.name)}"
        gm.add_submodule(site.mask, ChannelMask(site.channels, stat=prune_stat or "none",
                                                points=site._nodes["points"],  # type: ignore[attr-defined]
                                                aggregate=group_stat, dim=site.dim))
        place_mask(gm, site, site._nodes["inserts"], walk.layer_norms)  # type: ignore[attr-defined]
        for p in site.producers:
            layers[p].output_site = site.name
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
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for n in layer_nodes:
        info = layers[str(n.target)]
        info.weight_bits, info.act_bits = policy.bits(info.name)
        m = module_of(gm, n)
        wq = policy.weight_quantizer(m, info.kind, info.weight_bits)
        if wq is not None:
            parametrize.register_parametrization(m, "weight", wq, unsafe=True)
        if info.act_bits is not None:
            by_input.setdefault(n.args[0], []).append(n)
    for src, users in by_input.items():
        bits = max(layers[str(u.target)].act_bits for u in users)
        name = f"{AQ_ATTR}.{_safe(str(users[0].target))}"
        gm.add_submodule(name, policy.act_quantizer(bits))
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


#: the :class:`~prunequant.quant.quantizers.WeightQuantizer` parametrizing ``module.weight``, if any.
weight_quantizer = find_weight_quantizer


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The unquantized weight tensor of a (possibly parametrized) layer."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


__all__ = ["AQ_ATTR", "LEGACY_QUANT_KEYWORDS", "MASKS_ATTR", "instrument", "raw_weight", "weight_quantizer"]
