"""Fixtures for the data tests; the format writers live in data_writers.py (importable in any import mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from data_writers import write_fashion  # noqa: E402


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST folder (200 train / 50 test, gzip idx files)."""
    folder = tmp_path / "fmnist"
    write_fashion(folder)
    return folder
