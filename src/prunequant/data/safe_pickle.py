"""A restricted unpickler for the CIFAR "python version" batch files.

Those files are plain dicts of bytes keys, lists and numpy arrays.  A normal ``pickle.load`` would run
any callable a crafted file names (e.g. ``os.system``); this unpickler resolves only the handful of
numpy/codec globals that array reconstruction needs and refuses everything else with DatasetError.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError

try:  # numpy >= 2 (and the 1.26 compatibility alias)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as written by protocol<3 pickles for bytes, limited to text encodings."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name not in ("iso8859-1", "latin-1", "utf-8"):
        raise DatasetError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}) in a pickle")
    return codecs.encode(obj, encoding, errors)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _numeric._frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
_ALLOWED[("_codecs", "encode")] = _latin1_encode
for _mod in ("builtins", "__builtin__"):  # protocol<3 pickles name builtins "__builtin__"
    _ALLOWED[(_mod, "bytearray")] = bytearray


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only knows numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to load {module}.{name} from a pickle: only numpy arrays, lists and bytes are "
                "expected in CIFAR batch files (the file may be malicious or not a CIFAR file)"
            ) from None


def safe_load_pickle(path: str | Path) -> Any:
    """Load a CIFAR-style pickle file (``encoding="bytes"``) with :class:`RestrictedUnpickler`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except Exception as exc:  # any parse error: truncated, not a pickle, bad array state ...
        raise DatasetError(
            f"cannot unpickle {path}: {type(exc).__name__}: {exc} (corrupt or truncated?)"
        ) from exc
