"""The method grid: importance x schedule x sparsity x bits, plus dense width baselines (issue 13).

Axes (METHOD.md sections 4-6): importance {A-L1, A-L0, W-L1, random} x schedule {layerwise, one-shot,
stepwise} x channel sparsity {50, 75 %} x bits {FP32, W8A8, W4A8, W4A4}, and the dense network at
1/2 and 1/4 width trained from scratch with the same total budget, at FP32 and W4A4. Default: ResNet-20
on full Fashion-MNIST, ``recipes/fmnist_resnet20_w4a4.yaml`` (4 dense epochs + 3 compression epochs);
``--config`` / ``--set`` change the model, data (``--set data.name=cifar10 --set data.root=DIR`` for a
CIFAR-10 folder) and sizes exactly as for ``prunequant run``.

Sub-grids (``--grid``; several may be named, cells they share run once):

* ``method``: importance x schedule at 75 % sparsity, W4A4 (12 cells per seed): is the layerwise A-L1
  estimate better than the naive ones under the same budget (METHOD section 1)?
* ``bits``: bits x sparsity for the paper's method (layerwise A-L1; 8 cells per seed): accuracy vs
  memory / BOPs, performance density (section 6).
* ``width``: the dense network at width 1 (the reference, ``dense_s<seed>``), 1/2 and 1/4, each at FP32
  and W4A4 (QAT, no pruning; 6 cells per seed): is a pruned network better than a thin one of the same
  size trained from scratch (section 4, baselines)?
* ``all``: the full product (96 cells per seed) plus ``width``; ``quick``: a handful of cells.

Cells and budgets. Per seed, ``dense_s<seed>/`` is a ``prunequant run`` of the full-width network with
no compression: ``train.dense_epochs`` of dense training (its ``dense.pt``, :func:`dense_path`, is *the*
dense network of that seed) followed by ``train.epochs`` of FP32 fine-tuning at ``train.compress_lr``.
Every compressed cell (``pq_<importance>_<schedule>_<sparsity %>_<bits>_s<seed>``) and the width-1 W4A4
cell load that ``dense.pt`` (``train.dense_checkpoint``) and run the same ``train.epochs`` of compression;
the thin networks (``width_x0.5_<bits>_s<seed>``, ...) train from scratch for ``train.dense_epochs`` and
then ``train.epochs`` of FP32 fine-tuning or W4A4 QAT, the same total budget and learning-rate schedule.
``prune.seed`` is the run's seed (only the random importance reads it).

Every cell is a ``prunequant run`` folder under ``--out`` with ``report.json`` / ``summary.md`` as the CLI
writes them. A cell whose ``report.json`` is present and whose manifest verifies is finished and skipped,
so the grid resumes where it stopped. Several processes may share one ``--out``: each claims a cell with
an atomic lock file ``<out>/locks/<cell>.lock`` (``O_CREAT | O_EXCL``, holding pid, host and the
process's start time); a lock whose process is gone (same host) is taken over, so two processes never
run the same cell. A cell whose dense network another process is still training waits; the process
meanwhile runs cells that do not need it (``--max-wait`` bounds the wait).

``cell.json`` (the uniform record of a finished cell, written atomically and last; other scripts such as
``benchmarks/peers.py`` write ``peer_<name>_<sparsity %>_s<seed>/cell.json`` (``peer_<name>_s<seed>`` for
a peer that prunes nothing) into the same ``--out`` with :func:`write_cell`, from the same base
configuration, :func:`base_config`), fields :data:`CELL_FIELDS`:

==============  ==================================================================================
id              the cell's folder name, ending in ``_s<seed>`` (the group is the id without it)
family          ``"prunequant"`` | ``"width"`` | ``"peer"``
label           a readable name (``"A-L1 layerwise 75 % W4A4"``)
seed            int
importance      ``a_l1`` / ``a_l0`` / ``w_l1`` / ``random``, or null
schedule        ``layerwise`` / ``oneshot`` / ``stepwise``, or null
sparsity        channel sparsity in [0, 1), or null (no channel pruning)
bits            bits label: ``"FP32"``, ``"W8A8"``, ``"W4A8"``, ``"W4A4"`` or another non-empty string
accuracy        final test accuracy, %
dense_accuracy  test accuracy of the dense network it started from (%), or null
memory_mbit     weights + activations, Mbit (METHOD section 6); > 0
weight_mbit     weights, Mbit
act_mbit        activations, Mbit
macs            multiply-accumulates per sample
bops            bit operations per sample (MACs x b_w x b_a)
params          parameters
density         accuracy / memory_mbit (%/Mbit), checked against the two
levels          null for prunequant / width; for a peer optionally ``{"weights": int, "acts": int}``
                (distinct quantization levels seen, e.g. 3 for ternary weights; 0: not measured)
note            str, may be empty; shown in the tables
==============  ==================================================================================

Outputs in ``--out``: ``grid.json`` (every cell, and per group mean +- sample std over seeds), ``grid.md``
(one table per sub-grid, other cells, and the peers per sparsity beside prunequant's layerwise A-L1 cell of
that sparsity and bits; CPU class and the commands), ``pareto_memory.png``
(accuracy vs memory, log x) and ``pareto_bops.png`` (accuracy vs BOPs, log x), Pareto fronts drawn.
Full size, e.g. two processes on a 2-core machine, one thread each (the first trains dense_s0, the
second dense_s1; then they share the thin networks, dense_s2 and the compressed cells)::

    .venv/bin/python benchmarks/grid.py --threads 1 --no-progress > grid_1.log 2>&1 &
    .venv/bin/python benchmarks/grid.py --threads 1 --no-progress > grid_2.log 2>&1 &
    .venv/bin/python benchmarks/grid.py --table-only     # after (or during): tables and plots

A process that was killed leaves its lock behind; the next process on the same host takes it over. A
lock written on another host is never taken over (its process cannot be checked): delete it by hand.
Cost, estimated from earlier runs of this recipe at one thread per cell (about 0.4 s per compression
step of 128 images on a quiet 2-core AMD EPYC, up to 3x that on a busy one, plus 1-2 minutes of
evaluation per cell): ~10-25 CPU-minutes per compressed cell (1,263 steps), ~20-45 for a dense cell,
~5-15 for a thin one; the default grid (method + bits + width: 25 cells per seed) ~4-10 CPU-hours per
seed; ``all`` has 102 cells per seed.

``--quick`` is a tiny smoke run (a few hundred images, a few steps per phase, one seed, five cells), not
a benchmark; ``--table-only`` regenerates the outputs from the cached cells.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunequant.runfolder import HOST, FileLock, read_lock
from prunequant.runfolder import proc_start as _start_time  # noqa: F401 (the tests read it here)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "fmnist_resnet20_w4a4.yaml"
OUT = ROOT / "benchmarks" / "results" / "grid"
OUT_QUICK = ROOT / "benchmarks" / "results" / "grid_quick"

#: The uniform record of a finished cell (``cell.json``); see the module docstring.
CELL_FIELDS = ("id", "family", "label", "seed", "importance", "schedule", "sparsity", "bits", "accuracy",
               "dense_accuracy", "memory_mbit", "weight_mbit", "act_mbit", "macs", "bops", "params",
               "density", "levels", "note")
FAMILIES = ("prunequant", "width", "peer")
#: The fields averaged over seeds in ``grid.json``.
NUMERIC = ("accuracy", "dense_accuracy", "memory_mbit", "weight_mbit", "act_mbit", "macs", "bops", "params",
           "density")

IMPORTANCES = {"a_l1": "A-L1", "a_l0": "A-L0", "w_l1": "W-L1", "random": "random"}
SCHEDULES = {"layerwise": "layerwise", "oneshot": "one-shot", "stepwise": "stepwise"}
SPARSITIES = (0.5, 0.75)
#: bits label -> (weight bits, activation bits); None: no quantization. The recipe's per-layer bits
#: (the network input and the classifier at 8 bits in the default recipe) are kept.
BITS: dict[str, tuple[int, int] | None] = {"FP32": None, "W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
WIDTHS = (1.0, 0.5, 0.25)
WIDTH_BITS = ("FP32", "W4A4")
GRIDS = ("method", "bits", "width", "all", "quick")
#: --quick: the sizes (as --set overrides, applied before the user's), one seed, these cells.
QUICK_SETS = ("data.train_subset=128", "data.test_subset=100", "data.val_fraction=0.0", "data.batch_size=16",
              "train.dense_epochs=1", "train.epochs=3", "train.threads=1", "recipe.prune.unit=steps",
              "recipe.prune.start=1", "recipe.prune.interval=1", "recipe.prune.refresh=1",
              "recipe.quant.unit=steps", "recipe.quant.weight_delay=1", "recipe.quant.act_delay=1")
QUICK_NOTE = "quick run (tiny data, a few steps): not a benchmark"
_SEED_SUFFIX = re.compile(r"_s(\d+)$")


# ----------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One cell of the grid (one seed)."""

    family: str  # "prunequant" | "width"
    seed: int
    bits: str
    importance: str | None = None
    schedule: str | None = None
    sparsity: float | None = None
    width: float = 1.0

    @property
    def is_dense(self) -> bool:
        """The full-width FP32 cell: trains the seed's dense network."""
        return self.family == "width" and self.width == 1.0 and self.bits == "FP32"

    @property
    def needs_dense(self) -> bool:
        """Whether the cell fine-tunes the seed's dense network (``dense_s<seed>/dense.pt``)."""
        if self.family == "prunequant":
            return True
        return self.family == "width" and self.width == 1.0 and not self.is_dense

    @property
    def group(self) -> str:
        """The id without the seed."""
        if self.is_dense:
            return "dense"
        if self.family == "width":
            return f"width_x{self.width:g}_{self.bits}"
        return f"pq_{self.importance}_{self.schedule}_{round(100 * (self.sparsity or 0.0))}_{self.bits}"

    @property
    def id(self) -> str:
        """The cell's folder name."""
        return f"{self.group}_s{self.seed}"

    def label(self, model: str = "") -> str:
        """A readable name."""
        if self.family == "width":
            what = f"{model} " if model else ""
            return f"{what}x{self.width:g} {self.bits}" + (" (dense)" if self.is_dense else "")
        return (f"{IMPORTANCES[self.importance or '']} {SCHEDULES[self.schedule or '']} "
                f"{round(100 * (self.sparsity or 0.0))} % {self.bits}")


