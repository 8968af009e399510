"""Post-training probe: how much 4-bit quantization costs with min/max vs percentile activation ranges.

Takes a finished *prune-only* run (FP32 subnetwork), quantizes it without any training using the
library's own quantizers, and reports validation accuracy for each activation-range statistic.
Weights get per-channel max scales (``--weight-clip max``, the paper's) or MSE-clipped ones; activation
bounds come from ``--calib`` training batches (BatchNorm stays frozen). The first layer's input and the
last layer stay at 8 bits, as in the benchmark recipe. ::

    prunequant run --config recipes/fmnist_resnet20_w4a4.yaml --set recipe.quant=null --out runs/prune_only
    python benchmarks/ptq_ranges.py runs/prune_only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunequant.config import RunConfig
from prunequant.graph.persist import load_pruned
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer
from prunequant.train.trainer import evaluate, load_data


def _quantize(model: nn.Module, layers: list[tuple[str, nn.Module]], percentile: float | None,
              wbits: int, abits: int, first: str, last: str, clip: str, calib: list[torch.Tensor]) -> list:
    """Quantize weights in place and attach activation quantizers; returns the hook handles."""
    hooks = []
    for name, mod in layers:
        wb = 8 if name == last else wbits
        ab = 8 if name in (first, last) else abits
        w = mod.weight.detach()
        wq = WeightQuantizer(wb, None if isinstance(mod, nn.Linear) else w.shape[0], 0, clip=clip)
        wq.enabled.fill_(True)
        with torch.no_grad():
            mod.weight.copy_(wq(w))
        aq = ActQuantizer(ab, percentile if ab < 8 else None)
        aq.enabled.fill_(True)
        mod.pq_probe_aq = aq
        hooks.append(mod.register_forward_pre_hook(lambda m, args: (m.pq_probe_aq(args[0]),)))
    model.eval()
    for _, mod in layers:
        mod.pq_probe_aq.train()  # gather bounds; BatchNorm stays in eval
    with torch.no_grad():
        for x in calib:
            model(x)
    for _, mod in layers:
        mod.pq_probe_aq.eval()
    return hooks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished prune-only run (recipe.quant=null)")
    p.add_argument("--percentiles", type=float, nargs="+", default=[99.0, 99.9, 99.99])
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=4)
    p.add_argument("--weight-clip", choices=["max", "mse"], default="max")
    p.add_argument("--first", default="conv1", help="layer whose input stays at 8 bits")
    p.add_argument("--last", default="fc", help="layer kept at 8 bits (weights and input)")
    p.add_argument("--calib", type=int, default=32, help="training batches for activation bounds")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Path(a.run_dir)
    rep = json.loads((run / "report.json").read_text())
    cfg = RunConfig.from_dict(rep["config"], where=str(run / "report.json"))
    if cfg.recipe.quant is not None:
        print(f"{run}: this run already quantized; pass a prune-only run (recipe.quant=null)",
              file=sys.stderr)
        return 2
    c, h, w = rep["data"]["input_shape"]
    base = build_model(cfg.model.name, num_classes=rep["data"]["num_classes"], in_channels=c, image_size=h,
                       width=cfg.model.width)
    model = load_pruned(base, run / "model", torch.zeros(1, c, h, w)).eval()
    data = load_data(cfg, log=lambda s: None)
    loader = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    calib = [x for _, (x, _) in zip(range(a.calib), loader, strict=False)]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    original = {n: m.weight.detach().clone() for n, m in layers}
    dev = torch.device("cpu")
    rows = [("FP32", None, evaluate(model, data.val, dev))]
    for pct in [None, *a.percentiles]:
        hooks = _quantize(model, layers, pct, a.weight_bits, a.act_bits, a.first, a.last, a.weight_clip,
                          calib)
        label = "min/max (paper)" if pct is None else f"percentile {pct:g}"
        rows.append((f"W{a.weight_bits}A{a.act_bits} {label}", pct, evaluate(model, data.val, dev)))
        for hk in hooks:
            hk.remove()
        with torch.no_grad():
            for n, m in layers:
                m.weight.copy_(original[n])
    print(f"| activation ranges (weights: {a.weight_clip}) | val acc % |\n|---|---:|")
    for label, _, acc in rows:
        print(f"| {label} | {acc:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
