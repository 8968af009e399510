"""Fixtures for the export tests; helpers (models, data, runners) live in export_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is much faster (and steadier) than two on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
