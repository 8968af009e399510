"""Quantization: statistics-based quantizers (:mod:`.quantizers`) and the per-layer policy
(:mod:`.policy`) that :func:`~prunequant.graph.instrument.instrument` follows."""

from .policy import QuantPolicy

__all__ = ["QuantPolicy"]
