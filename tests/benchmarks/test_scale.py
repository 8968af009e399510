"""benchmarks/scale.py at a tiny size: two real gloo processes, and the cost model docs/scale.md states
(per step: per BatchNorm layer one all-gather forward and one all-reduce backward, 1 all-reduce per
gathering mask and activation quantizer, the gradients once through DDP)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import scale  # noqa: E402


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_scale_counts_what_the_cost_model_says(tmp_path: Path) -> None:
    assert scale.main(["--procs", "1", "2", "--steps", "1", "--model", "resnet20", "--batch", "16",
                       "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    one, two = rows
    assert not one["dense"]["calls_per_step"]  # one process: no collectives at all
    bn, aq = two["batchnorm_layers"], two["act_quantizers"]
    calls = {w: two[w]["calls_per_step"] for w in ("dense", "pruning", "qat")}
    # BatchNorm: one all-gather of every rank's count / mean / M2 forward, one all-reduce backward
    assert all(c["all_gather"] == bn for c in calls.values())
    assert calls["dense"]["all_reduce"] == bn
    assert calls["pruning"]["all_reduce"] == bn + 1  # the one gathering mask
    assert calls["qat"]["all_reduce"] == bn + aq  # every activation quantizer
    grads = two["dense"]["bytes_per_step"]["ddp_gradients"]
    assert grads == 4 * two["params"]  # float32 gradients, once per step
    assert two["checkpoint_bytes"] > one["checkpoint_bytes"]  # rank 1's random states travel along
    assert "| 2 | 1 | qat |" in (tmp_path / "scale.md").read_text()
