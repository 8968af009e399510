"""Error type for user-facing dataset problems (defined with the package's other errors)."""

from __future__ import annotations

from ..errors import DatasetError

__all__ = ["DatasetError"]
