"""Params, MACs, BOPs, memory and performance density."""

from .measure import LayerCost, Measurement, count_levels, measure, measure_module

__all__ = ["LayerCost", "Measurement", "count_levels", "measure", "measure_module"]
