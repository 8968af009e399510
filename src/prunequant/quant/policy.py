"""Quantization policy: which bit-widths each layer gets and which quantizers stand for them.

:func:`~prunequant.graph.instrument.instrument` asks a :class:`QuantPolicy` per layer and inserts what
it returns; the quantizer options live here, not in the graph code.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .quantizers import (
    WEIGHT_CLIPS,
    WEIGHT_RANGES,
    ActQuantizer,
    WeightQuantizer,
    check_bits,
    check_percentile,
)

#: the keys of a per-layer override in ``layer_bits``.
LAYER_BIT_FIELDS = ("weight_bits", "act_bits")
#: layer kinds :meth:`QuantPolicy.weight_quantizer` knows.
LAYER_KINDS = ("conv", "convT", "linear")

_Overrides = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def _freeze_layer_bits(layer_bits: Mapping[str, Mapping[str, int | None]] | _Overrides | None
                       ) -> _Overrides | None:
    """``{pattern: {field: bits}}`` as nested tuples (hashable, order kept), validated."""
    if layer_bits is None:
        return None
    items = layer_bits.items() if isinstance(layer_bits, Mapping) else layer_bits
    out = []
    for pat, o in items:
        if isinstance(o, tuple):  # the frozen form
            o = dict(o)
        if not isinstance(pat, str) or not isinstance(o, Mapping):
            raise ValueError(f"layer_bits must map fnmatch patterns to {{'weight_bits': b, 'act_bits': b}}, "
                             f"got {pat!r}: {o!r}")
        unknown = sorted(set(o) - set(LAYER_BIT_FIELDS))
        if unknown:
            raise ValueError(f"layer_bits[{pat!r}]: unknown fields {unknown} "
                             f"(known: {list(LAYER_BIT_FIELDS)})")
        for k, b in o.items():
            if b is not None:
                check_bits(b, f"layer_bits[{pat!r}].{k}")
        out.append((pat, tuple(o.items())))
    return tuple(out)


@dataclass(frozen=True)
class QuantPolicy:
    """The quantizer options of an instrumented model (the defaults quantize nothing).

    Args:
        weight_bits / act_bits: global bit-widths; ``None`` leaves that part in floating point.
        power_of_two: power-of-two weight scales (shift-only hardware).
        layer_bits: ``{pattern: {"weight_bits": b|None, "act_bits": b|None}}`` per-layer overrides
            (fnmatch on the layer name; the last matching pattern wins; a field it leaves out keeps the
            global bits, an explicit ``None`` means float; ``act_bits`` is the layer's *input*).
        act_percentile: ``None`` (batch min / max bounds) or a percentile in (50, 100) (see
            :class:`~prunequant.quant.quantizers.ActQuantizer`).
        weight_clip: one of :data:`~prunequant.quant.quantizers.WEIGHT_CLIPS`.
        weight_range: one of :data:`~prunequant.quant.quantizers.WEIGHT_RANGES`.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    power_of_two: bool = False
    layer_bits: Any = None  # given as a dict; kept as nested tuples (see options())
    act_percentile: float | None = None
    weight_clip: str = "max"
    weight_range: str = "full"

    def __post_init__(self) -> None:
        for f in LAYER_BIT_FIELDS:
            if getattr(self, f) is not None:
                check_bits(getattr(self, f), f)
        if self.weight_clip not in WEIGHT_CLIPS:
            raise ValueError(f"weight_clip must be one of {list(WEIGHT_CLIPS)}, got {self.weight_clip!r}")
        if self.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range must be one of {list(WEIGHT_RANGES)}, got {self.weight_range!r}")
        object.__setattr__(self, "act_percentile", check_percentile(self.act_percentile))
        object.__setattr__(self, "layer_bits", _freeze_layer_bits(self.layer_bits))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> QuantPolicy:
        """The policy recorded in ``options`` (as :meth:`options` writes them; other keys, such as
        the graph's in ``plan.options``, are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})

    def options(self) -> dict[str, Any]:
        """The options as recorded in ``plan.options``: ``act_percentile``, ``weight_clip`` and
        ``weight_range`` only when not the default, so older records stay identical."""
        lb = None if self.layer_bits is None else {p: dict(o) for p, o in self.layer_bits}
        out: dict[str, Any] = {"weight_bits": self.weight_bits, "act_bits": self.act_bits,
                               "power_of_two": self.power_of_two, "layer_bits": lb}
        if self.act_percentile is not None:
            out["act_percentile"] = self.act_percentile
        if self.weight_clip != "max":
            out["weight_clip"] = self.weight_clip
        if self.weight_range != "full":
            out["weight_range"] = self.weight_range
        return out

    def bits(self, layer: str) -> tuple[int | None, int | None]:
        """``(weight_bits, act_bits)`` of ``layer`` (``None``: float)."""
        hit: dict[str, Any] = {}
        for pat, o in self.layer_bits or ():
            if fnmatch.fnmatchcase(layer, pat):
                hit = dict(o)
        return hit.get("weight_bits", self.weight_bits), hit.get("act_bits", self.act_bits)

    def weight_quantizer(self, module: nn.Module, kind: str, bits: int | None) -> WeightQuantizer | None:
        """A quantizer for ``module.weight`` at ``bits`` (``None``: none). ``kind`` is ``"conv"``,
        ``"convT"`` (per output channel, on axis 0 / 1) or ``"linear"`` (per tensor)."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"kind must be one of {list(LAYER_KINDS)}, got {kind!r}")
        if bits is None:
            return None
        axis = 1 if kind == "convT" else 0
        channels = None if kind == "linear" else int(module.weight.shape[axis])
        return WeightQuantizer(bits, channels, axis, self.power_of_two, self.weight_clip, self.weight_range)

    def act_quantizer(self, bits: int) -> ActQuantizer:
        """A quantizer for a layer input at ``bits``."""
        return ActQuantizer(bits, self.act_percentile)


def find_weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` parametrizing ``module.weight``, if any."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, WeightQuantizer):
                return p
    return None


__all__ = ["LAYER_BIT_FIELDS", "LAYER_KINDS", "QuantPolicy", "find_weight_quantizer"]
