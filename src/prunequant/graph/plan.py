"""The plan :func:`~prunequant.graph.instrument` records: sites, taps, rewrites and layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
    #: a group (``kind == "group"``): the other producers whose outputs lose the same channels
    members: list[str] = field(default_factory=list)
    kind: str = "site"  # "site" (one producer's activation) or "group" (tensors joined by adds / products)
    dim: int = 1  # the channel dim of the masked tensor: 1, or -1 (a linear layer's channels-last output)
    #: modules holding the parameters of LayerNorms over these channels (computed on the kept channels)
    layer_norms: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # per-channel scales ("layer scale"), by qualified name
    kept: list[int] | None = None  # after shrink(): original indices of the channels that remain
    original_channels: int | None = None  # after shrink(): channel count before removal

    @property
    def channel_modules(self) -> list[str]:
        """Non-layer modules with per-channel parameters that shrink with the site."""
        return [n for n, _ in self.side] + list(self.tied_norms) + list(self.layer_norms)

    @property
    def producers(self) -> list[str]:
        """Every layer whose output channels this site / group removes (not counting gates, tied convs)."""
        return [self.producer, *self.members]

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
