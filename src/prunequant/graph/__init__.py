"""Graph tools: fx tracing, site discovery, instrumentation, physical channel removal."""

from .discover import (
    GraphError,
    LayerInfo,
    Plan,
    Rewrite,
    Site,
    Tap,
    discover,
    instrument,
    raw_weight,
    trace,
    weight_quantizer,
)
from .shrink import shrink

__all__ = [
    "GraphError", "LayerInfo", "Plan", "Rewrite", "Site", "Tap", "discover", "instrument", "raw_weight",
    "shrink", "trace", "weight_quantizer",
]
