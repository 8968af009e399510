"""Physically remove pruned channels: a masked model becomes a smaller dense one, same function.

:func:`shrink` reads the plan that :func:`~prunequant.graph.discover.instrument` left on the model
(``model.pq_plan``) and the current 0/1 masks, and for every site

* keeps only the unmasked output channels of the producer (conv: weight axis 0; transposed conv:
  axis 1; linear: rows; bias), of the per-channel modules between it and the activation
  (BatchNorm / InstanceNorm weights and running statistics, GroupNorm with its group count,
  per-channel PReLU; blocks of ``r**2`` channels before a PixelShuffle), of tied depthwise convs
  (``groups`` updated) and their norms, and of the layers that compute a per-channel gate for it;
* keeps only the matching input channels of every consumer (conv: weight axis 1, grouped convs per
  group; transposed conv: axis 0; linear: the block of features of each channel after a flatten),
  at the channel offset the site has there (concatenations);
* rewrites split sizes, ``x[:, a:b]`` bounds and flattening views to the new channel counts;
* removes the mask from the graph (the :class:`~prunequant.prune.mask.ChannelMask` module stays as an
  all-ones record of the kept channels, so :func:`prunequant.measure` and ``state_dict`` still work);
* slices quantizer state with the channels: a producer's per-channel weight scale statistics
  (``WeightQuantizer.stat_sum``) follow its output channels; consumers keep their (per output
  channel or per tensor) scales unchanged; activation quantizers are per tensor and unchanged.

A masked channel is exactly zero wherever the plan says it is consumed, so the smaller network
computes the same function up to floating-point summation order.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import GraphError
from ..prune.mask import ChannelMask, masked_layer_norm
from .instrument import weight_quantizer
from .ops import CONV_TYPES, CONVT_TYPES, INSTANCE_NORM_TYPES, NORM_TYPES
from .plan import Plan, Site, Tap, kept_positions


def _param(old: torch.Tensor | None, new: torch.Tensor) -> nn.Parameter:
    rg = old.requires_grad if old is not None else True
    return nn.Parameter(new.detach().clone().contiguous(), requires_grad=rg)


def _set_weight(m: nn.Module, w: torch.Tensor) -> None:
    if parametrize.is_parametrized(m, "weight"):
        plist = m.parametrizations["weight"]
        plist.original = _param(plist.original, w)
    else:
        m.weight = _param(m.weight, w)


def _raw(m: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations["weight"].original.detach()
    return m.weight.detach()


def _freeze_scale(m: nn.Module) -> None:
    """Pin a weight quantizer's scale before its weight changes (no-op when it has statistics)."""
    wq = weight_quantizer(m)
    if wq is not None and bool(wq.enabled) and wq.stat_count <= 0:
        wq.observe(_raw(m))


def _slice_out(m: nn.Module, idx: torch.Tensor, name: str) -> None:
    """Keep output channels ``idx`` of a conv / transposed conv / linear layer."""
    w = _raw(m)
    idx = idx.to(w.device)
    wq = weight_quantizer(m)
    if wq is not None and bool(wq.enabled) and wq.stat_count <= 0:
        wq.observe(w)
    if isinstance(m, CONVT_TYPES):
        if m.groups != 1:
            raise GraphError(f"cannot shrink grouped transposed conv '{name}'")
        _set_weight(m, w[:, idx])
        m.out_channels = len(idx)
    elif isinstance(m, CONV_TYPES):
        if m.groups > 1 and len(idx) % m.groups:
            raise GraphError(f"kept channels of grouped conv '{name}' are not balanced across groups")
        _set_weight(m, w[idx])
        m.out_channels = len(idx)
    elif isinstance(m, nn.Linear):
        _set_weight(m, w[idx])
        m.out_features = len(idx)
    else:
        raise GraphError(f"cannot shrink module '{name}' ({type(m).__name__}): not a conv / linear layer")
    if m.bias is not None:
        m.bias = _param(m.bias, m.bias.detach()[idx])
    if wq is not None and wq.per_channel:
        wq.stat_sum = wq.stat_sum[idx.to(wq.stat_sum.device)].clone()


