"""Cost of a (masked, quantized or plain) model: METHOD section 6.

Definitions (per sample, i.e. batch size 1):

* ``params``: parameters that remain once pruned channels are removed (conv / linear weights and
  biases, norm affine parameters of pruned channels; everything else counted whole).
* ``macs``: multiply-accumulates of conv / linear layers over remaining channels (FLOPs = 2 x MACs).
* ``bops``: sum over layers of MACs x weight bits x input-activation bits (32 for float).
* ``weight_mbit``: conv / linear weight elements that remain x their bit-width / 1e6 (biases and
  norm parameters are kept in higher precision and reported in ``params`` only).
* ``act_mbit``: elements of every tensor that enters a conv / linear layer (each tensor once), over
  remaining channels, x its bit-width / 1e6. This is ``#act * b_a * (1 - s_a)`` of the paper.
* ``memory_mbit = weight_mbit + act_mbit``; performance ``density = metric / memory_mbit``.

These are the paper's definitions. A deployed integer model also keeps a few float32 numbers per
channel beside its b-bit weights, which ``weight_mbit`` leaves out; for BatchNorm-heavy nets at low
bit-widths they are not small (ResNet-20 / MobileNetV2 pruned to 50 %: 7-27 % of ``weight_mbit`` at 4
and 2 bits, docs/export.md), so they are reported separately:

* ``scale_bias_mbit``: those numbers in the folded form integer inference uses (what
  ``save_packed(..., fold_bn=True)`` writes), 32 bits each: one scale per quantized weight channel
  (one per tensor for per-tensor scales), one bias per remaining output channel of a layer that has
  a bias or feeds a BatchNorm (the conv bias, the BatchNorm's scale and shift fold into the channel's
  weight scale and bias), a scale and a shift per remaining channel of an affine norm that does not
  directly follow a layer, and a range pair per enabled activation quantizer.
* ``deploy_weight_mbit = weight_mbit + scale_bias_mbit``: what the deployed weights occupy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..graph.instrument import raw_weight, weight_quantizer
from ..graph.ops import CONVT_TYPES, LAYER_TYPES, NORM_TYPES, SIDE_NORM_TYPES
from ..graph.plan import Plan
from ..prune.mask import ChannelMask
from ..quant.quantizers import ActQuantizer
from ..utils import eval_mode

FLOAT_BITS = 32


@dataclass
class LayerCost:
    """Per-layer numbers behind :class:`Measurement`."""

    name: str
    macs: int
    weights: int
    weight_bits: int
    act_bits: int
    act_elements: int
    in_fraction: float
    out_fraction: float
    scale_bias: int = 0


@dataclass
class Measurement:
    """Params, MACs, BOPs and memory of a model on one sample."""

    params: int
    macs: int
    bops: int
    weight_mbit: float
    act_mbit: float
    memory_mbit: float
    scale_bias_mbit: float = 0.0
    deploy_weight_mbit: float = 0.0
    layers: list[LayerCost] = field(default_factory=list)

    def density(self, metric: float) -> float:
        """Performance density: ``metric / memory_mbit`` (e.g. accuracy % per Mbit)."""
        return float(metric) / self.memory_mbit if self.memory_mbit > 0 else float("nan")

    def as_dict(self, with_layers: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_layers:
            d.pop("layers")
        return d


def _site_fractions(model: nn.Module, plan: Plan | None) -> tuple[dict[str, float], dict[str, float]]:
    """``{site name: kept fraction}`` and ``{norm module: kept fraction}``."""
    site_frac: dict[str, float] = {}
    norm_frac: dict[str, float] = {}
    if plan is None:
        return site_frac, norm_frac
    for s in plan.sites:
        m = model.get_submodule(s.mask)
        assert isinstance(m, ChannelMask)
        f = m.kept / s.channels
        site_frac[s.name] = f
        for n in s.channel_modules:
            norm_frac[n] = f
    return site_frac, norm_frac


@torch.no_grad()
def measure(model: nn.Module, example_input: Tensor) -> Measurement:
    """Measure ``model`` on the first sample of ``example_input`` (see module docs for definitions)."""
    plan: Plan | None = getattr(model, "pq_plan", None)
    site_frac, norm_frac = _site_fractions(model, plan)
    site_masks = {s.name: model.get_submodule(s.mask).mask for s in plan.sites} if plan is not None else {}
    names = {m: n for n, m in model.named_modules()}
    aq_bits: dict[str, int] = {}
    for n, m in model.named_modules():
        if isinstance(m, ActQuantizer) and bool(m.enabled):
            aq_bits[n] = m.bits
    records: list[LayerCost] = []
    seen_inputs: set[tuple] = set()
    layer_out: dict[tuple, str] = {}  # a layer's output tensor -> the layer
    folded_into: set[str] = set()
    norm_numbers: dict[str, int] = {}
    alive: list[Tensor] = []  # keeps inputs referenced so their data_ptr stays unique during the pass

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        name = names[mod]
        x = inp[0]
        info = plan.layers.get(name) if plan is not None else None
        fin = plan.input_fraction(name, site_masks) if info is not None else 1.0
        fout = site_frac.get(info.output_site, 1.0) if info and info.output_site else 1.0
        w = raw_weight(mod)
        dense_macs = _dense_macs(mod, w, x, out)
        frac = fout if (info is not None and info.depthwise) else fin * fout
        wq = weight_quantizer(mod)
        wb = wq.bits if wq is not None and bool(wq.enabled) else FLOAT_BITS
        ab = aq_bits.get(info.act_quant, FLOAT_BITS) if info and info.act_quant else FLOAT_BITS
        key = (x.data_ptr(), tuple(x.shape))
        act_el = 0 if key in seen_inputs else round(x[0].numel() * fin)
        seen_inputs.add(key)
        alive.append(x)
        n_scales = 0
        if wq is not None and bool(wq.enabled):
            n_scales = round(w.shape[wq.axis] * fout) if wq.per_channel else 1
        records.append(LayerCost(name, round(dense_macs * frac), round(w.numel() * frac), wb, ab, act_el,
                                 fin, fout, n_scales))
        layer_out[(out.data_ptr(), tuple(out.shape))] = name
        alive.append(out)

    def norm_hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        x = inp[0]
        name = names[mod]
        kept = round(_norm_channels(mod) * norm_frac.get(name, 1.0))
        src = layer_out.get((x.data_ptr(), tuple(x.shape)))
        running = isinstance(mod, NORM_TYPES) and mod.track_running_stats
        if src is not None and running:
            folded_into.add(src)
            norm_numbers[name] = kept  # folds into the layer's scale; one bias per channel
        elif mod.affine or running:  # a scale and a shift per channel (from running stats if not affine)
            norm_numbers[name] = 2 * kept

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    handles += [m.register_forward_hook(norm_hook) for m in model.modules() if isinstance(m, SIDE_NORM_TYPES)]
    # Only shapes and bit-widths matter here: an enabled activation quantizer that has not seen data
    # yet (e.g. right after Compressor() with act_delay 0) passes through instead of raising.
    unready = [m for m in model.modules() if isinstance(m, ActQuantizer) and bool(m.enabled)
               and float(m.stat_count) <= 0]
    try:
        for m in unready:
            m.enabled.fill_(False)
        with eval_mode(model):
            model(example_input[:1])
    finally:
        for m in unready:
            m.enabled.fill_(True)
        for h in handles:
            h.remove()

    # Parameters: layers with their fractions, norms of pruned sites, everything else whole.
    params = 0
    counted: set[int] = set()
    by_name = {r.name: r for r in records}
    for n, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and n in by_name:
            r = by_name[n]
            params += r.weights
            counted.add(id(raw_weight(m)))
            if m.bias is not None:
                params += round(m.bias.numel() * r.out_fraction)
                counted.add(id(m.bias))
                if n not in folded_into:  # one bias per remaining channel unless a BatchNorm absorbs it
                    r.scale_bias += round(m.bias.numel() * r.out_fraction)
        elif n in norm_frac:
            for p in m.parameters(recurse=False):
                params += round(p.numel() * norm_frac[n])
                counted.add(id(p))
    for s in plan.sites if plan is not None else ():  # per-channel scales ("layer scale")
        for name in s.params:
            p = model.get_parameter(name)
            if id(p) not in counted:
                params += round(p.numel() * site_frac[s.name])
                counted.add(id(p))
    params += sum(p.numel() for p in model.parameters() if id(p) not in counted)

    numbers = sum(r.scale_bias for r in records) + sum(norm_numbers.values()) + 2 * len(aq_bits)
    sbmbit = numbers * FLOAT_BITS / 1e6

    macs = sum(r.macs for r in records)
    bops = sum(r.macs * r.weight_bits * r.act_bits for r in records)
    wmbit = sum(r.weights * r.weight_bits for r in records) / 1e6
    ambit = sum(r.act_elements * r.act_bits for r in records) / 1e6
    return Measurement(params=int(params), macs=int(macs), bops=int(bops), weight_mbit=wmbit,
                       act_mbit=ambit, memory_mbit=wmbit + ambit, scale_bias_mbit=sbmbit,
                       deploy_weight_mbit=wmbit + sbmbit, layers=records)


def _norm_channels(m: nn.Module) -> int:
    if getattr(m, "num_features", None):
        return int(m.num_features)
    return int(getattr(m, "num_channels", 0) or 0)


def _dense_macs(mod: nn.Module, w: Tensor, x: Tensor, out: Tensor) -> int:
    """MACs of one conv / linear layer before pruning, from its weight and one call's tensors."""
    if isinstance(mod, nn.Linear):
        return w.numel() * (out.numel() // out.shape[-1])
    if isinstance(mod, CONVT_TYPES):
        return w.numel() * x[0].numel() // x.shape[1]
    return w.numel() * (out[0].numel() // out.shape[1])


@torch.no_grad()
def measure_module(model: nn.Module, example_input: Tensor, weight_bits: int = FLOAT_BITS,
                   act_bits: int = FLOAT_BITS,
                   layer_bits: Mapping[str, tuple[int | None, int | None]] | None = None,
                   keep: Mapping[str, tuple[float, float]] | None = None) -> Measurement:
    """Cost of a plain ``nn.Module`` (no prunequant instrumentation) at given bit-widths (METHOD §6).

    For models quantized or pruned by other tools (qsparse, Brevitas, Torch-Pruning): measure the
    float network of the same shapes and say which bits each layer would have.

    Args:
        model: the network; conv / linear layers (:data:`LAYER_TYPES`) are counted.
        example_input: a batch; its first sample is used.
        weight_bits / act_bits: bits of every layer's weights and of the tensor entering it.
        layer_bits: ``{layer name: (weight bits, input bits)}`` overrides; ``None`` keeps the default.
        keep: for masked (not physically smaller) models, ``{name: (in fraction, out fraction)}`` of
            channels that remain: for a conv / linear layer its input and output channels (a depthwise
            layer uses the output fraction only); any other module's own parameters (e.g. a BatchNorm)
            count times the second number.

    Definitions are :func:`measure`'s: ``weight_mbit`` counts conv / linear weight elements x bits,
    ``act_mbit`` the elements of every distinct tensor entering a conv / linear layer x the bits of
    the first layer reading it, ``params`` every parameter (layers and ``keep`` modules scaled).
    The folded scale / bias numbers (``scale_bias_mbit``) are not computed here (0).
    """
    layer_bits = dict(layer_bits or {})
    keep = dict(keep or {})
    names = {m: n for n, m in model.named_modules()}
    unknown = [n for n in list(layer_bits) + list(keep) if n not in names.values()]
    if unknown:
        raise ValueError(f"measure_module: no module named {unknown[0]!r} in the model")
    records: list[LayerCost] = []
    seen_inputs: set[tuple] = set()
    alive: list[Tensor] = []

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        name = names[mod]
        x = inp[0]
        fin, fout = keep.get(name, (1.0, 1.0))
        w = mod.weight
        dense_macs = _dense_macs(mod, w, x, out)
        depthwise = getattr(mod, "groups", 1) > 1 and mod.groups == getattr(mod, "in_channels", -1)
        frac = fout if depthwise else fin * fout
        wb, ab = layer_bits.get(name, (None, None))
        wb = weight_bits if wb is None else wb
        ab = act_bits if ab is None else ab
        key = (x.data_ptr(), tuple(x.shape))
        act_el = 0 if key in seen_inputs else round(x[0].numel() * fin)
        seen_inputs.add(key)
        alive.extend((x, out))
        records.append(LayerCost(name, round(dense_macs * frac), round(w.numel() * frac), int(wb), int(ab),
                                 act_el, fin, fout))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    try:
        with eval_mode(model):
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()

    by_name = {r.name: r for r in records}
    params = 0
    for n, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if n in by_name:
            r = by_name[n]
            for p in own:
                params += r.weights if p is m.weight else round(p.numel() * r.out_fraction)
        elif n in keep:
            params += sum(round(p.numel() * keep[n][1]) for p in own)
        else:
            params += sum(p.numel() for p in own)
    macs = sum(r.macs for r in records)
    bops = sum(r.macs * r.weight_bits * r.act_bits for r in records)
    wmbit = sum(r.weights * r.weight_bits for r in records) / 1e6
    ambit = sum(r.act_elements * r.act_bits for r in records) / 1e6
    return Measurement(params=int(params), macs=int(macs), bops=int(bops), weight_mbit=wmbit,
                       act_mbit=ambit, memory_mbit=wmbit + ambit, layers=records)


def count_levels(values: Tensor, scale: Tensor | float | None = None, axis: int = 0) -> int:
    """Number of distinct quantization levels a quantized tensor actually uses.

    Without ``scale``: the number of distinct values (a per-tensor quantized tensor, e.g. an
    activation). With ``scale`` (per channel along ``axis``, or one number): the number of distinct
    integer codes ``round(values / scale)``, so per-channel quantized weights whose channels use the
    codes -8..7 count 16 however many distinct float values the channels make together.
    """
    v = values.detach()
    if not v.is_floating_point():
        v = v.float()
    if scale is not None:
        s = torch.as_tensor(scale, dtype=v.dtype, device=v.device)
        if s.numel() > 1:
            shape = [1] * v.dim()
            shape[axis] = -1
            s = s.reshape(shape)
        else:
            s = s.reshape(())
        v = torch.round(v / s)
    u = torch.unique(v)
    return int(u.numel() - torch.isnan(u).sum())
