"""Residual channel groups on vs off on the main benchmark (ResNet-20, full Fashion-MNIST, W4A4).

Per seed, three cells share one dense network and one compression budget (``recipes/
fmnist_resnet20_w4a4.yaml``: 4 dense epochs, 3 compression epochs):

* ``off``: the paper's placement (block-internal channels only) at 50 % sparsity; trains the dense
  network and leaves it in ``off_s<seed>/dense.pt``;
* ``on``: ``prune.groups: true`` at the same 50 % (equal sparsity), from that dense network;
* ``on_eqmem``: groups on at the sparsity whose W4A4 memory (weights + activations, Mbit) is closest
  to the ``off`` cell's (equal memory), from the same dense network.

Every cell is a ``prunequant run`` folder under ``benchmarks/results/groups/``; a finished cell
(its ``report.json`` present and its manifest intact) is skipped, so the benchmark resumes where it
stopped. The table (mean +- sample std over seeds) goes to ``groups.md`` / ``groups.json`` there::

    .venv/bin/python benchmarks/groups_main.py --seeds 0 1 2
    .venv/bin/python benchmarks/groups_main.py --seeds 0 --cells on --threads 1  # once dense.pt exists
    .venv/bin/python benchmarks/groups_main.py --table-only      # summarize what is finished

``--epochs-scale`` shortens every phase for a quick look (not the benchmark).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from prunequant.config import RunConfig
from prunequant.export.cpu import cpu_features
from prunequant.recipe import load_yaml
from prunequant.runfolder import verify_run
from prunequant.train.trainer import resumable
from prunequant.utils import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "fmnist_resnet20_w4a4.yaml"
OUT = ROOT / "benchmarks" / "results" / "groups"
CELLS = ("off", "on", "on_eqmem")
THREADS: int | None = None  # --threads: torch threads per cell (default: every core)


def _config(seed: int, groups: bool, sparsity: float, dense: Path | None, scale: float) -> RunConfig:
    data = load_yaml(RECIPE)
    if THREADS:
        data["train"]["threads"] = THREADS
    data["train"]["seed"] = seed
    data["recipe"]["prune"]["groups"] = groups
    data["recipe"]["prune"]["sparsity"] = sparsity
    data["train"]["progress"] = False
    if dense is not None:
        data["train"]["dense_checkpoint"] = str(dense)
    if scale != 1.0:
        data["train"]["dense_epochs"] *= scale
        data["train"]["epochs"] *= scale
        for k in ("start", "interval", "refresh"):
            data["recipe"]["prune"][k] *= scale
        for k in ("weight_delay", "act_delay"):
            data["recipe"]["quant"][k] *= scale
    return RunConfig.from_dict(data, where=str(RECIPE))


def _done(folder: Path) -> bool:
    if not (folder / "report.json").exists():
        return False
    try:
        verify_run(folder)
    except Exception:  # an interrupted or edited cell is run again
        return False
    return True


def memory_at(cfg: RunConfig, sparsity: float) -> float:
    """W4A4 memory (Mbit) of the compressed ResNet-20 at ``sparsity`` (channel counts only, no training)."""
    from prunequant import Compressor, measure
    from prunequant.models import build_model
    from prunequant.prune.mask import mask_from_scores
    from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer

    model = build_model(cfg.model.name, num_classes=10, in_channels=1, image_size=28, width=cfg.model.width)
    x = torch.zeros(2, 1, 28, 28)
    recipe = cfg.recipe.model_copy(deep=True)
    recipe.prune.sparsity = sparsity
    comp = Compressor(model, recipe, x, steps_per_epoch=100)
    for s in comp.plan.sites:
        m = comp.model.get_submodule(s.mask)
        m.mask.copy_(mask_from_scores(torch.arange(s.channels, dtype=torch.float32), comp._target(s.name),
                                      round_to=recipe.prune.round_to, block=s.block, parts=s.parts))
    for q in comp.model.modules():
        if isinstance(q, (ActQuantizer, WeightQuantizer)):
            q.enabled.fill_(True)
    return measure(comp.model, x).memory_mbit


def equal_memory_sparsity(cfg_on: RunConfig, target: float) -> float:
    """The groups-on sparsity (grid of 0.01) whose memory is closest to ``target`` Mbit."""
    grid = [round(0.01 * k, 2) for k in range(5, 90)]
    return min(grid, key=lambda s: abs(memory_at(cfg_on, s) - target))


def _run_cell(cfg: RunConfig, out: Path) -> None:
    """One ``prunequant run`` (what the CLI does): train, then report.json / summary.md, recorded last.
    A cell interrupted with this same configuration continues from its last checkpoint; any other
    leftover folder is replaced (its own dense.pt kept when the configuration loads it)."""
    from prunequant.train.trainer import resumable, run_and_report

    again = resumable(out, cfg)
    run_and_report(cfg, out, log=lambda m: None, resume=again, overwrite=not again)


def run_cells(seeds: list[int], scale: float, cells: tuple[str, ...] = CELLS) -> None:
    """Run the missing cells; ``on`` / ``on_eqmem`` need the ``off`` cell's dense.pt (they can run in
    other processes once it is written)."""
    for seed in seeds:
        off = OUT / f"off_s{seed}"
        if "off" in cells and not _done(off):
            # An interrupted off cell's dense.pt (listed in its manifest) is the same dense network:
            # the run continues from it exactly as a run loading it through train.dense_checkpoint.
            ckpt = off / "dense.pt" if (off / "dense.pt").exists() else None
            if ckpt is not None and resumable(off, _config(seed, False, 0.5, None, scale)):
                ckpt = None  # the interrupted run's own checkpoints carry on from where it stopped
            print(f"[seed {seed}] off: {'from its dense.pt' if ckpt else 'training dense'} + compressing",
                  flush=True)
            _run_cell(_config(seed, False, 0.5, ckpt, scale), off)
        dense = off / "dense.pt"
        if not dense.exists():
            raise SystemExit(f"{dense} is missing: run the off cell of seed {seed} first")
        on = OUT / f"on_s{seed}"
        if "on" in cells and not _done(on):
            print(f"[seed {seed}] on: groups at 50 %", flush=True)
            _run_cell(_config(seed, True, 0.5, dense, scale), on)
        eq = OUT / f"on_eqmem_s{seed}"
        if "on_eqmem" in cells and not _done(eq):
            target = memory_at(_config(seed, False, 0.5, None, scale), 0.5)  # the off cell's final memory
            s = equal_memory_sparsity(_config(seed, True, 0.5, dense, scale), target)
            print(f"[seed {seed}] on_eqmem: groups at {s:.2f} (memory of off: {target:.3f} Mbit)", flush=True)
            _run_cell(_config(seed, True, s, dense, scale), eq)
        table()


def _row(rep: dict) -> dict:
    f = rep["phases"]["final"]
    return {"accuracy": f["accuracy"], "memory_mbit": f["memory_mbit"], "act_mbit": f["act_mbit"],
            "weight_mbit": f["weight_mbit"], "macs": f["macs"], "bops": f["bops"], "params": f["params"],
            "dense": rep["phases"]["dense"]["accuracy"],
            "sparsity": rep["config"]["recipe"]["prune"]["sparsity"], "sites": len(rep.get("layers", [])),
            "shrink_argmax": rep["shrink_check"].get("argmax_agreement")}


def table() -> dict:
    """Mean +- std per cell over the finished seeds; writes groups.json and groups.md."""
    rows: dict[str, list[dict]] = {c: [] for c in CELLS}
    for c in CELLS:
        for folder in sorted(OUT.glob(f"{c}_s*")):
            if folder.name.startswith("on_eqmem") and c == "on":
                continue
            if _done(folder):
                r = _row(json.loads((folder / "report.json").read_text()))
                r["seed"] = int(folder.name.rsplit("_s", 1)[1])
                rows[c].append(r)

    def ms(vals: list[float], fmt: str) -> str:
        if not vals:
            return "-"
        if len(vals) == 1:
            return format(vals[0], fmt)
        return f"{format(statistics.mean(vals), fmt)} +- {format(statistics.stdev(vals), fmt)}"

    labels = {"off": "groups off (paper), 50 %", "on": "groups on, 50 % (equal sparsity)",
              "on_eqmem": "groups on, equal memory"}
    lines = ["| cell | seeds | sparsity | test acc % | memory Mbit | act Mbit | weight Mbit | MMACs | GBOPs "
             "| shrink argmax agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in CELLS:
        rs = rows[c]
        if not rs:
            continue
        lines.append(
            f"| {labels[c]} | {', '.join(str(r['seed']) for r in rs)} "
            f"| {ms([r['sparsity'] for r in rs], '.2f')} "
            f"| {ms([r['accuracy'] for r in rs], '.2f')} | {ms([r['memory_mbit'] for r in rs], '.3f')} "
            f"| {ms([r['act_mbit'] for r in rs], '.3f')} | {ms([r['weight_mbit'] for r in rs], '.3f')} "
            f"| {ms([r['macs'] / 1e6 for r in rs], '.2f')} | {ms([r['bops'] / 1e9 for r in rs], '.3f')} "
            f"| {ms([r['shrink_argmax'] for r in rs], '.4f')} |")
    cpu = cpu_features()
    command = " ".join([".venv/bin/python", "benchmarks/groups_main.py", *sys.argv[1:]])
    head = (f"Measured on {cpu.name} ({cpu.brand}), torch {torch.__version__}, recipe {RECIPE.name}; "
            f"command: `{command}`.\n\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "groups.md").write_text(head + "\n".join(lines) + "\n")
    out = {"cpu": cpu.as_dict(), "torch": torch.__version__, "recipe": RECIPE.name, "cells": rows}
    atomic_write_json(OUT / "groups.json", out)
    print(head + "\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    global OUT, THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table-only", action="store_true", help="only summarize finished cells")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="shorten every phase (quick look only)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results folder (default {OUT})")
    ap.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS),
                    help="only these cells (several processes can share the work once dense.pt exists)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per cell (one per process when several processes share the cores)")
    args = ap.parse_args(argv)
    OUT = args.out
    THREADS = args.threads
    if args.table_only:
        table()
    else:
        run_cells(args.seeds, args.epochs_scale, tuple(args.cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
