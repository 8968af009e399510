"""Graph tools: fx tracing (:mod:`.trace`), op knowledge (:mod:`.ops`), site discovery
(:mod:`.discover`), the plan (:mod:`.plan`), instrumentation (:mod:`.instrument`), physical channel
removal (:mod:`.shrink`) and saving pruned models (:mod:`.persist`)."""

from ..errors import GraphError
from .discover import discover
from .instrument import instrument, raw_weight, weight_quantizer
from .persist import load_pruned, save_pruned
from .plan import LayerInfo, Plan, Rewrite, Site, Tap
from .shrink import shrink
from .trace import trace

__all__ = [
    "GraphError", "LayerInfo", "Plan", "Rewrite", "Site", "Tap", "discover", "instrument", "load_pruned",
    "raw_weight", "save_pruned", "shrink", "trace", "weight_quantizer",
]
