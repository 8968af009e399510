"""Integer deployment: ONNX (QDQ, QONNX) export and packed integer checkpoints.

* :func:`export_onnx` writes one self-contained ``.onnx`` file: ``format="qdq"`` uses standard
  QuantizeLinear / DequantizeLinear (opset 21, INT4 / UINT4 for <= 4 bits) for ONNX Runtime and
  TensorRT; ``format="qonnx"`` uses QONNX ``Quant`` nodes with arbitrary bit-widths (FINN, hls4ml).
  Needs the ``export`` extra (``pip install 'prunequant[export]'``).
* :func:`save_packed` / :func:`load_packed`: weights as packed b-bit integers plus everything needed
  to rebuild a model with bit-identical outputs, in a pickle-free binary format;
  ``fold_bn=True`` stores the deployment form (:func:`fold_batchnorm`): BatchNorm folded into the
  conv's per-channel scale and a bias.

* :func:`to_hls4ml` (optional, needs ``hls4ml[onnx]``): the QONNX export converted into an hls4ml
  ``ModelGraph`` whose ``compile()`` builds a bit-accurate C++ emulation with g++.

All refuse models that are not quantized or not finalized (:class:`ExportError` says what to do).
See ``docs/export.md``.
"""

from ._checks import ExportError, check_exportable
from .fold import fold_batchnorm
from .hls import to_hls4ml
from .onnx_export import FORMATS, build_onnx, export_onnx
from .packed import (
    HEADER_BYTES,
    PackedFormatError,
    load_packed,
    pack_codes,
    packed_size_report,
    read_packed,
    save_packed,
    unpack_codes,
)

__all__ = [
    "FORMATS", "HEADER_BYTES", "ExportError", "PackedFormatError", "build_onnx", "check_exportable",
    "export_onnx", "fold_batchnorm", "load_packed", "pack_codes", "packed_size_report", "read_packed",
    "save_packed", "to_hls4ml", "unpack_codes",
]
