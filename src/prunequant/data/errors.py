"""Error type for user-facing dataset problems."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset could not be found, parsed or configured.

    The message is meant for the user as is; the CLI prints it without a traceback.
    """