def _slice_in(m: nn.Module, keep: torch.Tensor, name: str) -> None:
    """Keep input positions where ``keep`` is True (channels, or features of a linear layer)."""
    w = _raw(m)
    _freeze_scale(m)
    pos = keep.nonzero().flatten().to(w.device)
    if isinstance(m, nn.Linear):
        _set_weight(m, w[:, pos])
        m.in_features = len(pos)
    elif isinstance(m, CONVT_TYPES):
        _set_weight(m, w[pos])
        m.in_channels = len(pos)
    elif isinstance(m, CONV_TYPES):
        g = m.groups
        if g == 1:
            _set_weight(m, w[:, pos])
        else:
            per_in = m.in_channels // g
            kept = keep.reshape(g, per_in)
            counts = kept.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise GraphError(f"kept input channels of grouped conv '{name}' are not balanced across "
                                 "groups")
            local = torch.stack([r.nonzero().flatten() for r in kept])  # [g, new_per_in]
            per_out = m.out_channels // g
            rows = local.repeat_interleave(per_out, dim=0).to(w.device)  # [out, new_per_in]
            index = rows.reshape(rows.shape + (1,) * (w.dim() - 2)).expand(-1, -1, *w.shape[2:])
            _set_weight(m, torch.gather(w, 1, index))
        m.in_channels = len(pos)
        if len(pos) == 0:
            raise GraphError(f"every input channel of '{name}' would be removed")
    else:
        raise GraphError(f"cannot shrink module '{name}' ({type(m).__name__}): not a conv / linear layer")


def _slice_channelwise(m: nn.Module, idx: torch.Tensor, name: str) -> None:
    """Keep channels ``idx`` of a norm layer or a per-channel PReLU."""
    if isinstance(m, NORM_TYPES + INSTANCE_NORM_TYPES):
        if m.weight is not None:
            m.weight = _param(m.weight, m.weight.detach()[idx])
            m.bias = _param(m.bias, m.bias.detach()[idx])
        if m.running_mean is not None:
            m.running_mean = m.running_mean[idx].clone()
            m.running_var = m.running_var[idx].clone()
        m.num_features = len(idx)
    elif isinstance(m, nn.GroupNorm):
        size = m.num_channels // m.num_groups
        if len(idx) % size:
            raise GraphError(f"kept channels of GroupNorm '{name}' are not whole groups")
        if m.weight is not None:
            m.weight = _param(m.weight, m.weight.detach()[idx])
            m.bias = _param(m.bias, m.bias.detach()[idx])
        m.num_channels = len(idx)
        m.num_groups = len(idx) // size
    elif isinstance(m, nn.PReLU):
        if m.num_parameters > 1:
            m.weight = _param(m.weight, m.weight.detach()[idx])
            m.num_parameters = len(idx)
    else:
        raise GraphError(f"cannot shrink module '{name}' ({type(m).__name__})")


def _slice_depthwise(m: nn.Module, idx: torch.Tensor) -> None:
    w = _raw(m)
    wq = weight_quantizer(m)
    if wq is not None and bool(wq.enabled) and wq.stat_count <= 0:
        wq.observe(w)
    _set_weight(m, w[idx.to(w.device)])
    if m.bias is not None:
        m.bias = _param(m.bias, m.bias.detach()[idx])
    m.in_channels = m.out_channels = m.groups = len(idx)
    if wq is not None and wq.per_channel:
        wq.stat_sum = wq.stat_sum[idx.to(wq.stat_sum.device)].clone()


def _fold(gm, plan, site: Site, mask: torch.Tensor, dw: str, norms: list[str], consumers: list[str]) -> None:
    """Add what removed channels contribute after ``dw -> norms`` (a constant each) to consumer biases.

    A masked channel is zero before the depthwise conv, so after it the channel holds the conv bias
    everywhere, and after the (eval-mode) BatchNorms a per-channel constant. An unpadded conv reading
    it adds ``sum(W[:, c]) * const_c`` to every output; with the channel removed that sum moves into
    its bias, or, when it has none and feeds only a BatchNorm, into that norm's running mean (so no
    parameter is added). Quantizers are applied as in the masked model (fake-quantized weight, the
    activation quantizer on the constant). Exact in eval mode.
    """
    gone = mask == 0
    if not bool(gone.any()):
        return
    conv = gm.get_submodule(dw)
    dims = _raw(conv).dim() - 2
    c = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(site.channels)
    y = c.reshape(1, -1, *([1] * dims))
    for n in norms:
        bn = gm.get_submodule(n)
        was = bn.training
        bn.eval()
        y = bn(y)
        bn.train(was)
    for name in consumers:
        m = gm.get_submodule(name)
        v = y
        aq_name = plan.layers[name].act_quant
        if aq_name:
            aq = gm.get_submodule(aq_name)
            was = aq.training
            aq.eval()
            v = aq(v)
            aq.train(was)
        w = m.weight.detach()  # fake-quantized when its quantizer is enabled
        v = v.reshape(-1).to(w.dtype)
        g = gone.to(w.device)
        delta = (w[:, g].reshape(w.shape[0], int(g.sum()), -1).sum(dim=2) * v[g]).sum(dim=1)
        if m.bias is not None:
            m.bias = _param(m.bias, m.bias.detach() + delta)
            continue
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
        users = list(node.users)
        bn = gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if isinstance(bn, NORM_TYPES) and bn.running_mean is not None:
            bn.running_mean -= delta.to(bn.running_mean)  # BN(y + d) == BN'(y) with mean - d
        else:
            m.bias = nn.Parameter(delta.clone())