def _pq(seed: int, imp: str, sched: str, sp: float, bits: str) -> Cell:
    return Cell("prunequant", seed, bits, imp, sched, sp)


def subgrid(name: str, seed: int) -> list[Cell]:
    """The cells of sub-grid ``name`` for one seed."""
    if name == "method":
        return [_pq(seed, i, s, 0.75, "W4A4") for i in IMPORTANCES for s in SCHEDULES]
    if name == "bits":
        return [_pq(seed, "a_l1", "layerwise", sp, b) for sp in SPARSITIES for b in BITS]
    if name == "width":
        return [Cell("width", seed, b, width=w) for w in WIDTHS for b in WIDTH_BITS]
    if name == "all":
        return [_pq(seed, i, s, sp, b) for i in IMPORTANCES for s in SCHEDULES for sp in SPARSITIES
                for b in BITS] + subgrid("width", seed)
    if name == "quick":
        return [Cell("width", seed, "FP32"), Cell("width", seed, "W4A4", width=0.25),
                _pq(seed, "a_l1", "layerwise", 0.75, "W4A4"), _pq(seed, "w_l1", "oneshot", 0.5, "W8A8"),
                _pq(seed, "random", "stepwise", 0.5, "FP32")]
    raise ValueError(f"unknown sub-grid {name!r} (known: {', '.join(GRIDS)})")


