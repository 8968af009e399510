"""File sizes per export format and ONNX Runtime CPU latency of FP32 vs QDQ.

For each model (CIFAR-shaped 3x32x32 input, 10 classes, width 1.0) the script

1. builds the dense network (random init: sizes and latency do not depend on training);
2. calibrates a compressed copy per bit-width with the Compressor on random batches (forward passes
   only, no weight updates: layerwise A-L1 pruning to ``--sparsity`` and statistics-based
   quantizers), finalizes it and removes the pruned channels with ``prunequant.graph.shrink``;
3. writes the FP32 state dict (dense), FP32 ONNX (dense and pruned), QDQ (plain and ``fold_bn``) and
   QONNX ONNX files and the packed checkpoint, and reports their sizes next to
   ``measure().weight_mbit``;
4. times ONNX Runtime (CPU execution provider, ``--threads`` intra-op threads, full graph
   optimization) on FP32 dense, FP32 pruned and QDQ pruned models: ``--runs`` timed runs per model
   after ``--warmup`` runs, models interleaved round by round so that load changes on a shared
   machine hit all of them alike; the median and the minimum are reported (quartiles in the JSON).

Usage (the numbers in docs/export.md)::

    .venv/bin/python benchmarks/export_latency.py --models resnet20 mobilenetv2 --threads 2 \
        --runs 200 --out runs/export_bench
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prunequant import Compressor, measure
from prunequant.export import export_onnx, save_packed
from prunequant.export.onnx_export import build_float_onnx
from prunequant.graph import shrink
from prunequant.models import build_model
from prunequant.utils import atomic_write_json, atomic_write_text


def calibrated(name: str, wb: int, ab: int, sparsity: float, batch: int, seed: int) -> tuple:
    """(dense model, finalized + shrunk compressed model, example input)."""
    torch.manual_seed(seed)
    dense = build_model(name, num_classes=10, in_channels=3, image_size=32, width=1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    recipe = {
        "ordering": "joint",
        "prune": {"sparsity": sparsity, "unit": "steps", "start": 1, "interval": 1, "refresh": 1},
        "quant": {"weight_bits": wb, "act_bits": ab, "unit": "steps", "weight_delay": 0, "act_delay": 0},
    }
    comp = Compressor(dense, recipe, x)
    comp.model.train()
    with torch.no_grad():
        for _ in range(comp.total_steps_hint + 2):
            comp.model(torch.randn(batch, 3, 32, 32, generator=g))
            comp.step()
    small = comp.finalize()  # recent versions shrink here already
    if not getattr(small.pq_plan, "shrunk", False):
        small = shrink(small)
    small.eval()
    dense.eval()
    return dense, small, x


def sizes(dense, models: dict, x: torch.Tensor, out: Path) -> list[dict]:
    rows = []
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    rows.append({"format": "FP32 state dict (dense)", "bytes": buf.getbuffer().nbytes})
    p = out / "fp32_dense.onnx"
    p.write_bytes(build_float_onnx(dense, x).SerializeToString())
    rows.append({"format": "FP32 ONNX (dense)", "bytes": p.stat().st_size})
    first = next(iter(models.values()))
    p = out / "fp32_pruned.onnx"
    p.write_bytes(build_float_onnx(first, x).SerializeToString())
    rows.append({"format": "FP32 ONNX (pruned)", "bytes": p.stat().st_size})
    for tag, m in models.items():
        wbytes = measure(m, x).weight_mbit * 1e6 / 8
        rows.append({"format": f"weight memory, measure() ({tag})", "bytes": round(wbytes)})
        for fmt in ("qdq", "qonnx"):
            rows.append({"format": f"{fmt.upper()} ONNX ({tag})",
                         "bytes": export_onnx(m, x, out / f"{fmt}_{tag}.onnx", format=fmt).stat().st_size})
        rows.append({"format": f"QDQ ONNX, fold_bn ({tag})",
                     "bytes": export_onnx(m, x, out / f"qdqfold_{tag}.onnx", fold_bn=True).stat().st_size})
        rows.append({"format": f"packed checkpoint ({tag})",
                     "bytes": save_packed(m, out / f"packed_{tag}.pqpack", example_input=x).stat().st_size})
    return rows


def latency(paths: dict[str, Path], threads: int, batch: int, runs: int, warmup: int, seed: int) -> dict:
    import onnxruntime as ort

    sessions = {}
    for tag, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[tag] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    times: dict[str, list[float]] = {t: [] for t in sessions}
    for i in range(warmup + runs):
        for tag, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            if i >= warmup:
                times[tag].append((time.perf_counter() - t0) * 1e3)
    res = {}
    for tag, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        res[tag] = {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "min_ms": min(ts)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    ap.add_argument("--bits", nargs="+", default=["8,8", "4,4"], help="weight,act bit pairs")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/export_bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                "onnxruntime": ort.__version__, "torch": torch.__version__},
                    "sparsity": args.sparsity, "models": {}}
    md = [f"ONNX Runtime {ort.__version__}, CPU execution provider, {args.threads} intra-op threads, "
          f"{args.sparsity:.0%} of the prunable channels removed, median [minimum] of {args.runs} runs in ms "
          "(inter-quartile ranges in export_bench.json).", ""]
    for name in args.models:
        mdir = out / name
        mdir.mkdir(exist_ok=True)
        models = {}
        dense = x = None
        for pair in args.bits:
            wb, ab = (int(v) for v in pair.split(","))
            dense, models[f"W{wb}A{ab}"], x = calibrated(name, wb, ab, args.sparsity, 8, args.seed)
        rows = sizes(dense, models, x, mdir)
        base = rows[0]["bytes"]
        md += [f"### {name}", "", "| file | bytes | vs FP32 state dict |", "|---|---:|---:|"]
        md += [f"| {r['format']} | {r['bytes']:,} | {r['bytes'] / base:.3f} |" for r in rows]
        md.append("")
        paths = {"FP32 dense": mdir / "fp32_dense.onnx", "FP32 pruned": mdir / "fp32_pruned.onnx"}
        for t in models:
            paths[f"QDQ {t}"] = mdir / f"qdq_{t}.onnx"
            paths[f"QDQ {t}, fold_bn"] = mdir / f"qdqfold_{t}.onnx"
        lat = {}
        md += ["| ONNX Runtime latency | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
               "|---|" + "---:|" * len(args.batches)]
        for b in args.batches:
            lat[b] = latency(paths, args.threads, b, args.runs, args.warmup, args.seed)
        for tag in paths:
            cells = [f"{lat[b][tag]['median_ms']:.2f} [{lat[b][tag]['min_ms']:.2f}]" for b in args.batches]
            md.append(f"| {tag} | " + " | ".join(cells) + " |")
        md.append("")
        report["models"][name] = {"sizes": rows, "latency": {str(b): v for b, v in lat.items()}}
        print("\n".join(md[-(len(rows) + len(paths) + 8):]), flush=True)
    atomic_write_json(out / "export_bench.json", report)
    atomic_write_text(out / "export_bench.md", "\n".join(md) + "\n")
    print(f"wrote {out / 'export_bench.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
