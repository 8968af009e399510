"""Low-level readers: idx parsing and the restricted CIFAR unpickler."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_writers import idx_bytes, py2_pickle

from prunequant.data import DatasetError
from prunequant.data.idx import parse_idx, read_idx
from prunequant.data.safe_pickle import safe_load_pickle


def test_idx_roundtrip_gz_and_plain(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(idx_bytes(arr))
    for p in (tmp_path / "a", tmp_path / "a.gz"):
        out = read_idx(p, expected_ndim=3)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, arr)


def test_idx_bad_magic_truncated_and_ndim() -> None:
    good = idx_bytes(np.zeros((2, 5), dtype=np.uint8))
    with pytest.raises(DatasetError, match="magic number"):
        parse_idx(b"\x12\x34" + good[2:], name="x.idx")
    with pytest.raises(DatasetError, match="x.idx is truncated"):
        parse_idx(good[:-1], name="x.idx")
    with pytest.raises(DatasetError, match="longer than"):
        parse_idx(good + b"\x00", name="x.idx")
    with pytest.raises(DatasetError, match="2 dimensions, expected 3"):
        parse_idx(good, name="x.idx", expected_ndim=3)
    with pytest.raises(DatasetError, match="truncated"):
        parse_idx(b"\x00\x00", name="x.idx")


def test_idx_truncated_gzip_names_file(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.ones((50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "broken.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="broken.gz"):
        read_idx(path)


def _pickle_file(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def test_safe_pickle_loads_cifar_style_dicts(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(2, 6)
    obj = {b"data": arr, b"labels": [3, 4], b"batch_label": b"b"}
    for path in (_pickle_file(tmp_path, obj), tmp_path / "py2"):
        if path.name == "py2":
            path.write_bytes(py2_pickle(obj))
        out = safe_load_pickle(path)
        assert set(out) == {b"data", b"labels", b"batch_label"}
        np.testing.assert_array_equal(out[b"data"], arr)
        assert out[b"labels"] == [3, 4] and out[b"batch_label"] == b"b"
    # protocol 5 (numpy's _frombuffer path) is fine too
    (tmp_path / "p5").write_bytes(pickle.dumps(obj, protocol=5))
    np.testing.assert_array_equal(safe_load_pickle(tmp_path / "p5")[b"data"], arr)


class _RunsShell:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple:
        return (os.system, (self.cmd,))


class _Evals:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _pickle_file(tmp_path, {b"data": _RunsShell(f"touch {marker}"), b"labels": [0]})
    with pytest.raises(DatasetError, match="refusing to load .*system"):
        safe_load_pickle(path)
    assert not marker.exists()
    path = _pickle_file(tmp_path, {b"data": _Evals()})
    with pytest.raises(DatasetError, match=r"refusing to load (__builtin__|builtins)\.eval"):
        safe_load_pickle(path)


def test_corrupt_pickle(tmp_path: Path) -> None:
    data = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}, protocol=2)
    (tmp_path / "cut").write_bytes(data[:100])
    with pytest.raises(DatasetError, match="cannot unpickle .*cut"):
        safe_load_pickle(tmp_path / "cut")
    with pytest.raises(DatasetError, match="cannot read"):
        safe_load_pickle(tmp_path / "nope")
