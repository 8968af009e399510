"""Layerwise A-L1 vs one-shot A-L1 vs W-L1 under the same training budget, several seeds.

For each seed the dense network is trained once (cached as ``OUT/seed{N}/dense.pt``; finished runs are
cached as ``OUT/seed{N}/m{K}/result.json`` so the script can be resumed) and every method
fine-tunes a copy of it with the same number of compression steps and the same learning-rate
schedule; only the importance measure / schedule differ. Prints mean +- std of test accuracy and
writes ``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare.png``.

Reproduce the README tables: the full pipeline (W4A4, full data; about 100 CPU-minutes)::

    .venv/bin/python benchmarks/compare_importance.py --config recipes/fmnist_resnet20_w4a4.yaml \
        --sparsity 0.75 --seeds 0 1 2 --threads 1 --out runs/compare75

and pruning only on a 20,000-image subset (about 70 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/compare_importance.py --config recipes/fmnist_resnet20_compare.yaml \
        --sparsity 0.75 --seeds 0 1 2 --no-quant --out runs/compare

Seeds can run as separate processes (``--seeds 0``, ``--seeds 1``, ... with the same ``--out``); a
final call with all seeds reads the cached results and writes the combined table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import yaml

from prunequant.config import RunConfig
from prunequant.recipe import load_yaml
from prunequant.train.trainer import run
from prunequant.utils import atomic_write_json, atomic_write_text

METHODS = {
    "layerwise A-L1 (paper)": {"importance": "a_l1", "schedule": "layerwise"},
    "one-shot A-L1": {"importance": "a_l1", "schedule": "oneshot"},
    "layerwise W-L1": {"importance": "w_l1", "schedule": "layerwise"},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="base run configuration (YAML)")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-quant", action="store_true", help="prune only (FP32), no QAT")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    a = p.parse_args(argv)
    out = Path(a.out)
    base = load_yaml(a.config)
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in a.seeds:
        sdir = out / f"seed{seed}"
        dense = sdir / "dense.pt"
        for k, (name, over) in enumerate(METHODS.items()):
            cfg_d = copy.deepcopy(base)
            cfg_d.setdefault("train", {})["seed"] = seed
            cfg_d["train"]["progress"] = sys.stderr.isatty()
            if a.threads:
                cfg_d["train"]["threads"] = a.threads
            cfg_d.setdefault("recipe", {}).setdefault("prune", {}).update(over, sparsity=a.sparsity)
            if a.no_quant:
                cfg_d["recipe"]["quant"] = None
            if dense.exists():
                cfg_d["train"]["dense_checkpoint"] = str(dense)
            cfg = RunConfig.from_dict(cfg_d, where=f"{a.config} ({name}, seed {seed})")
            rdir = sdir / f"m{k}"
            done = rdir / "result.json"
            if done.exists():  # resumable: a finished (seed, method) is not run again
                res = json.loads(done.read_text())
            else:
                # overwrite: a folder left by an interrupted run is run again
                res = run(cfg, rdir, log=lambda s: print(s, file=sys.stderr), overwrite=True)
                if not dense.exists():
                    (rdir / "dense.pt").replace(dense)
                atomic_write_json(done, res)
            fin = res["phases"]["final"]
            rows[name].append(
                {
                    "seed": seed,
                    "accuracy": fin["accuracy"],
                    "dense": res["phases"]["dense"]["accuracy"],
                    "memory_mbit": fin["memory_mbit"],
                    "macs": fin["macs"],
                }
            )
            print(
                f"seed {seed} {name}: test acc {fin['accuracy']:.2f} % (dense {rows[name][-1]['dense']:.2f})",
                flush=True,
            )
    summary = {}
    for name, rs in rows.items():
        accs = [r["accuracy"] for r in rs]
        summary[name] = {
            "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "runs": rs,
        }
    atomic_write_json(
        out / "compare.json",
        {
            "config": a.config,
            "sparsity": a.sparsity,
            "seeds": a.seeds,
            "quant": not a.no_quant,
            "methods": summary,
            "base": yaml.safe_load(yaml.safe_dump(base)),
        },
    )
    lines = [
        f"| method ({a.sparsity:.0%} channel sparsity{'' if not a.no_quant else ', FP32'}) | "
        f"test acc % (mean +- std, {len(a.seeds)} seeds) | per seed |",
        "|---|---:|---|",
    ]
    for name, s in summary.items():
        per = ", ".join(f"{r['accuracy']:.2f}" for r in s["runs"])
        lines.append(f"| {name} | {s['mean']:.2f} +- {s['std']:.2f} | {per} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "compare.md", table)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(summary)
        ax.bar(
            range(len(names)),
            [summary[n]["mean"] for n in names],
            yerr=[summary[n]["std"] for n in names],
            capsize=6,
            color=["#1f77b4", "#ff7f0e", "#2ca02c"],
        )
        for i, n in enumerate(names):
            ax.scatter(
                [i] * len(summary[n]["runs"]), [r["accuracy"] for r in summary[n]["runs"]], color="k", s=12
            )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        lo = min(r["accuracy"] for n in names for r in summary[n]["runs"])
        hi = max(r["accuracy"] for n in names for r in summary[n]["runs"])
        ax.set_ylim(lo - 1.0, hi + 0.5)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Importance / schedule at {a.sparsity:.0%} sparsity")
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=120)
    except Exception as e:  # plotting is a convenience; the JSON and table are the result
        print(f"warning: plot failed: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
