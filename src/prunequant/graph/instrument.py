"""Instrumentation (:func:`instrument`) traces the model with ``torch.fx``, inserts a
:class:`~prunequant.prune.mask.ChannelMask` after every site's activation, a
:class:`~prunequant.quant.quantizers.ActQuantizer` on the input of every conv / linear layer and a
:class:`~prunequant.quant.quantizers.WeightQuantizer` as a parametrization of its ``weight``.
The returned ``GraphModule`` shares the parameters of the original model and follows
``.train()`` / ``.eval()`` like it: ops that take the mode (dropouts, stochastic depth, functional
norms) read the GraphModule's flags when it runs, not the mode it was traced in (see :func:`trace`).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..prune.mask import GROUP_AGGREGATES, ChannelMask
from ..quant.quantizers import WEIGHT_CLIPS, ActQuantizer, WeightQuantizer, check_percentile
from .discover import Walk, discover
from .masking import place_mask
from .ops import CONVT_TYPES, in_width, is_depthwise, is_layer, module_of
from .plan import LayerInfo, Plan, Rewrite, Site
from .trace import trace

MASKS_ATTR = "pq_masks"
AQ_ATTR = "pq_act_quant"


def _match(name: str, table: dict) -> object | None:
    """Value of the last pattern in ``table`` that matches ``name`` (later entries win)."""
    hit = None
    for pat, val in table.items():
        if fnmatch.fnmatchcase(name, pat):
            hit = val
    return hit


def _safe(name: str) -> str:
    return name.replace(".", "_").replace(":", "_")


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
    groups: bool = False,
    group_stat: str = "mean",
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
        groups: also prune channel groups across residual adds and gating products (every tensor
            joined by an add loses the same channels; see :func:`~prunequant.graph.discover.discover_groups`).
            Off by default: the paper prunes block-internal channels only.
        group_stat: how a group's importance combines its statistics points, ``"mean"`` or ``"max"``
            (see :class:`~prunequant.prune.mask.ChannelMask`).
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
    overrides = layer_bits or {}
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for n in layer_nodes:
        info = layers[str(n.target)]
        o = _match(info.name, overrides) or {}
        info.weight_bits = o.get("weight_bits", weight_bits) if isinstance(o, dict) else weight_bits
        info.act_bits = o.get("act_bits", act_bits) if isinstance(o, dict) else act_bits
        if info.weight_bits is not None:
            m = module_of(gm, n)
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


__all__ = ["AQ_ATTR", "MASKS_ATTR", "instrument", "raw_weight", "weight_quantizer"]
