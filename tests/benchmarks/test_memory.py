"""benchmarks/memory.py at a tiny size: a narrow ResNet-20, batch 8, the FP32 and the QAT step, each in
its own process; the compression-state bytes against an independent count and the buffer layout."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory  # noqa: E402

from prunequant import Compressor  # noqa: E402
from prunequant.prune.mask import ChannelMask  # noqa: E402
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer  # noqa: E402

WIDTH = 0.25


def _independent_state_bytes(width: float) -> tuple[int, int]:
    """``(from the modules' own buffers, from the architecture)``: bytes of compression state."""
    model = memory.make_model("resnet20", width)
    comp = Compressor(model, memory.RECIPE, torch.zeros(2, 1, 28, 28))
    kinds = (ChannelMask, ActQuantizer, WeightQuantizer)
    by_buffers = 8  # pq_step: int64
    for m in comp.model.modules():
        if isinstance(m, kinds):
            by_buffers += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    # By shape: a mask on C channels holds a float32 mask, float64 sums, a float64 count and 2 flags;
    # an activation quantizer 3 float64 scalars and 2 flags; a weight quantizer one float64 scale sum
    # per output channel (one for a linear layer), a float64 count and a flag.
    by_shape = 8 + sum(4 * s.channels + 8 * s.channels + 8 + 2 for s in comp.plan.sites)
    by_shape += (3 * 8 + 2) * sum(isinstance(m, ActQuantizer) for m in comp.model.modules())
    for name in comp.plan.layers:
        layer = comp.model.get_submodule(name)
        rows = 1 if isinstance(layer, nn.Linear) else layer.out_channels
        by_shape += 8 * rows + 8 + 1
    return by_buffers, by_shape


def test_memory_tiny(tmp_path: Path) -> None:
    assert memory.main(["--models", "resnet20", "--width", str(WIDTH), "--batches", "8", "--phases", "fp32",
                        "qat", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    rows = {r["phase"]: r for r in data["rows"]}
    assert set(rows) == {"fp32", "qat"}
    for r in rows.values():
        assert r["alloc_peak_ratio"] > 0 and math.isfinite(r["alloc_peak_ratio"])
        if r["rss_peak_bytes"] is not None:  # None only where /proc/self/clear_refs is refused
            assert r["rss_peak_ratio"] > 0 and math.isfinite(r["rss_peak_ratio"])
        # the tensors saved for backward are alive at the end of the forward: the peak holds them
        assert r["alloc_peak_bytes"] >= sum(r["saved_for_backward"].values())
        assert r["alloc_info"]["non_cpu_events"] == 0
        assert r["params_bytes"] == r["momentum_bytes"]
    assert rows["fp32"]["alloc_peak_ratio"] == 1.0
    # fake quantization saves a bool mask per quantized tensor and keeps the quantized copy: QAT costs more
    assert rows["qat"]["saved_for_backward"]["bool"] > 0 and "bool" not in rows["fp32"]["saved_for_backward"]
    assert rows["qat"]["alloc_peak_ratio"] > 1.0

    (stats,) = data["stats"]
    by_buffers, by_shape = _independent_state_bytes(WIDTH)
    assert stats["total_bytes"] == by_buffers == by_shape
    layers = stats["layers"]
    assert sum(r["total"] for r in layers) + sum(stats["model_level"].values()) == stats["total_bytes"]
    assert stats["model_level"] == {"pq_step": 8}
    assert stats["weight_bytes"] == sum(4 * math.prod(r["weight_shape"]) for r in layers)
    assert stats["counts"]["masks"] == sum(r["mask"] > 0 for r in layers)
    # every float64 statistic is 8 bytes per entry: the sums of a mask over C channels are 8 C + 8
    mask_layer = next(r for r in layers if r["mask"])
    c = mask_layer["weight_shape"][0]
    assert mask_layer["mask"] == 12 * c + 10

    md = (tmp_path / "memory.md").read_text()
    assert md.startswith("Measured on ") and "command: `python benchmarks/memory.py --models resnet20" in md
    for phase in ("fp32", "qat"):
        assert f"| resnet20 | 8 | {phase} |" in md
    for r in layers:
        assert f"| {r['layer']} | {'x'.join(map(str, r['weight_shape']))} | {r['weight_bytes']} |" in md
    assert f"| **total** | | {stats['weight_bytes']} |" in md
