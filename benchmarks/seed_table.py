"""Summarize repeated runs (one per seed) of ``prunequant run``: final accuracy, gap to dense.

Reads ``report.json`` from each run folder and prints one markdown row per group of runs: test
accuracy per run, mean +- sample std, the mean gap to each run's own dense model, and the mean
validation accuracy. A group is given as ``LABEL=DIR[,DIR...]``, where a DIR may be a glob pattern (quote it).
The README's tables of the main benchmark come from::

    R=benchmarks/results; A=$R/ablation; W=$A/act_percentile_99.9_short_windows
    python benchmarks/seed_table.py "paper=$R/fmnist_resnet20_w4a4,$R/fmnist_resnet20_w4a4_seed*" \\
      "p999=$W,${W}_seed*"
    python benchmarks/seed_table.py \\
      "paper=$R/fmnist_resnet20_w4a4,$R/fmnist_resnet20_w4a4_seed1,$R/fmnist_resnet20_w4a4_seed2" \\
      "short windows=$R/fmnist_resnet20_w4a4_short_windows,$A/short_windows_seed*" \\
      "p99.9=$A/act_percentile_99.9,$A/act_percentile_99.9_seed*" \\
      "p99.9 + short windows=$W,${W}_seed[12]" \\
      "p99.9 + distill=$A/act_percentile_99.9_distill_0.5,$A/act_percentile_99.9_distill_0.5_seed*" \\
      "p99.9 + mse=$A/act_percentile_99.9_weight_clip_mse*" \\
      "p99.9 + qtp=$A/act_percentile_99.9_quantize_then_prune*"

Add ``--json OUT`` to also write the numbers as JSON (atomically).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

from prunequant.utils import atomic_write_json


def load(run: Path) -> dict[str, float]:
    """Dense and final test accuracy, final validation accuracy and seed of one finished run folder."""
    rep = json.loads((run / "report.json").read_text())
    ph = rep["phases"]
    return {"dense": ph["dense"]["accuracy"], "final": ph["final"]["accuracy"],
            "final_val": ph["final"].get("val_accuracy"), "seed": rep["config"]["train"]["seed"]}


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(label: str, runs: list[Path]) -> dict[str, object]:
    """Mean +- sample std over the runs of one group (std is 0 for a single run)."""
    rows = [load(r) for r in runs]
    final = [r["final"] for r in rows]
    gaps = [r["dense"] - r["final"] for r in rows]
    vals = [r["final_val"] for r in rows if r["final_val"] is not None]
    return {"label": label, "runs": [str(r) for r in runs], "seeds": [r["seed"] for r in rows],
            "final": final, "final_mean": statistics.fmean(final), "final_std": _sd(final),
            "gap_mean": statistics.fmean(gaps), "gap_std": _sd(gaps), "gaps": gaps,
            "val_mean": statistics.fmean(vals) if vals else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="+", help="LABEL=RUN_DIR[,RUN_DIR...]")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    out = []
    for g in args.groups:
        label, sep, dirs = g.partition("=")
        runs = [Path(m) for d in dirs.split(",") if d
                for m in (sorted(glob.glob(d)) if glob.has_magic(d) else [d])]
        if not sep or not runs:
            ap.error(f"group {g!r}: expected LABEL=RUN_DIR[,RUN_DIR...]")
        missing = [str(r) for r in runs if not (r / "report.json").is_file()]
        if missing:
            ap.error(f"group {label!r}: no report.json in {', '.join(missing)}")
        out.append(summarize(label, runs))
    print("| runs | test % per seed | mean +- std | gap to dense | val % mean |")
    print("|---|---|---:|---:|---:|")
    for s in out:
        per = " / ".join(f"{x:.2f}" for x in s["final"])
        val = f"{s['val_mean']:.2f}" if s["val_mean"] is not None else "-"
        print(f"| {s['label']} | {per} | {s['final_mean']:.2f} +- {s['final_std']:.2f} | "
              f"{s['gap_mean']:.2f} +- {s['gap_std']:.2f} | {val} |")
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
