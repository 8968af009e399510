"""benchmarks/finalized_speed.py at a tiny size: one model, one bit-width, batch 1, two rounds. The
finalized model, its float copy and the uncached code all run, the cached output is bit-identical, and
the JSON and markdown name the command and the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import finalized_speed  # noqa: E402

from prunequant.graph.instrument import weight_quantizer  # noqa: E402
from prunequant.quant.quantizers import ActQuantizer  # noqa: E402


def test_finalized_speed_quick(tmp_path: Path) -> None:
    args = ["--models", "resnet20", "--bits", "4", "--batches", "1", "--rounds", "2", "--iters-batch1", "1",
            "--out", str(tmp_path)]
    info = finalized_speed.main(args)
    saved = json.loads((tmp_path / "finalized_speed.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(info["rows"]))
    (row,) = saved["rows"]
    assert row["bit_identical"] and row["model"] == "resnet20" and row["bits"] == "W4A4"
    assert set(row["wall_ms"]) == {"float", "quant", "uncached"}
    assert all(row[f"{k}_ratio_quant"]["min"] <= row[f"{k}_ratio_quant"]["median"] for k in ("wall", "cpu"))
    md = (tmp_path / "finalized_speed.md").read_text()
    assert md.startswith("`python benchmarks/finalized_speed.py " + " ".join(args) + "`")
    assert saved["machine"]["cpu_class"] in md and "| resnet20 | W4A4 | 1 |" in md


def test_float_copy_leaves_the_finalized_model_alone() -> None:
    """The float copy has no quantizers, and stripping it does not touch the original's (shared) class."""
    quant, _ = finalized_speed.finalized("resnet20", 8)
    flt = finalized_speed.float_copy(quant)
    x = torch.randn(2, 1, finalized_speed.IMAGE, finalized_speed.IMAGE)
    with torch.no_grad():
        quant(x), flt(x)
    assert all(weight_quantizer(m) is None for m in flt.modules())
    assert not any(bool(m.enabled) for m in flt.modules() if isinstance(m, ActQuantizer))
    assert any(weight_quantizer(m) is not None for m in quant.modules())