def _unmask_layer_norm(gm: fx.GraphModule, node: fx.Node, kept: list[int]) -> None:
    """A :func:`~prunequant.prune.mask.masked_layer_norm` node becomes ``F.layer_norm`` over the
    ``kept`` channels, its parameters (``get_attr`` of a LayerNorm module's weight / bias) sliced."""
    x, _, w, b, eps, mask = node.args
    for p in (w, b):
        if isinstance(p, fx.Node):
            owner_name, _, attr = str(p.target).rpartition(".")
            owner = gm.get_submodule(owner_name)
            old = getattr(owner, attr)
            setattr(owner, attr, _param(old, old.detach()[kept]))
            if hasattr(owner, "normalized_shape"):
                owner.normalized_shape = (len(kept),)
    node.target = F.layer_norm
    node.args = (x, (len(kept),), w, b, eps)
    if isinstance(mask, fx.Node) and not mask.users:
        gm.graph.erase_node(mask)


def _expand(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Channel indices -> indices of the ``k`` consecutive channels each one stands for."""
    if k == 1:
        return idx
    return (idx[:, None] * k + torch.arange(k)).reshape(-1)


def _check_mask(site: Site, m: torch.Tensor) -> None:
    if not bool(((m == 0) | (m == 1)).all()):
        raise GraphError(f"mask of site '{site.name}' is not binary; shrink needs 0/1 masks")
    keep = m != 0
    if site.block > 1:
        b = keep.reshape(-1, site.block)
        if bool((b.any(dim=1) != b.all(dim=1)).any()):
            raise GraphError(f"mask of site '{site.name}' splits blocks of {site.block} channels that "
                             "must be removed together (respect Site.block)")
    if site.part:
        counts = keep.reshape(-1, site.part).sum(dim=1)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise GraphError(f"mask of site '{site.name}' removes different numbers of channels from the "
                             f"partitions of {site.part} channels that must stay balanced (grouped convs / "
                             "splits), or empties one")
    if not bool(keep.any()):
        raise GraphError(f"mask of site '{site.name}' removes every channel")


def _new_taps(taps: list[Tap], keep: torch.Tensor, masks: dict[str, torch.Tensor]) -> list[Tap]:
    out = []
    for t in taps:
        m = masks[t.site] != 0
        out.append(Tap(t.site, int(keep[:t.offset].sum()), int(m[:t.lo].sum()), int(m[:t.hi].sum()),
                       t.num, t.den))
    return out


def shrink(model: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """Return a physically smaller copy of an instrumented model that computes the same function.

    Args:
        model: a ``GraphModule`` returned by :func:`~prunequant.graph.instrument` (or
            ``Compressor.model`` / ``Compressor.finalize()``), with 0/1 masks (normally frozen).
        inplace: modify ``model`` itself instead of a deep copy.

    The result keeps its quantizers (with their calibrated statistics) and its ``pq_plan``, updated
    to the smaller channel counts, so :func:`prunequant.measure` gives the same numbers as on the
    masked model. Raises :class:`GraphError` when a mask violates the site's structure (blocks,
    balanced partitions) or the model has no plan.
    """
    plan: Plan | None = getattr(model, "pq_plan", None)
    if plan is None or not isinstance(model, fx.GraphModule):
        raise GraphError("shrink() needs a model instrumented by prunequant (a GraphModule with pq_plan)")
    if inplace:
        gm = model
    else:
        gm = copy.deepcopy(model)
        for attr in ("pq_original_class", "pq_leaves"):
            if hasattr(model, attr):
                setattr(gm, attr, copy.deepcopy(getattr(model, attr)))
        plan = copy.deepcopy(plan)
    masks: dict[str, torch.Tensor] = {}
    mods: dict[str, ChannelMask] = {}
    for s in plan.sites:
        cm = gm.get_submodule(s.mask)
        if not isinstance(cm, ChannelMask):
            raise GraphError(f"'{s.mask}' is not a ChannelMask; was the model instrumented by prunequant?")
        m = cm.mask.detach().cpu()
        _check_mask(s, m)
        masks[s.name] = m
        mods[s.name] = cm

    with torch.no_grad():
        # Constants of removed channels after depthwise convs without activation, into consumer biases.
        for s in plan.sites:
            for dw, norms, consumers in s.folds:
                _fold(gm, plan, s, masks[s.name], dw, norms, consumers)
        # Producer side.
        for s in plan.sites:
            idx = (masks[s.name] != 0).nonzero().flatten()
            for p in s.producers:
                _slice_out(gm.get_submodule(p), _expand(idx, s.repeat), p)
            for name, k in s.side:
                _slice_channelwise(gm.get_submodule(name), _expand(idx, k), name)
            for t in s.tied:
                _slice_depthwise(gm.get_submodule(t), idx)
            for t in s.tied_norms:
                _slice_channelwise(gm.get_submodule(t), idx, t)
            for g in s.gates:
                _slice_out(gm.get_submodule(g), idx, g)
            for name in s.params:  # per-channel scales: the axis of the channels
                owner_name, _, attr = name.rpartition(".")
                owner = gm.get_submodule(owner_name)
                old = getattr(owner, attr)
                axis = 1 if old.dim() > 1 and old.shape[0] == 1 else 0
                setattr(owner, attr, _param(old, old.detach().index_select(axis, idx.to(old.device))))
        # Consumer side.
        for name, info in plan.layers.items():
            if not info.input_taps:
                continue
            keep = kept_positions(info.in_width, info.input_taps, masks)
            _slice_in(gm.get_submodule(name), keep, name)
            info.input_taps = _new_taps(info.input_taps, keep, masks)
            info.in_width = int(keep.sum())

    # Graph: rewrite channel-count-dependent nodes, drop the masks.
    graph = gm.graph
    mask_targets = {s.mask for s in plan.sites}
    by_mask = {f"{s.mask}.mask": s for s in plan.sites}
    for node in list(graph.nodes):
        rw = plan.rewrites.get(node.name)
        if rw is not None:
            _rewrite(graph, node, rw, masks)
        elif node.op == "call_function" and node.target is masked_layer_norm:
            s = by_mask[str(node.args[5].target)]
            _unmask_layer_norm(gm, node, (masks[s.name] != 0).nonzero().flatten().tolist())
        elif node.op == "call_module" and node.target in mask_targets:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    gm.recompile()

    # Plan and mask records.
    for s in plan.sites:
        m = masks[s.name] != 0
        k = int(m.sum())
        idx = m.nonzero().flatten().tolist()
        s.kept = idx if s.kept is None else [s.kept[i] for i in idx]
        if s.original_channels is None:
            s.original_channels = s.channels
        if s.part:
            s.part = s.part * k // s.channels
            if s.part == k:
                s.part = 0
        old = mods[s.name]
        rec = ChannelMask(k, stat=old.stat, points=old.points, aggregate=old.aggregate, dim=old.dim)
        rec.stat_sum.copy_(old.stat_sum.detach().cpu()[..., m])
        rec.stat_count.copy_(old.stat_count)
        rec.frozen.fill_(True)
        rec.to(old.mask.device)
        gm.add_submodule(s.mask, rec)
        s.channels = k
    for name, info in plan.layers.items():
        m = gm.get_submodule(name)
        info.in_width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
    plan.shrunk = True
    gm.pq_plan = plan
    return gm


def _rewrite(graph: fx.Graph, node: fx.Node, rw, masks: dict[str, torch.Tensor]) -> None:
    if rw.kind == "flatten":
        node.op, node.target = "call_function", torch.flatten
        node.args, node.kwargs = (node.args[0], 1), {}
        return
    keep = kept_positions(rw.width, rw.taps, masks)
    cum = torch.cat([torch.zeros(1, dtype=torch.long), keep.long().cumsum(0)])
    if rw.kind == "split":
        edges = [0]
        for s in rw.sizes:
            edges.append(edges[-1] + s)
        sizes = [int(cum[b] - cum[a]) for a, b in zip(edges[:-1], edges[1:])]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes), {"dim": 1}
        rw.sizes = sizes
    elif rw.kind == "slice":
        a, b = rw.sizes
        na, nb = int(cum[a]), int(cum[b])
        idx = list(node.args[1])
        idx[1] = slice(na, nb, None)
        node.args = (node.args[0], tuple(idx))
        rw.sizes = [na, nb]
    else:
        raise GraphError(f"unknown rewrite {rw.kind!r} for node {node.name}")
    rw.taps = _new_taps(rw.taps, keep, masks)
    rw.width = int(keep.sum())


__all__ = ["shrink"]
