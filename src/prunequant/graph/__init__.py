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
from .persist import load_pruned, save_pruned
from .shrink import shrink

__all__ = [
    "GraphError", "LayerInfo", "Plan", "Rewrite", "Site", "Tap", "discover", "instrument", "load_pruned",
    "raw_weight", "save_pruned", "shrink", "trace", "weight_quantizer",
]
