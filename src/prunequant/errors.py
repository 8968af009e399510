"""The package's error classes: one base, :class:`PrunequantError`, for every error meant for a user.

Each subclass keeps the builtin base it had before (``ValueError`` / ``RuntimeError``), so existing
``except ValueError`` code still catches it. The CLI prints any :class:`PrunequantError` as one message
(``error: ...``, exit code 2, no traceback), as raised: an export error is not relabelled as a recipe
error. ``kind`` names the class's kind in words, for callers that want to show it.
"""

from __future__ import annotations


class PrunequantError(Exception):
    """Base of every error prunequant raises for a user to read (the message says what to do)."""

    kind = "error"


class RecipeError(PrunequantError, ValueError):
    """Invalid recipe or run configuration; the message is meant for the user as is."""

    kind = "recipe error"


class GraphError(PrunequantError, ValueError):
    """A model that cannot be traced, instrumented or shrunk; the message names the op and module."""

    kind = "graph error"


class ExportError(PrunequantError, ValueError):
    """A model that cannot be exported as asked; the message says what to do."""

    kind = "export error"


class DatasetError(PrunequantError, ValueError):
    """A dataset could not be found, parsed or configured."""

    kind = "dataset error"


class ScheduleError(PrunequantError, RuntimeError):
    """The compression loop was driven in a way that would silently give a wrong model (the model
    in eval mode while statistics are gathered, ``finalize()`` before the schedule ended)."""

    kind = "schedule error"


class JobStopped(PrunequantError, RuntimeError):
    """Another process of a multi-process job stopped with an error of its own (which that process
    printed); this one stops too, quietly (``quiet``: the CLI prints nothing for it)."""

    kind = "stopped"
    quiet = True


__all__ = ["DatasetError", "ExportError", "GraphError", "JobStopped", "PrunequantError", "RecipeError",
           "ScheduleError"]