def select_cells(grids: Iterable[str], seeds: Iterable[int], only: Iterable[str] = ()) -> list[Cell]:
    """The cells to run, each once: dense networks first, then cells that train from scratch, then the
    rest (seed by seed). ``only``: fnmatch patterns on cell ids; a seed's dense cell is added whenever a
    selected cell needs it."""
    only = list(only)
    chosen: dict[str, Cell] = {}
    for seed in seeds:
        for g in grids:
            for c in subgrid(g, seed):
                if not only or any(fnmatch.fnmatchcase(c.id, p) for p in only):
                    chosen.setdefault(c.id, c)
    for c in list(chosen.values()):
        if c.needs_dense:
            d = Cell("width", c.seed, "FP32")
            chosen.setdefault(d.id, d)
    cells = list(chosen.values())
    return sorted(cells, key=lambda c: (0 if c.is_dense else 1 if not c.needs_dense else 2, c.seed))


def dense_path(out: str | Path, seed: int) -> Path:
    """The dense network of ``seed`` (``<out>/dense_s<seed>/dense.pt``), which compressed cells load."""
    return Path(out) / f"dense_s{seed}" / "dense.pt"


def base_config(config: str | Path, sets: Iterable[str] = (), *, quick: bool = False,
                threads: int | None = None) -> dict[str, Any]:
    """The base run configuration every cell derives from (a ``RunConfig.to_dict()``): the file
    ``config`` with, in this order, the ``--quick`` sizes (:data:`QUICK_SETS`), the ``--set KEY=VALUE``
    overrides and ``train.threads``, applied as ``prunequant run --config --set`` applies them.
    benchmarks/peers.py builds its configuration here too, so both compare on the same data and model.

    Raises ``SystemExit`` when the configuration names ``train.dense_checkpoint``: each seed's dense
    network is ``dense_s<seed>/dense.pt`` under ``--out`` (:func:`dense_path`)."""
    from prunequant.cli import build_config

    overrides = [*(QUICK_SETS if quick else ()), *sets]
    if threads:
        overrides.append(f"train.threads={threads}")
    base = build_config(str(config), overrides).to_dict()
    if base["train"].get("dense_checkpoint"):
        raise SystemExit("train.dense_checkpoint: grid.py trains each seed's dense network itself "
                         "(dense_s<seed>/dense.pt under --out, which peers.py shares); remove it from the "
                         "base configuration")
    return base


def cell_config(base: dict[str, Any], cell: Cell, out: Path, progress: bool = False,
                dense: Path | None = None) -> Any:
    """The ``RunConfig`` of ``cell`` from the base configuration (a ``RunConfig.to_dict()``).

    ``dense``: the dense checkpoint to load (default: the seed's for cells that need it, none else)."""
    from prunequant.config import RunConfig

    d = copy.deepcopy(base)
    tr = d.setdefault("train", {})
    tr["seed"] = cell.seed
    tr["progress"] = progress
    tr["dense_checkpoint"] = None
    if dense is not None:
        tr["dense_checkpoint"] = str(dense)
    elif cell.needs_dense:
        tr["dense_checkpoint"] = str(dense_path(out, cell.seed).resolve())
    model = d.setdefault("model", {})
    model["width"] = float(model.get("width", 1.0)) * cell.width
    rec = d.setdefault("recipe", {})
    if cell.family == "prunequant":
        prune = dict(rec.get("prune") or {})
        prune.update(importance=cell.importance, schedule=cell.schedule, sparsity=cell.sparsity,
                     seed=cell.seed)
        rec["prune"] = prune
    else:
        rec["prune"] = None
    bits = BITS[cell.bits]
    if bits is None:
        rec["quant"] = None
    else:
        quant = dict(rec.get("quant") or {})
        quant.update(weight_bits=bits[0], act_bits=bits[1])
        rec["quant"] = quant
    return RunConfig.from_dict(d, where=f"grid cell {cell.id}")


