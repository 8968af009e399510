"""Reader for the idx format used by (Fashion-)MNIST, gzip-compressed or not."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetError

#: idx type code -> numpy dtype (big-endian as stored in the file).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing gzip (detected by its magic bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read idx file {path}: {exc} (the file is corrupt or truncated)") from exc


def parse_idx(data: bytes, name: str = "<idx>", expected_ndim: int | None = None) -> np.ndarray:
    """Parse idx bytes into a numpy array; ``name`` is used in error messages."""
    if len(data) < 4:
        raise DatasetError(f"idx file {name} is truncated: only {len(data)} bytes")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"idx file {name} has a bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000TTNN with a known type code TT and NN dimensions); "
            "it is not an idx file or is corrupt"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise DatasetError(f"idx file {name} has {ndim} dimensions, expected {expected_ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"idx file {name} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "longer than its header says"
        raise DatasetError(
            f"idx file {name} is {what}: header dims {dims} need {expected} data bytes, found {payload}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (``.gz`` or uncompressed) from disk."""
    path = Path(path)
    return parse_idx(_read_bytes(path), name=str(path), expected_ndim=expected_ndim)
