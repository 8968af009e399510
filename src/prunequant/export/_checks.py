"""Pre-export checks: the model must be quantized and finalized; clear messages when it is not."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

from ..errors import ExportError
from ..graph.instrument import weight_quantizer
from ..graph.ops import LAYER_TYPES
from ..prune.mask import ChannelMask, masked_layer_norm
from ..quant.quantizers import ActQuantizer, WeightQuantizer

NOT_QUANTIZED = (
    "the model has no enabled quantizer, so there is nothing integer to export. Run QAT first: drive a "
    "prunequant.Compressor with a recipe that has a `quant:` section (e.g. weight_bits: 8, act_bits: 8) "
    "for at least weight_delay / act_delay steps, then export the model that comp.finalize() returns"
)


def shrink_available() -> bool:
    """True when :func:`prunequant.graph.shrink` (physical channel removal) is installed."""
    try:
        mod = importlib.import_module("prunequant.graph")
    except ImportError:  # pragma: no cover - the package itself is importable
        return False
    return callable(getattr(mod, "shrink", None))


@dataclass
class ModelState:
    """What the checks found; exporters use it to decide how to emit each piece."""

    weight_quantizers: dict[str, WeightQuantizer] = field(default_factory=dict)  # layer -> enabled wq
    act_quantizers: dict[str, ActQuantizer] = field(default_factory=dict)  # module path -> enabled aq
    masks: dict[str, ChannelMask] = field(default_factory=dict)
    masked_channels: int = 0
    disabled: list[str] = field(default_factory=list)  # quantizers present but not enabled


def inspect_model(model: nn.Module) -> ModelState:
    """Collect quantizers and masks of an (instrumented) model."""
    st = ModelState()
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            wq = weight_quantizer(m)
            if wq is not None:
                if bool(wq.enabled):
                    st.weight_quantizers[name] = wq
                else:
                    st.disabled.append(f"{name}.weight")
        elif isinstance(m, ActQuantizer):
            if bool(m.enabled):
                st.act_quantizers[name] = m
            else:
                st.disabled.append(name)
        elif isinstance(m, ChannelMask):
            st.masks[name] = m
            st.masked_channels += int(m.channels - m.kept)
    return st


def check_exportable(model: nn.Module, *, allow_masked: bool = False, what: str = "export") -> ModelState:
    """Raise :class:`ExportError` unless ``model`` is quantized and finalized.

    * no enabled quantizer at all -> "run QAT / Compressor with a quant recipe first";
    * a mask still collecting statistics or not frozen -> "call Compressor.finalize()";
    * an enabled activation quantizer that has never seen data or is not frozen -> same;
    * masked (zeroed) channels while :func:`prunequant.graph.shrink` exists -> "shrink first", unless
      ``allow_masked`` (the masked model is then exported as is: pruned channels are exact zeros).
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"{what}: expected a torch.nn.Module, got {type(model).__name__}")
    st = inspect_model(model)
    if not st.weight_quantizers and not st.act_quantizers:
        raise ExportError(f"{what}: {NOT_QUANTIZED}")
    live = [n for n, m in st.masks.items() if bool(m.collecting) or not bool(m.frozen)]
    if live:
        raise ExportError(
            f"{what}: the model is not finalized: channel masks {live[:3]}{' ...' if len(live) > 3 else ''} "
            "are still collecting statistics / not frozen. Call Compressor.finalize() (it freezes masks "
            "and quantizer statistics) and export the model it returns"
        )
    for name, aq in st.act_quantizers.items():
        if float(aq.stat_count) <= 0:
            raise ExportError(
                f"{what}: activation quantizer {name} is enabled but has never seen data; train / "
                "calibrate with the Compressor for at least one step after act_delay, then call finalize()"
            )
        if not bool(aq.frozen):
            raise ExportError(
                f"{what}: the model is not finalized: activation quantizer {name} still updates its "
                "statistics. Call Compressor.finalize() and export the model it returns"
            )
    if st.masked_channels and not allow_masked and shrink_available():
        raise ExportError(
            f"{what}: the model still carries {st.masked_channels} masked (zeroed) channels. Export the "
            "model that Compressor.finalize() returns (it removes them) or remove them with "
            "`model = prunequant.graph.shrink(model)`, so the exported network is physically smaller "
            "(or pass allow_masked=True to export the masked network as is)"
        )
    graph = getattr(model, "graph", None)
    if st.masked_channels and graph is not None and any(
            n.op == "call_function" and n.target is masked_layer_norm for n in graph.nodes):
        raise ExportError(
            f"{what}: a LayerNorm over pruned channels is computed on the kept channels only, which the "
            "masked network cannot express in ONNX; export the physically smaller network "
            "(`prunequant.graph.shrink(model)`, or the model Compressor.finalize() returns)"
        )
    return st
