"""Writers for tiny datasets in the real on-disk formats (idx .gz, CIFAR python pickles)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format (magic 0x0000 08 ndim, big-endian int32 dims)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def unique_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images whose first two pixels encode the index, so every image is distinct."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) // 256
    flat[:, 1] = np.arange(n) % 256
    return x


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.uint8)


def write_fashion(
    folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = True
) -> dict[str, np.ndarray]:
    """Write the four Fashion-MNIST idx files into ``folder``; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": unique_images(n_train, (28, 28), 1),
        "train-labels-idx1-ubyte": balanced_labels(n_train, 10, 2),
        "t10k-images-idx3-ubyte": unique_images(n_test, (28, 28), 3),
        "t10k-labels-idx1-ubyte": balanced_labels(n_test, 10, 4),
    }
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str/bytes as Python 2 ``str`` opcodes, like the original cPickle-made CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2str(self, obj: str | bytes) -> None:
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = save_py2str
    dispatch[str] = save_py2str


def py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle as Python 2 + numpy 1.x wrote it (``numpy.core.multiarray``)."""
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _dump(path: Path, obj: dict, py2: bool) -> None:
    path.write_bytes(py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2))


def write_cifar10(
    parent: Path, per_batch: int = 20, n_test: int = 30, py2: bool = False
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write ``parent/cifar-10-batches-py`` (5 data batches, test_batch, batches.meta)."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x = unique_images(5 * per_batch, (3072,), 10)
    y = balanced_labels(5 * per_batch, 10, 11).astype(np.int64)
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [int(v) for v in y[sl]],
            b"data": x[sl].copy(),
            b"filenames": [f"img_{i}.png".encode() for i in range(sl.start, sl.stop)],
        }
        _dump(folder / f"data_batch_{b + 1}", batch, py2)
    tx = unique_images(n_test, (3072,), 12)
    ty = [int(v) for v in balanced_labels(n_test, 10, 13)]
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": ty, b"data": tx}, py2)
    names = [n.encode() for n in ("airplane automobile bird cat deer dog frog horse ship truck").split()]
    _dump(
        folder / "batches.meta",
        {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072},
        py2,
    )
    return folder, x, y


def write_cifar100(parent: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """Write ``parent/cifar-100-python`` (train, test, meta) with fine and coarse labels."""
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 20), ("test", n_test, 21)):
        fine = balanced_labels(n, 100, seed).astype(np.int64)
        d = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": unique_images(n, (3072,), seed + 100),
        }
        _dump(folder / name, d, py2=False)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    _dump(folder / "meta", meta, py2=False)
    return folder
