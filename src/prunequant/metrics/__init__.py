"""Params, MACs, BOPs, memory and performance density."""

from .measure import LayerCost, Measurement, measure

__all__ = ["LayerCost", "Measurement", "measure"]
