"""Integer deployment: ONNX (QDQ, QONNX) export and packed integer checkpoints.

* :func:`export_onnx` writes one self-contained ``.onnx`` file: ``format="qdq"`` uses standard
  QuantizeLinear / DequantizeLinear (opset 21, INT4 / UINT4 for <= 4 bits) for ONNX Runtime and
  TensorRT; ``format="qonnx"`` uses QONNX ``Quant`` nodes with arbitrary bit-widths (FINN, hls4ml).
  Needs the ``export`` extra (``pip install 'prunequant[export]'``).
* :func:`save_packed` / :func:`load_packed`: weights as packed b-bit integers plus everything needed
  to rebuild a model with bit-identical outputs, in a pickle-free binary format;
  ``fold_bn=True`` stores the deployment form (:func:`fold_batchnorm`): BatchNorm folded into the
  conv's per-channel scale and a bias.

* :func:`check_onnx`: an exported QDQ file in ONNX Runtime's default session against PyTorch, with
  the CPU's integer-kernel features (:func:`cpu_features`) and a warning where its 8-bit kernels
  saturate (``prunequant export RUN --check``).

* :func:`to_hls4ml` (optional, needs ``hls4ml[onnx]``): the QONNX export converted into an hls4ml
  ``ModelGraph`` whose ``compile()`` builds a bit-accurate C++ emulation with g++.

All refuse models that are not quantized or not finalized (:class:`ExportError` says what to do).
See ``docs/export.md``.
"""

from ._checks import ExportError, check_exportable
from .check import check_onnx
from .cpu import CpuFeatures, cpu_features
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
    "FORMATS", "HEADER_BYTES", "CpuFeatures", "ExportError", "PackedFormatError", "build_onnx",
    "check_exportable", "check_onnx", "cpu_features", "export_onnx", "fold_batchnorm", "load_packed",
    "pack_codes", "packed_size_report", "read_packed", "save_packed", "to_hls4ml", "unpack_codes",
]
