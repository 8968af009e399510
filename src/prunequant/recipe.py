"""Compression recipe: what to prune, how to quantize, and when. Validated up front.

Every field has a documented range; a bad value raises :class:`RecipeError` whose message names the
field (as a dotted path) and what is allowed, e.g.
``prune.sparsity: must be < 1 (got 1.5)``.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError
from .quant.quantizers import MAX_BITS, MIN_BITS

IMPORTANCE = ("a_l1", "a_l0", "w_l1", "random")
SCHEDULES = ("layerwise", "oneshot", "stepwise")
ORDERINGS = ("prune_then_quantize", "quantize_then_prune", "joint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PruneConfig(_Strict):
    """Channel pruning (METHOD sections 2-4)."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of channels removed per layer")
    importance: Literal["a_l1", "a_l0", "w_l1", "random"] = "a_l1"
    schedule: Literal["layerwise", "oneshot", "stepwise"] = "layerwise"
    unit: Literal["epochs", "steps"] = Field("epochs", description="unit of start / interval / refresh")
    start: float = Field(0.1, ge=0.0, description="S: delay before the first layer's window")
    interval: float = Field(0.1, gt=0.0, description="I: length of each layer's estimation window")
    refresh: float = Field(0.02, gt=0.0, description="R: mask recomputed every R inside a window")
    stepwise_steps: int = Field(5, ge=1, le=1000, description="n of the Zhu-Gupta ramp")
    per_layer: dict[str, float] = Field(default_factory=dict, description="pattern -> sparsity")
    exclude: list[str] = Field(default_factory=list, description="producer-name patterns kept whole")
    seed: int = Field(0, ge=0, description="seed of the random importance")
    round_to: int | None = Field(None, ge=1, description="keep channel counts at multiples of this "
                                 "(fewer channels are pruned when needed); null: no rounding")
    groups: bool = Field(False, description="also prune channel groups across residual adds / gating "
                         "products (every tensor joined by an add loses the same channels, named "
                         "'group:<first producer>'); false: block-internal channels only (the paper's "
                         "placement)")
    group_stat: Literal["mean", "max"] = Field("mean", description="a group's importance from the mean "
                                               "|activation| at each tensor consumers read: their mean "
                                               "or max")

    @field_validator("per_layer")
    @classmethod
    def _per_layer_range(cls, v: dict[str, float]) -> dict[str, float]:
        for pat, s in v.items():
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparsity for pattern {pat!r} must be in [0, 1) (got {s})")
        return v


class LayerBits(_Strict):
    """Per-layer override; ``null`` keeps that part in floating point."""

    weight_bits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS)
    act_bits: int | None = Field(None, ge=MIN_BITS, le=MAX_BITS, description="bits of the layer's input")


class QuantConfig(_Strict):
    """Uniform quantization-aware training (METHOD section 5).

    The defaults are the embedded default run's (W4A4, the network input and the last layer at 8
    bits): one set of defaults for the library, ``prunequant run`` and every recipe file.
    """

    weight_bits: int = Field(4, ge=MIN_BITS, le=MAX_BITS)
    act_bits: int = Field(4, ge=MIN_BITS, le=MAX_BITS)
    first_last_bits: int | None = Field(
        8, ge=MIN_BITS, le=MAX_BITS,
        description="the network input (the input of the first layers) and the last layers (weights "
                    "and input) use this many bits; null: they follow weight_bits / act_bits. "
                    "quant.per_layer entries override it for the layers they match")
    unit: Literal["epochs", "steps"] = "epochs"
    weight_delay: float = Field(0.2, ge=0.0, description="steps/epochs after quant start before W-quant")
    act_delay: float = Field(0.05, ge=0.0, description="steps/epochs after quant start before A-quant")
    power_of_two: bool = False
    act_percentile: float | None = Field(
        None, gt=50.0, lt=100.0,
        description="null: activation bounds are running means of batch min/max (the paper's); a "
                    "percentile p in (50, 100) uses the batch's p-th / (100-p)-th percentiles instead "
                    "(not in the paper)")
    weight_clip: Literal["max", "mse"] = Field(
        "max", description="max: weight scale from max|W_c| (the paper's); mse: that scale times the "
                           "clip ratio in [0.5, 1] minimizing the channel's quantization error "
                           "(not in the paper)")
    weight_range: Literal["full", "reduced"] = Field(
        "full", description="full: b-bit weight codes; reduced: 8-bit weights use 7-bit codes [-64, 63] "
                            "(other widths unchanged), so that u8s8 integer kernels without VNNI do "
                            "not saturate (not in the paper)")
    per_layer: dict[str, LayerBits] = Field(default_factory=dict)


class Recipe(_Strict):
    """A compression recipe; ``prune`` or ``quant`` may be ``None`` to skip that part.

    ``ordering``: ``prune_then_quantize`` (the paper's joint pipeline: quantizers start once the last
    mask froze), ``quantize_then_prune`` (pruning starts once all quantizers are live), or ``joint``
    (both start at step 0).
    """

    prune: PruneConfig | None = Field(default_factory=PruneConfig)
    quant: QuantConfig | None = Field(default_factory=QuantConfig)
    ordering: Literal["prune_then_quantize", "quantize_then_prune", "joint"] = "prune_then_quantize"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "recipe") -> Recipe:
        """Validate a plain dict; raises :class:`RecipeError` with readable messages."""
        return validate(cls, data or {}, where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Load and validate a YAML file."""
        return cls.from_dict(load_yaml(path), where=str(path))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def did_you_mean(word: str, choices: Any, limit: int = 2) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` by edit distance, or ``""``."""
    from rapidfuzz import fuzz, process

    hits = process.extract(str(word), [str(c) for c in choices], scorer=fuzz.ratio, limit=limit,
                           score_cutoff=65)
    if not hits:
        return ""
    return " (did you mean " + " or ".join(repr(h[0]) for h in hits) + "?)"


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model at ``loc`` (the parent of an unknown key)."""
    cls: Any = model_cls
    for key in loc:
        if typing.get_origin(cls) is dict:  # per_layer: {pattern: LayerBits}
            cls = typing.get_args(cls)[1]
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or key not in fields:
            return []
        cls = fields[key].annotation
        if typing.get_origin(cls) in (typing.Union, types.UnionType):  # X | None
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
    return list(getattr(cls, "model_fields", None) or {})


def format_validation_error(err: ValidationError, where: str = "", model_cls: type[BaseModel] | None = None
                            ) -> str:
    """One line per problem: ``field.path: message (got value)``, with a "did you mean" for unknown
    fields and for near misses of a fixed set of choices."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of")
            expected = (e.get("ctx") or {}).get("expected", "")
            msg += did_you_mean(got, [c.strip(" '\"") for c in expected.replace(" or ", ",").split(",")
                                      if c.strip(" '\"")])
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
            fields = _fields_at(model_cls, tuple(e["loc"][:-1])) if model_cls is not None else []
            hint = did_you_mean(e["loc"][-1], fields)
            msg += hint or (f" (allowed: {', '.join(fields)})" if fields else "")
        else:
            msg = msg.replace("Input should be", "must be")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{shown}")
    head = f"invalid configuration{f' in {where}' if where else ''}:"
    return "\n".join([head] + ["  " + ln for ln in lines])


def validate(model_cls: type[BaseModel], data: Any, where: str = "") -> Any:
    """``model_cls.model_validate(data)`` with :class:`RecipeError` on failure."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, where, model_cls)) from None
