"""Integer deployment: ONNX (QDQ, QONNX) export and packed integer checkpoints.

* :func:`export_onnx` writes one self-contained ``.onnx`` file: ``format="qdq"`` uses standard
  QuantizeLinear / DequantizeLinear (opset 21, INT4 / UINT4 for <= 4 bits) for ONNX Runtime and
  TensorRT; ``format="qonnx"`` uses QONNX ``Quant`` nodes with arbitrary bit-widths (FINN, hls4ml).
  Needs the ``export`` extra (``pip install 'prunequant[export]'``).
* :func:`save_packed` / :func:`load_packed`: weights as packed b-bit integers plus everything needed
  to rebuild a model with bit-identical outputs, in a pickle-free binary format.

Both refuse models that are not quantized or not finalized (:class:`ExportError` says what to do).
See ``docs/export.md``.
"""

from ._checks import ExportError, check_exportable
from .onnx_export import FORMATS, build_onnx, export_onnx

__all__ = ["FORMATS", "ExportError", "build_onnx", "check_exportable", "export_onnx"]