# ------------------------------------------------------------------------------------------ cell.json
def validate_cell(d: Any) -> dict[str, Any]:
    """Check a ``cell.json`` record against the schema (:data:`CELL_FIELDS`); returns it, or raises
    ``ValueError`` listing every problem."""
    if not isinstance(d, dict):
        raise ValueError(f"a cell must be a dict, got {type(d).__name__}")
    problems = []
    missing = [f for f in CELL_FIELDS if f not in d]
    extra = [f for f in d if f not in CELL_FIELDS]
    if missing:
        problems.append(f"missing fields: {', '.join(missing)}")
    if extra:
        problems.append(f"unknown fields: {', '.join(map(str, extra))} (the schema is grid.CELL_FIELDS)")

    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def check(field: str, ok: Callable[[Any], bool], what: str) -> None:
        if field in d and not ok(d[field]):
            problems.append(f"{field}: must be {what} (got {d[field]!r})")

    check("id", lambda v: isinstance(v, str) and bool(v) and "/" not in v, "a non-empty folder name")
    check("family", lambda v: v in FAMILIES, f"one of {', '.join(FAMILIES)}")
    check("label", lambda v: isinstance(v, str) and bool(v), "a non-empty string")
    check("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0")
    for f in ("importance", "schedule"):
        check(f, lambda v: v is None or (isinstance(v, str) and bool(v)), "a non-empty string or null")
    check("sparsity", lambda v: v is None or (num(v) and 0.0 <= v < 1.0), "in [0, 1) or null")
    check("bits", lambda v: isinstance(v, str) and bool(v), "a non-empty string such as 'W4A4'")
    check("accuracy", lambda v: num(v) and 0.0 <= v <= 100.0, "a percentage in [0, 100]")
    check("dense_accuracy", lambda v: v is None or (num(v) and 0.0 <= v <= 100.0), "a percentage or null")
    check("memory_mbit", lambda v: num(v) and v > 0, "a number > 0")
    for f in ("weight_mbit", "act_mbit", "macs", "bops", "params", "density"):
        check(f, lambda v: num(v) and v >= 0, "a number >= 0")
    check("levels", lambda v: v is None or (isinstance(v, dict) and set(v) == {"weights", "acts"} and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v.values())),
        'null or {"weights": int >= 0, "acts": int >= 0}')
    check("note", lambda v: isinstance(v, str), "a string (may be empty)")
    if not problems:
        m = _SEED_SUFFIX.search(d["id"])
        if m is None or int(m.group(1)) != d["seed"]:
            problems.append(f"id: must end in _s{d['seed']} (the seed; got {d['id']!r})")
        want = d["accuracy"] / d["memory_mbit"]
        if not math.isclose(d["density"], want, rel_tol=1e-6, abs_tol=1e-9):
            problems.append(f"density: must be accuracy / memory_mbit = {want:.6g} (got {d['density']!r})")
    if problems:
        raise ValueError(f"invalid cell {d.get('id', '?')!r}: " + "; ".join(problems))
    return d


def write_cell(folder: str | Path, cell: dict[str, Any]) -> Path:
    """Validate ``cell`` and write it atomically to ``folder/cell.json`` (``cell["id"]`` must be the
    folder's name). Returns the path."""
    from prunequant.utils import atomic_write_json

    folder = Path(folder)
    validate_cell(cell)
    if cell["id"] != folder.name:
        raise ValueError(f"cell id {cell['id']!r} must be its folder's name ({folder.name!r})")
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(folder / "cell.json", {f: cell[f] for f in CELL_FIELDS})


