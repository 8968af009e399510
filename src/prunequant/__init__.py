"""prunequant: low-precision structured subnetworks for PyTorch.

Greedy layerwise channel pruning (importance = mean |activation| measured on the network whose earlier
layers are already pruned) combined with statistics-based uniform quantization-aware training
(Zhang, Colbert and Das, Applied Sciences 2022).
"""

from .errors import ExportError, GraphError, PrunequantError
from .metrics.measure import Measurement, measure
from .recipe import LayerBits, PruneConfig, QuantConfig, Recipe, RecipeError
from .train.compressor import Compressor, ScheduleError, Timeline

__version__ = "0.1.0"

_EXPORT = ("export_onnx", "save_packed", "load_packed")


def __getattr__(name: str):
    """``export_onnx`` / ``save_packed`` / ``load_packed`` load lazily (they need the export extra)."""
    if name in _EXPORT:
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'prunequant' has no attribute {name!r}")


__all__ = [
    "Compressor", "ExportError", "GraphError", "LayerBits", "Measurement", "PruneConfig", "PrunequantError",
    "QuantConfig", "Recipe", "RecipeError", "ScheduleError", "Timeline", "export_onnx", "load_packed",
    "measure", "save_packed",
    "__version__",
]
