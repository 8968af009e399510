"""benchmarks/sr_bicubic.py runs and reports the documented bicubic numbers (docs/tasks.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sr_bicubic  # noqa: E402


def test_sr_bicubic_x2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sr_bicubic.main(["--scales", "2", "--json", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["machine"]["cpu_class"] and "x2" in capsys.readouterr().out
    mean = next(r for r in res["rows"] if r["split"] == "test" and r["image"] == "mean")
    assert mean["psnr"] == pytest.approx(32.50, abs=0.05)  # the value in docs/tasks.md
    assert mean["ssim"] == pytest.approx(0.9341, abs=0.001)