def cell_record(cell: Cell, report: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """The ``cell.json`` record of a finished prunequant cell from its ``report.json``."""
    final, dense = report["phases"]["final"], report["phases"].get("dense") or {}
    cfg = report["config"]
    tr = cfg["train"]
    notes = []
    if cell.is_dense:
        notes.append(f"full-width dense reference: {tr['dense_epochs']:g} dense epochs, then "
                     f"{tr['epochs']:g} FP32 fine-tuning epochs at train.compress_lr")
    elif cell.family == "width" and not cell.needs_dense:
        notes.append(f"from scratch: {tr['dense_epochs']:g} dense epochs, then {tr['epochs']:g} "
                     f"{'FP32 fine-tuning' if cell.bits == 'FP32' else 'QAT'} epochs")
    elif cell.family == "width":
        notes.append(f"{cell.bits} QAT without pruning, {tr['epochs']:g} epochs from dense_s{cell.seed}")
    data = report.get("data") or {}
    if data.get("name") and data["name"] != cfg["data"]["name"]:
        notes.append(f"data: {data['name']} (fallback for {cfg['data']['name']})")
    if quick:
        notes.append(QUICK_NOTE)
    acc, mem = float(final["accuracy"]), float(final["memory_mbit"])
    return {
        "id": cell.id, "family": cell.family, "label": cell.label(cfg["model"]["name"]), "seed": cell.seed,
        "importance": cell.importance, "schedule": cell.schedule, "sparsity": cell.sparsity,
        "bits": cell.bits,
        "accuracy": acc, "dense_accuracy": dense.get("accuracy"), "memory_mbit": mem,
        "weight_mbit": float(final["weight_mbit"]), "act_mbit": float(final["act_mbit"]),
        "macs": int(final["macs"]), "bops": int(final["bops"]), "params": int(final["params"]),
        "density": acc / mem, "levels": None, "note": "; ".join(notes),
    }


def cell_done(folder: Path) -> bool:
    """A finished prunequant cell: ``report.json`` present and every file its manifest lists intact."""
    from prunequant.runfolder import verify_run

    if not (folder / "report.json").is_file():
        return False
    try:
        verify_run(folder, required=("report.json",))
    except Exception:  # an interrupted or edited cell runs again
        return False
    return True


def dense_ready(out: Path, seed: int) -> bool:
    """Whether the seed's ``dense.pt`` is written and listed (intact) in its folder's manifest."""
    from prunequant.runfolder import read_manifest, verify_file

    p = dense_path(out, seed)
    if not p.is_file():
        return False
    try:
        files = read_manifest(p.parent)
        if not files or p.name not in files:
            return False
        verify_file(p.parent, p.name, files)
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------- locks
def lock_path(out: Path, cell_id: str) -> Path:
    """``<out>/locks/<cell>.lock``."""
    return Path(out) / "locks" / f"{cell_id}.lock"


def lock_stale(holder: dict[str, Any], path: Path | None = None) -> bool:
    """A lock of a process on this host that is gone (or an empty lock older than a minute)."""
    return FileLock(path if path is not None else Path(os.devnull)).stale(holder)


def claim(out: Path, cell_id: str, log: Callable[[str], None] = print) -> bool:
    """Take the cell's lock (prunequant's :class:`~prunequant.runfolder.FileLock`, the one run folders
    use); False when a live process holds it. A stale lock is taken over."""
    return FileLock(lock_path(out, cell_id)).try_acquire(lambda h: log(
        f"  {cell_id}: took over a stale lock of pid {h.get('pid')} on {h.get('host')}")) is None


def release(out: Path, cell_id: str) -> None:
    """Remove the cell's lock if this process holds it."""
    FileLock(lock_path(out, cell_id)).release()


# ------------------------------------------------------------------------------------------- running
def run_cell(cfg: Any, folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One ``prunequant run`` (what the CLI does): train, then report.json / summary.md, recorded last.
    A cell interrupted with this same configuration continues from its last checkpoint; any other
    leftover folder is run again. Returns the report."""
    from prunequant.train.trainer import resumable, run_and_report

    again = resumable(folder, cfg)
    report, _ = run_and_report(cfg, folder, log, resume=again, overwrite=not again)
    return report


def _finish_cell(cell: Cell, folder: Path, quick: bool) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    rec = cell_record(cell, report, quick)
    write_cell(folder, rec)
    return rec


def run_grid(cells: list[Cell], base: dict[str, Any], out: Path, *, quick: bool = False,
             progress: bool = False, poll: float = 30.0, max_wait: float | None = None,
             log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Run the cells that are neither finished nor claimed by another process.

    Returns the cell ids by outcome: ``ran``, ``finished`` (skipped), ``others`` (locked by another
    process), ``failed`` and ``waiting`` (their dense network was not ready within ``max_wait``)."""
    out.mkdir(parents=True, exist_ok=True)
    pending = list(cells)
    outcome: dict[str, list[str]] = {k: [] for k in ("ran", "finished", "others", "failed", "waiting")}
    failed_dense: set[int] = set()
    n = len(cells)
    index = {c.id: k + 1 for k, c in enumerate(cells)}
    wait_start: float | None = None
    said_waiting: set[int] = set()
    retried: set[str] = set()

    def line(c: Cell, msg: str) -> None:
        log(f"[{index[c.id]}/{n}] {c.id}: {msg}")

    while pending:
        progressed = False
        waiting: list[Cell] = []
        for c in list(pending):
            folder = out / c.id
            if cell_done(folder):
                if not (folder / "cell.json").is_file():
                    _finish_cell(c, folder, quick)
                    line(c, "finished earlier (cell.json written)")
                else:
                    line(c, "finished earlier, skipped")
                pending.remove(c)
                outcome["finished"].append(c.id)
                continue
            if c.needs_dense and not dense_ready(out, c.seed):
                if c.seed in failed_dense:
                    line(c, f"not run: dense_s{c.seed} failed")
                    pending.remove(c)
                    outcome["failed"].append(c.id)
                else:
                    waiting.append(c)
                continue
            if not claim(out, c.id, log):
                holder = read_lock(lock_path(out, c.id)) or {}
                if c.is_dense and any(o.needs_dense and o.seed == c.seed for o in pending):
                    continue  # keep watching it: if its process dies, the lock goes stale and is taken over
                line(c, f"claimed by pid {holder.get('pid')} on {holder.get('host')}, left to it")
                pending.remove(c)
                outcome["others"].append(c.id)
                continue
            t0 = time.time()
            try:
                if cell_done(folder):  # finished by another process between the check and the claim
                    pending.remove(c)
                    outcome["finished"].append(c.id)
                    continue
                dense = None
                if c.is_dense and dense_ready(out, c.seed):  # an interrupted dense cell: continue from it
                    dense = dense_path(out, c.seed).resolve()
                cfg = cell_config(base, c, out, progress, dense)
                what = ("training the dense network" + (" (from its dense.pt)" if dense else "")
                        if c.is_dense else f"fine-tuning dense_s{c.seed}" if c.needs_dense
                        else "from scratch")
                line(c, f"running: {c.label(cfg.model.name)}, {what}")
                run_cell(cfg, folder, log=lambda m, c=c: line(c, m))
                rec = _finish_cell(c, folder, quick)
                line(c, f"done in {time.time() - t0:.0f} s: test {rec['accuracy']:.2f} % "
                        f"(dense {rec['dense_accuracy']:.2f} %), {rec['memory_mbit']:.3f} Mbit, "
                        f"{rec['density']:.2f} %/Mbit")
                outcome["ran"].append(c.id)
            except Exception as e:  # one broken cell does not stop the others
                if c.needs_dense and "train.dense_checkpoint" in str(e) and c.id not in retried:
                    # The dense cell, continuing from its own dense.pt, rewrites its manifest at the end
                    # (dense.pt unlisted for a moment): check it again later, once.
                    retried.add(c.id)
                    line(c, f"dense network not readable ({e}); trying again later")
                    continue
                line(c, f"FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {e}")
                outcome["failed"].append(c.id)
                if c.is_dense and not dense_ready(out, c.seed):
                    failed_dense.add(c.seed)
            finally:
                release(out, c.id)
            pending.remove(c)
            progressed = True
            break  # rescan from the top: dense networks first
        if progressed or not pending:
            wait_start = None
            continue
        if True:  # nothing runnable: what is left waits for a dense network another process trains
            now = time.time()
            wait_start = wait_start or now
            if max_wait is not None and now - wait_start >= max_wait:
                for c in pending:
                    if c in waiting:
                        line(c, f"gave up waiting for dense_s{c.seed} after {max_wait:g} s")
                        outcome["waiting"].append(c.id)
                    else:
                        line(c, "claimed by another process, left to it")
                        outcome["others"].append(c.id)
                break
            for c in waiting:
                if c.seed not in said_waiting:
                    said_waiting.add(c.seed)
                    holder = read_lock(lock_path(out, f"dense_s{c.seed}")) or {}
                    log(f"waiting for dense_s{c.seed} (being trained by pid {holder.get('pid')} on "
                        f"{holder.get('host')}); polling every {poll:g} s")
            left = math.inf if max_wait is None else max(0.0, max_wait - (now - wait_start)) + 0.01
            time.sleep(min(poll, left))
    return outcome


# ---------------------------------------------------------------------------------------------- tables
def group_of(cell_id: str) -> str:
    """The cell id without its ``_s<seed>`` suffix."""
    return _SEED_SUFFIX.sub("", cell_id)


def collect(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every ``*/cell.json`` under ``out`` (whoever wrote it): the valid records and the problems."""
    cells, problems = [], []
    for p in sorted(Path(out).glob("*/cell.json")):
        try:
            rec = validate_cell(json.loads(p.read_text()))
            if rec["id"] != p.parent.name:
                raise ValueError(f"id {rec['id']!r} is not its folder's name")
            cells.append(rec)
        except (ValueError, OSError) as e:
            problems.append(f"{p.relative_to(out)}: {e}")
    return cells, problems


def _stat(vals: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "values": vals}


def summarize(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group (cell id without the seed): the shared fields, the seeds, and mean / sample std / per-seed
    values of every numeric field (std null for one seed)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for c in sorted(cells, key=lambda c: (c["id"], c["seed"])):
        by.setdefault(group_of(c["id"]), []).append(c)
    groups = {}
    for g, cs in sorted(by.items()):
        cs.sort(key=lambda c: c["seed"])
        first = cs[0]
        rec: dict[str, Any] = {k: first[k] for k in ("family", "label", "importance", "schedule", "sparsity",
                                                      "bits", "levels")}
        rec["note"] = "; ".join(dict.fromkeys(c["note"] for c in cs if c["note"]))
        rec["seeds"] = [c["seed"] for c in cs]
        rec["n"] = len(cs)
        for f in NUMERIC:
            vals = [c[f] for c in cs if c[f] is not None]
            rec[f] = _stat(vals) if vals else None
        groups[g] = rec
    return groups


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Keys of the points no other point beats (lower or equal x and higher accuracy y), by x."""
    front, best = [], -math.inf
    for k, (_x, y) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if y > best:
            front.append(k)
            best = y
    return front


def _fmt(s: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
    if not s:
        return "-"
    m = format(s["mean"] / scale, fmt)
    return m if s["std"] is None else f"{m} ± {format(s['std'] / scale, fmt)}"


def _table(groups: dict[str, dict[str, Any]], keys: list[str], fronts: dict[str, list[str]]) -> list[str]:
    lines = ["| cell | seeds | test acc % | per seed | dense % | memory Mbit | density %/Mbit | weight Mbit "
             "| act Mbit | MMACs | MBOPs | params k | Pareto | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        g = groups[k]
        per = ", ".join(f"{v:.2f}" for v in g["accuracy"]["values"])
        front = "".join(m for m, name in (("M", "memory"), ("B", "bops")) if k in fronts[name])
        lv = g["levels"]
        label = g["label"] + (f" (levels W{lv['weights']}/A{lv['acts']})" if lv else "")
        seeds = ", ".join(map(str, g["seeds"]))
        lines.append(
            f"| {label} | {g['n']} ({seeds}) | {_fmt(g['accuracy'], '.2f')} | {per} "
            f"| {_fmt(g['dense_accuracy'], '.2f')} | {_fmt(g['memory_mbit'], '.3f')} "
            f"| {_fmt(g['density'], '.1f')} | {_fmt(g['weight_mbit'], '.3f')} "
            f"| {_fmt(g['act_mbit'], '.3f')} | {_fmt(g['macs'], '.2f', 1e6)} | {_fmt(g['bops'], '.1f', 1e6)} "
            f"| {_fmt(g['params'], '.1f', 1e3)} | {front or ''} | {g['note'].replace('|', '/')} |")
    return lines


def _method_matrix(groups: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| importance \\ schedule | " + " | ".join(SCHEDULES.values()) + " |",
             "|---|" + "---|" * len(SCHEDULES)]
    for i, iname in IMPORTANCES.items():
        row = []
        for s in SCHEDULES:
            g = groups.get(f"pq_{i}_{s}_75_W4A4")
            row.append(f"{_fmt(g['accuracy'], '.2f')} (n={g['n']})" if g else "-")
        lines.append(f"| {iname} | " + " | ".join(row) + " |")
    return lines


SUBGRID_TITLES = {
    "method": "Importance x schedule at 75 % channel sparsity, W4A4 (`--grid method`)",
    "bits": "Bits x sparsity, layerwise A-L1 (the paper's method; `--grid bits`)",
    "width": "Dense networks at width 1, 1/2, 1/4 with the same budget (`--grid width`)",
}


def peer_sections(groups: dict[str, dict[str, Any]]) -> list[tuple[str, list[str], list[str]]]:
    """The peers' tables in grid.md: one per channel sparsity (highest first: 75 %, the method sub-grid's,
    before 50 %), then the peers that prune nothing. Each is ``(title, reference groups, peer groups)``;
    the references are prunequant's layerwise A-L1 group of that sparsity and the peers' bits (for the
    unpruned peers: the full-width network at their bits), where the grid has them."""
    peers = {k: g for k, g in groups.items() if g["family"] == "peer"}
    pcts = sorted({round(100 * g["sparsity"]) for g in peers.values() if g["sparsity"] is not None},
                  reverse=True)
    sections = []
    for pct in [*pcts, None]:
        keys = sorted(k for k, g in peers.items()
                      if (None if g["sparsity"] is None else round(100 * g["sparsity"])) == pct)
        if not keys:
            continue
        bits = dict.fromkeys(peers[k]["bits"] for k in keys)
        if pct is None:
            title = "Peers without pruning, beside the full-width network at their bits"
            refs = [Cell("width", 0, b).group for b in bits]
        else:
            title = (f"Peers at {pct} % channel sparsity, beside prunequant's layerwise A-L1 at {pct} % and "
                     "their bits")
            refs = [_pq(0, "a_l1", "layerwise", pct / 100, b).group for b in bits]
        sections.append((title, [k for k in refs if k in groups], keys))
    return sections


def _plot(groups: dict[str, dict[str, Any]], xkey: str, xlabel: str, front: list[str], path: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    markers = {"prunequant": "o", "width": "s", "peer": "^"}
    colors = {"FP32": "tab:gray", "W8A8": "tab:blue", "W4A8": "tab:green", "W4A4": "tab:red"}
    other = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:orange"] * 10)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    used_colors: dict[str, str] = {}
    for k, g in groups.items():
        if not g[xkey] or not g["accuracy"]:
            continue
        col = colors.get(g["bits"]) or used_colors.get(g["bits"]) or next(other)
        used_colors[g["bits"]] = col
        x, y = g[xkey]["mean"], g["accuracy"]["mean"]
        if x <= 0:  # nothing to place on a log axis
            continue
        ax.errorbar(x, y, yerr=g["accuracy"]["std"] or 0.0, xerr=g[xkey]["std"] or 0.0,
                    marker=markers[g["family"]], color=col, ms=7, capsize=3, lw=1,
                    mfc=col if k in front else "white", mec=col)
        if k in front or g["family"] == "peer":
            ax.annotate(g["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=6)
    pts = [(groups[k][xkey]["mean"], groups[k]["accuracy"]["mean"]) for k in front
           if groups[k][xkey]["mean"] > 0]
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="k", lw=1, ls="--", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    handles = [Line2D([], [], marker=m, color="k", ls="", mfc="white", label=f) for f, m in markers.items()
               if any(g["family"] == f for g in groups.values())]
    handles += [Line2D([], [], marker="o", color=c, ls="", label=b) for b, c in used_colors.items()]
    handles.append(Line2D([], [], color="k", ls="--", label="Pareto front (filled markers)"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _commands(out: Path) -> list[str]:
    p = out / "commands.txt"
    return p.read_text().splitlines() if p.is_file() else []


def table(out: Path, command: str = "", plots: bool = True) -> dict[str, Any]:
    """Collect every ``*/cell.json`` under ``out``; write ``grid.json``, ``grid.md`` and the Pareto plots."""
    import torch

    from prunequant.export.cpu import cpu_features
    from prunequant.utils import atomic_write_json, atomic_write_text

    out = Path(out)
    cells, problems = collect(out)
    groups = summarize(cells)
    fronts = {
        "memory": pareto_front({k: (g["memory_mbit"]["mean"], g["accuracy"]["mean"])
                                for k, g in groups.items()}),
        "bops": pareto_front({k: (g["bops"]["mean"], g["accuracy"]["mean"]) for k, g in groups.items()
                              if g["bops"]}),
    }
    sub = {name: [k for k in dict.fromkeys(c.group for c in subgrid(name, 0)) if k in groups]
           for name in SUBGRID_TITLES}
    shown = {k for ks in sub.values() for k in ks}
    peer_tables = peer_sections(groups)
    rest = {
        "other prunequant cells": [k for k, g in groups.items() if k not in shown and g["family"] != "peer"],
        "peers": [k for _title, _refs, keys in peer_tables for k in keys],
    }
    cpu = cpu_features()
    measured_on = set()
    for c in cells:
        try:
            measured_on.add(json.loads((out / c["id"] / "report.json").read_text())["machine"]["cpu_class"])
        except (OSError, KeyError, ValueError, TypeError):
            pass
    quick = any(QUICK_NOTE in c["note"] for c in cells)
    md = ["# Method grid (benchmarks/grid.py)", ""]
    if quick:
        md += [f"**Some cells are from `--quick` ({QUICK_NOTE}).**", ""]
    md += [f"{len(cells)} cells in {len(groups)} groups; mean ± sample std over seeds (the per-seed test "
           "accuracies beside it). Pareto: on the accuracy-memory (M) / accuracy-BOPs (B) front of all "
           "groups. Density = accuracy / memory (METHOD.md section 6).", "",
           f"CPU class: {cpu.name} ({cpu.brand}); cells measured on: "
           f"{', '.join(sorted(measured_on)) or '-'}; torch {torch.__version__}.", ""]
    if command:
        md += [f"Tables written by: `{command}`", ""]
    cmds = _commands(out)
    if cmds:
        md += ["Commands that ran cells here:", "", *[f"    {c}" for c in cmds], ""]
    if sub["method"]:
        md += [f"## {SUBGRID_TITLES['method']}", "", *_method_matrix(groups), "",
               *_table(groups, sub["method"], fronts), ""]
    for name in ("bits", "width"):
        if sub[name]:
            md += [f"## {SUBGRID_TITLES[name]}", "", *_table(groups, sub[name], fronts), ""]
    if rest["other prunequant cells"]:
        md += ["## Other prunequant cells", "", *_table(groups, rest["other prunequant cells"], fronts), ""]
    for title, refs, keys in peer_tables:
        md += [f"## {title}", "", *_table(groups, refs + keys, fronts), ""]
    if problems:
        md += ["## cell.json files left out (invalid)", "", *[f"- {p}" for p in problems], ""]
    atomic_write_text(out / "grid.md", "\n".join(md))
    result = {"command": command, "commands": cmds, "cpu": cpu.as_dict(), "measured_on": sorted(measured_on),
              "torch": torch.__version__, "cells": sorted(cells, key=lambda c: c["id"]), "groups": groups,
              "subgrids": {**sub, **rest}, "pareto": fronts, "invalid": problems}
    atomic_write_json(out / "grid.json", result)
    if plots and groups:
        base = "accuracy vs {} (mean ± std over seeds); markers: family, colour: bits"
        _plot(groups, "memory_mbit", "memory (weights + activations), Mbit", fronts["memory"],
              out / "pareto_memory.png", base.format("memory"))
        _plot(groups, "bops", "BOPs per sample (MACs x b_w x b_a)", fronts["bops"], out / "pareto_bops.png",
              base.format("BOPs"))
    return result


def dry_run(cells: list[Cell], base: dict[str, Any], out: Path, log: Callable[[str], None] = print) -> int:
    """List the cells with their state (finished / claimed / to run); check each configuration and that
    its compression schedule ends within ``train.epochs`` (what ``prunequant run`` checks before
    training). Trains and writes nothing; returns 1 when a configuration is refused."""
    import torch
    from torch.utils.data import DataLoader

    from prunequant.models import build_model
    from prunequant.train.trainer import _check_schedule_fits, load_data

    if not cells:
        log("no cells selected")
        return 0
    data = load_data(cell_config(base, cells[0], out), log)  # one data set for every cell
    example = next(iter(DataLoader(data.train, batch_size=8)))[0]
    spe = len(data.train) // base["data"]["batch_size"]
    bad = 0
    for k, c in enumerate(cells, 1):
        folder = out / c.id
        holder = read_lock(lock_path(out, c.id))
        state = ("finished" if cell_done(folder) else
                 f"claimed by pid {holder.get('pid')} on {holder.get('host')}" if holder else "to run")
        try:
            cfg = cell_config(base, c, out)
            model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                                image_size=data.image_size, width=cfg.model.width)
            with torch.random.fork_rng():
                _check_schedule_fits(model, cfg, example, spe, max(1, round(cfg.train.epochs * spe)))
            log(f"[{k}/{len(cells)}] {c.id}: {state}; {c.label(cfg.model.name)}")
        except Exception as e:
            bad += 1
            log(f"[{k}/{len(cells)}] {c.id}: {state}; REFUSED: {e}")
    log(f"{len(cells)} cells, {spe} steps per epoch, {bad} refused")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(RECIPE), help=f"base run configuration (default {RECIPE.name})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the base configuration, as for prunequant run (repeatable)")
    ap.add_argument("--grid", nargs="+", choices=GRIDS, default=None,
                    help="sub-grids to run (default: method bits width; with --quick: quick)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                    help="only cells whose id matches one of these fnmatch patterns (e.g. 'pq_a_l1_*')")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results folder (default {OUT}; --quick: {OUT_QUICK})")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per cell (train.threads)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, one seed, a handful of cells (smoke test)")
    ap.add_argument("--table-only", action="store_true", help="only regenerate grid.json / grid.md / plots")
    ap.add_argument("--poll", type=float, default=30.0, help="seconds between checks for a dense network")
    ap.add_argument("--max-wait", type=float, default=None,
                    help="give up waiting for another process's dense network after this many seconds")
    ap.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the cells and their state, check every configuration and that its schedule "
                         "fits train.epochs (loads the data once; trains nothing, writes nothing)")
    a = ap.parse_args(argv)
    out = a.out or (OUT_QUICK if a.quick else OUT)
    args = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "benchmarks/grid.py", *args])
    if a.table_only:
        table(out, command)
        print(f"wrote {out / 'grid.md'}")
        return 0

    base = base_config(a.config, a.set, quick=a.quick, threads=a.threads)
    grids = a.grid or (["quick"] if a.quick else ["method", "bits", "width"])
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    cells = select_cells(grids, seeds, a.only)
    if a.dry_run:
        return dry_run(cells, base, out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {HOST} pid {os.getpid()}: {command}\n")
    print(f"grid {' '.join(grids)}, seeds {' '.join(map(str, seeds))}: {len(cells)} cells -> {out}",
          flush=True)
    progress = not a.no_progress and sys.stderr.isatty()
    res = run_grid(cells, base, out, quick=a.quick, progress=progress, poll=a.poll, max_wait=a.max_wait,
                   log=lambda m: print(m, flush=True))
    print(f"ran {len(res['ran'])}, finished earlier {len(res['finished'])}, left to other processes "
          f"{len(res['others'])}, failed {len(res['failed'])}, still waiting {len(res['waiting'])}",
          flush=True)
    table(out, command)
    print(f"wrote {out / 'grid.md'}, grid.json, pareto_memory.png, pareto_bops.png", flush=True)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
