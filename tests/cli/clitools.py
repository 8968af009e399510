"""Helpers the CLI tests share."""

from __future__ import annotations

import pytest

from prunequant.cli import main


def fails(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI, expect exit code 2 and one error message (no traceback) containing every needle."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error:") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err
