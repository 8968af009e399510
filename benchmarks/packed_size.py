"""Packed checkpoint size versus ``measure()``'s weight memory, plain and with ``fold_bn=True``.

Two references: ``weight_mbit`` (the paper's b bits x remaining weights) and ``deploy_weight_mbit``
(those plus the float32 scale and bias per channel that integer inference keeps).

For each model (CIFAR-shaped 3x32x32 input, width 1.0, calibrated and shrunk exactly as in
``export_latency.py``: sizes do not depend on training) and bit-width, the script encodes the packed
checkpoint plainly and in the folded deployment form and reports the bytes of each part.

With ``--run RUN_DIR`` (the ``--out`` folder of a finished ``prunequant run`` on Fashion-MNIST) it
also loads that trained model, folds it, and reports the file sizes, the test accuracy of both and
their argmax agreement over the whole test set: the cost of folding, measured on a real model.

Usage (the numbers in docs/export.md)::

    .venv/bin/python benchmarks/packed_size.py --models resnet20 mobilenetv2 vgg_small \
        --bits 8,8 4,4 2,8 --run runs/bench_main --out runs/packed_size
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_latency import calibrated  # noqa: E402

from prunequant import measure  # noqa: E402
from prunequant.export import fold_batchnorm, packed_size_report  # noqa: E402
from prunequant.export.packed import encode_packed  # noqa: E402
from prunequant.utils import atomic_write_json  # noqa: E402


def size_row(model: torch.nn.Module, x: torch.Tensor, fold: bool) -> dict:
    """Bytes of each part of the packed file, and the overhead beyond measure()'s weight memory (b-bit
    weights) and beyond its deployed weight memory (plus float32 scales and biases)."""
    rep = packed_size_report(encode_packed(model, example_input=x, fold_bn=fold))
    m = measure(model, x)
    weight, deploy = m.weight_mbit * 1e6 / 8, m.deploy_weight_mbit * 1e6 / 8
    return {**rep, "weight_memory": weight, "overhead_pct": 100.0 * (rep["total"] - weight) / weight,
            "deploy_weight_memory": deploy, "deploy_overhead_pct": 100.0 * (rep["total"] - deploy) / deploy}


def trained_run(run_dir: Path) -> dict:
    """Sizes and test accuracy of a finished run's model, plain and folded."""
    from prunequant.config import RunConfig
    from prunequant.graph.persist import load_pruned
    from prunequant.models import build_model
    from prunequant.train.trainer import load_data

    rep = json.loads((run_dir / "report.json").read_text())
    cfg = RunConfig.from_dict(rep["config"])
    c, h, w = rep["data"]["input_shape"]
    base = build_model(cfg.model.name, num_classes=rep["data"]["num_classes"], in_channels=c, image_size=h,
                       width=cfg.model.width)
    x = torch.zeros(1, c, h, w)
    model = load_pruned(base, run_dir / "model", x).eval()
    folded = fold_batchnorm(model).eval()
    data = load_data(cfg, log=lambda s: None)
    loader = torch.utils.data.DataLoader(data.test, batch_size=1000)
    hits = {"trained": 0, "folded": 0}
    agree = n = 0
    with torch.no_grad():
        for xb, yb in loader:
            a, b = model(xb).argmax(1), folded(xb).argmax(1)
            hits["trained"] += int((a == yb).sum())
            hits["folded"] += int((b == yb).sum())
            agree += int((a == b).sum())
            n += len(yb)
    return {"run": str(run_dir), "plain": size_row(model, x, False), "folded": size_row(model, x, True),
            "test_accuracy": {k: 100.0 * v / n for k, v in hits.items()},
            "argmax_agreement": 100.0 * agree / n, "test_images": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2", "vgg_small"])
    ap.add_argument("--bits", nargs="+", default=["8,8", "4,4"], help="W,A pairs")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--run", type=Path, help="a finished `prunequant run` folder to measure as well")
    ap.add_argument("--out", type=Path, default=Path("runs/packed_size"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"models": []}
    print("| model | bits | weight_mbit (B) | deploy_weight_mbit (B) | plain file | over weight / deploy | "
          "fold_bn file | over weight / deploy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for bits in args.bits:
            wb, ab = (int(v) for v in bits.split(","))
            _, small, x = calibrated(name, wb, ab, args.sparsity, batch=8, seed=0)
            plain, fold = size_row(small, x[:1], False), size_row(small, x[:1], True)
            result["models"].append({"model": name, "bits": [wb, ab], "plain": plain, "folded": fold})
            cells = [name, f"W{wb}A{ab}", f"{plain['weight_memory']:,.0f}",
                     f"{plain['deploy_weight_memory']:,.0f}"]
            for r in (plain, fold):
                cells += [f"{r['total']:,}", f"{r['overhead_pct']:.1f} % / {r['deploy_overhead_pct']:.1f} %"]
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.run is not None:
        r = trained_run(args.run)
        result["run"] = r
        p, f, acc = r["plain"], r["folded"], r["test_accuracy"]
        print(f"\n{args.run}: weight memory {p['weight_memory']:,.0f} B, "
              f"deployed {p['deploy_weight_memory']:,.0f} B; "
              f"plain {p['total']:,} B ({p['overhead_pct']:.1f} % / {p['deploy_overhead_pct']:.1f} %), "
              f"fold_bn {f['total']:,} B ({f['overhead_pct']:.1f} % / {f['deploy_overhead_pct']:.1f} %); "
              f"test accuracy trained {acc['trained']:.2f} %, folded {acc['folded']:.2f} %, "
              f"argmax agreement {r['argmax_agreement']:.2f} % on {r['test_images']:,} images")
    atomic_write_json(args.out / "packed_size.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
