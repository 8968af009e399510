"""Peers of prunequant measured in the same run: same dense weights, data and compression budget.

The same questions as benchmarks/grid.py, with the same knobs: the base configuration is grid.py's
(``--config``, default ``recipes/fmnist_resnet20_w4a4.yaml``, repeatable ``--set KEY=VALUE``, ``--quick``
sizes, ``--threads``, all through ``grid.base_config``), so ``peers.py --config X --set data.name=cifar10
--set data.root=DIR`` compares on the data and model of ``grid.py --config X --set ...``; the pruning peers
run at each of ``--sparsities`` (default 0.5 0.75, grid.py's: its ``method`` sub-grid is at 75 % W4A4, its
``bits`` sub-grid at 50 and 75 %), replacing ``recipe.prune.sparsity``.

Per seed (default 0 1 2), from the dense network at ``dense_path(out, seed)`` (the one prunequant's cells
start from; trained here through prunequant's own dense phase when it is missing), seven cells with the
default sparsities, each written to ``<out>/<cell>/cell.json`` (the schema of benchmarks/grid.py; a folder
whose cell.json exists is finished and skipped). Pruning peers are named by the sparsity percent as grid.py
names its cells: ``peer_qsparse_75_s0``, ``peer_tp_pq_50_s0``, ``peer_brevitas_tp_75_s0``;
``brevitas_dense`` prunes nothing and runs once per seed: ``peer_brevitas_dense_s0``. grid.py's table shows
the peers of each sparsity beside its layerwise A-L1 cell of that sparsity and bits.

* ``qsparse``: qsparse 2.0.1, the paper authors' library, configured as their published experiments
  (mdpi2022 configs) and examples do: ``prune(sparsity, dimensions={1})`` (channel pruning by the running
  mean |activation|, ``MagnitudePruningCallback``) after every block-internal ReLU (``relu1``, the
  sites prunequant prunes with groups off), ``devise_layerwise_pruning_schedule`` with prunequant's S / I /
  R in steps; ``quantize(conv, channelwise=0, ScalerQuantizer)`` per-channel symmetric weights,
  ``quantize(fc, channelwise=-1)``, ``quantize(bits, channelwise=-1, AdaptiveQuantizer)`` after each ReLU
  feeding a layer, on the input (``convert(..., input=True)``) and on the classifier's input, with the
  ``timeout`` of each set to the step where prunequant turns that quantizer on. Masked, not shrunk.
  No compatibility shim is needed under torch 2.13. One configuration detail matters: ``prune()`` is
  given ``interval`` (and ``repetition=1``) when it is built, because ``PruneLayer`` computes its
  one-step ramp from the interval it was built with and ``devise_layerwise_pruning_schedule`` does not
  update it; with the default (1000) and a shorter layerwise interval the target sparsity comes out
  above 1 and the first mask refresh raises an IndexError. Its ``ScalerQuantization`` does not saturate
  (the ``clamp_`` acts on a temporary), so "4-bit" weights can use 17 or more codes: ``levels`` shows it.
* ``tp_pq``: Torch-Pruning 1.6 ``MetaPruner`` + ``MagnitudeImportance(p=1)`` (filter L1 per coupled
  group, ``global_pruning=False``, classifier ignored) at the cell's sparsity, physically shrunk
  (residual groups included), then prunequant's QAT: the recipe with ``prune: null``, same quant block,
  same number of compression steps, same optimizer / learning-rate schedule.
* ``brevitas_dense`` / ``brevitas_tp``: Brevitas 0.13 W4A4 QAT of the dense / the Torch-Pruning-shrunk
  network, as Brevitas' ResNet example (``brevitas_examples/bnn_pynq/models/resnet.py``) builds it:
  ``QuantConv2d(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4)``, ``QuantReLU(bit_width=4)``
  for every ReLU, the classifier ``QuantLinear(weight_quant=Int8WeightPerTensorFloat, 8 bits)``, and
  ``QuantIdentity`` (8 bits) on the network input and on the classifier's input; quantization on from
  the first step, same steps / optimizer / schedule.

Bits per layer are prunequant's for the recipe (read from a probe ``Compressor``: conv1's input and the
classifier at 8 bits in the main benchmark). Memory / MACs / BOPs follow METHOD section 6 with the same
definitions as prunequant's cells (``prunequant.measure`` for ``tp_pq``, ``measure_module`` of the float
network of the same shapes, bits and kept channels for the others). ``levels`` counts the distinct
integer codes of each quantized weight and the distinct values of each quantized activation on a
calibration batch (256 validation images), max over the layers at the recipe's bits (the 8-bit input
and classifier are listed apart in levels.json).

Full size (the main benchmark: ResNet-20, full Fashion-MNIST, 3 compression epochs; seeds 0 1 2 and
sparsities 0.5 0.75 by default)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/peers.py --out benchmarks/results/grid

the same comparison on another data set or model, with grid.py's own ``--config`` / ``--set``::

    .venv/bin/python benchmarks/grid.py --config X --set data.name=cifar10 --set data.root=DIR --out D
    .venv/bin/python benchmarks/peers.py --config X --set data.name=cifar10 --set data.root=DIR --out D

or one process per core (each cell, and a missing dense network, is claimed with grid.py's lock, so
two processes never run the same one)::

    .venv/bin/python benchmarks/peers.py --threads 1 &
    .venv/bin/python benchmarks/peers.py --threads 1 &

CPU time, measured per training step at batch 128 with one thread (on a loaded 2-core AMD EPYC Zen 4):
qsparse 0.42 s at either sparsity (masked, not shrunk), tp_pq 0.23 s at 50 % / 0.13 s at 75 %,
brevitas_tp 0.38 s / 0.24 s, brevitas_dense 0.76 s (once per seed). 3 epochs are 1,263 steps, so per seed
about (9 + 5 + 8) minutes at 50 % + (9 + 3 + 5) at 75 % + 16 for brevitas_dense = 55 minutes, plus about
20 s per test-set evaluation (eight per seed: the dense network and seven cells) and, when
``dense_s<seed>`` is missing, its 4 dense epochs (1,684 steps). Three seeds: about 3 hours of CPU time.

A quick look (grid.py's ``--quick`` sizes: 128 training images, a few dozen steps, seed 0; cells go to
grid.py's ``--quick`` folder by default, beside its quick cells, sharing their dense network; the test
suite runs this on scikit-learn's digits)::

    .venv/bin/python benchmarks/peers.py --quick --out /tmp/peers
    .venv/bin/python benchmarks/peers.py --quick --sparsities 0.75 --set data.name=digits --out /tmp/peers
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from prunequant import Compressor, measure
from prunequant.config import RunConfig
from prunequant.graph.instrument import raw_weight, weight_quantizer
from prunequant.graph.ops import LAYER_TYPES
from prunequant.metrics.measure import Measurement, count_levels, measure_module
from prunequant.models import build_model
from prunequant.quant.quantizers import ActQuantizer, WeightQuantizer
from prunequant.runfolder import RunFolder
from prunequant.train.trainer import (
    _batches,
    _check_schedule_fits,
    _Progress,
    _train_steps,
    compress_lr_schedule,
    evaluate,
    load_data,
    load_dense_checkpoint,
    load_dense_state,
    resolve_device,
    seed_everything,
)
from prunequant.utils import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("qsparse", "tp_pq", "brevitas_dense", "brevitas_tp")
#: Peers that prune nothing: one cell per seed, no sparsity in the name.
UNPRUNED = ("brevitas_dense",)
SPARSITIES = (0.5, 0.75)
CALIBRATION_IMAGES = 256


# ----------------------------------------------------------------------------------- cell schema
def _load_grid() -> Any:
    """benchmarks/grid.py (benchmarks/ is no package): the cell schema, ``write_cell``, ``dense_path``,
    the dense cell's readiness check and the per-cell locks."""
    name = "pq_bench_grid"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "grid.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


grid = _load_grid()
RECIPE: Path = grid.RECIPE
OUT: Path = grid.OUT
OUT_QUICK: Path = grid.OUT_QUICK
CELL_FIELDS: tuple[str, ...] = grid.CELL_FIELDS
write_cell = grid.write_cell
dense_path = grid.dense_path


def cell_done(folder: Path) -> bool:
    """A peer cell is finished when its cell.json is there and valid (grid.py's schema)."""
    try:
        grid.validate_cell(json.loads((folder / "cell.json").read_text()))
    except (OSError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------- cells
class PeerCell(NamedTuple):
    """One peer cell: a peer at one channel sparsity (None for a peer that prunes nothing), one seed."""

    name: str
    seed: int
    sparsity: float | None

    @property
    def id(self) -> str:
        """The folder name: ``peer_<name>_<sparsity %>_s<seed>`` as grid.py names its cells by the
        sparsity percent; ``peer_<name>_s<seed>`` for a peer that prunes nothing."""
        pct = "" if self.sparsity is None else f"_{percent(self.sparsity)}"
        return f"peer_{self.name}{pct}_s{self.seed}"


def percent(sparsity: float) -> int:
    """The sparsity percent in cell names (grid.py's rounding)."""
    return round(100 * sparsity)


def peer_cells(peers: list[str], sparsities: list[float], seed: int) -> list[PeerCell]:
    """The cells of one seed, sparsity by sparsity (in the order given); a peer that prunes nothing
    (``brevitas_dense``) once, in the first pass."""
    cells = []
    for k, sp in enumerate(sparsities):
        for p in peers:
            if p in UNPRUNED:
                if k == 0:
                    cells.append(PeerCell(p, seed, None))
            else:
                cells.append(PeerCell(p, seed, sp))
    return cells


def sparsity_arg(text: str) -> float:
    """``--sparsities``: a channel sparsity strictly between 0 and 1, named by its whole percent."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0.0 < v < 1.0 or not 1 <= percent(v) <= 99:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a channel sparsity in (0, 1): give the fraction of channels pruned, e.g. 0.5 "
            "or 0.75 (cells are named by its whole percent, 1 .. 99)")
    return v


# ----------------------------------------------------------------------------------- configuration
def make_config(base: dict[str, Any], seed: int, sparsity: float | None = None) -> RunConfig:
    """The prunequant run configuration of one seed from the base configuration (grid.py's
    :func:`base_config`: ``--config``, ``--quick`` sizes, ``--set``, ``--threads``); ``sparsity``
    replaces ``recipe.prune.sparsity`` (and ``prune.seed`` is the seed, as in grid.py's cells). The peers
    run on the CPU, without progress bars."""
    d = copy.deepcopy(base)
    d["train"].update(seed=seed, progress=False, device="cpu")
    if sparsity is not None:
        if not d["recipe"].get("prune"):
            raise SystemExit("peers.py: the base configuration has no recipe.prune block; the pruning "
                             "peers take its schedule (start / interval / refresh) and set its sparsity")
        d["recipe"]["prune"].update(sparsity=sparsity, seed=seed)  # as grid.py's cells (prune.seed: run's)
    return RunConfig.from_dict(d, where=f"peers.py seed {seed}" + ("" if sparsity is None else
                                                                    f" sparsity {sparsity:g}"))


class Setup:
    """What every peer starts from: data, dense weights, the loader in the state prunequant's compression
    phase starts from (a run loading ``train.dense_checkpoint``), the step budget."""

    def __init__(self, cfg: RunConfig, data: Any, dense_state: dict[str, Tensor],
                 calibration_images: int = CALIBRATION_IMAGES):
        self.cfg = cfg
        self.data = data
        self.dense_state = dense_state
        self.device = resolve_device(cfg.train.device)
        val = data.val if len(data.val) else data.train
        self.example = next(iter(DataLoader(val, batch_size=8)))[0]
        self.calib = next(iter(DataLoader(val, batch_size=calibration_images)))[0]
        n = len(data.train) // cfg.data.batch_size
        self.steps_per_epoch = n
        self.comp_steps = max(1, int(round(cfg.train.epochs * n)))

    def dense_model(self) -> nn.Module:
        """A fresh model with the dense weights (seeded as prunequant's run seeds it)."""
        seed_everything(self.cfg.train.seed)
        d = self.data
        model = build_model(self.cfg.model.name, num_classes=d.num_classes, in_channels=d.in_channels,
                            image_size=d.image_size, width=self.cfg.model.width)
        load_dense_state(model, self.dense_state, self.cfg, d.name)
        return model.to(self.device)

    def batches(self) -> Any:
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        loader = DataLoader(self.data.train, batch_size=self.cfg.data.batch_size, shuffle=True,
                            drop_last=True, generator=g)
        return _batches(loader)

    def train(self, model: nn.Module, lr: Callable[[int], float],
              on_step: Callable[[int], None] | None = None, cfg: RunConfig | None = None) -> list[float]:
        """``comp_steps`` SGD steps with prunequant's training loop (optimizer, loss, learning rate)."""
        cfg = cfg or self.cfg
        bar = _Progress(self.comp_steps, cfg.train.progress)
        try:
            return _train_steps(model, self.batches(), self.comp_steps, lr, cfg, self.device, bar,
                                lambda: "peer", on_step)
        finally:
            bar.close()

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.data.test, self.device, self.cfg.data.eval_batch_size)


def timeline(setup: Setup, model: nn.Module, recipe: Any | None = None) -> Any:
    """prunequant's Compressor for the recipe on a copy of ``model`` (schedule in steps, bits per layer)."""
    return Compressor(copy.deepcopy(model), recipe if recipe is not None else setup.cfg.recipe,
                      setup.example, steps_per_epoch=setup.steps_per_epoch)


def layer_bits(setup: Setup, model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (weight bits, input bits)}`` that prunequant gives ``model`` under the recipe."""
    recipe = setup.cfg.recipe.model_copy(deep=True)
    recipe.prune = None
    comp = timeline(setup, model, recipe)
    for q in comp.model.modules():
        if isinstance(q, (ActQuantizer, WeightQuantizer)):
            q.enabled.fill_(True)
    return {r.name: (r.weight_bits, r.act_bits) for r in measure(comp.model, setup.example).layers}


# ----------------------------------------------------------------------------------- dense network
def train_dense(cfg: RunConfig, path: Path, log: Callable[[str], None] = print) -> None:
    """prunequant's dense phase (``trainer.run`` up to dense.pt, same seeding and data order), saved with
    a manifest at ``path`` so prunequant runs can load it through ``train.dense_checkpoint``."""
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    data = load_data(cfg, log)
    model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, width=cfg.model.width).to(device)
    g = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, generator=g)
    spe = len(loader)
    example = next(iter(DataLoader(data.val if len(data.val) else data.train, batch_size=8)))[0].to(device)
    dense_steps = int(round(cfg.train.dense_epochs * spe))
    _check_schedule_fits(model, cfg, example, spe, max(1, int(round(cfg.train.epochs * spe))))
    bar = _Progress(dense_steps, cfg.train.progress)
    try:
        _train_steps(model, _batches(loader), dense_steps, cfg.train.lr, cfg, device, bar, lambda: "dense")
    finally:
        bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    RunFolder(path.parent).save_tensors(path.name, model.state_dict())


def ensure_dense(cfg: RunConfig, out: Path, seed: int, poll: float = 30.0) -> Path:
    """The seed's dense network, trained here if nobody has: under grid.py's lock of the dense cell, so a
    grid.py process training it meanwhile is waited for, and grid.py later continues from this dense.pt
    (the folder is then what an interrupted dense cell leaves)."""
    path = Path(dense_path(out, seed))
    cell_id = path.parent.name
    said = False
    while not grid.dense_ready(out, seed):
        if not grid.claim(out, cell_id, lambda m: print(m, flush=True)):
            if not said:
                print(f"[seed {seed}] waiting for {cell_id} (another process trains it)", flush=True)
                said = True
            time.sleep(poll)
            continue
        try:
            if not grid.dense_ready(out, seed):
                print(f"[seed {seed}] no dense network at {path}: training it (prunequant's dense phase)",
                      flush=True)
                train_dense(cfg, path)
        finally:
            grid.release(out, cell_id)
    return path


# ----------------------------------------------------------------------------------- measuring
def _cost(m: Measurement, accuracy: float) -> dict[str, Any]:
    return {"memory_mbit": m.memory_mbit, "weight_mbit": m.weight_mbit, "act_mbit": m.act_mbit,
            "macs": m.macs, "bops": m.bops, "params": m.params, "density": m.density(accuracy)}


@torch.no_grad()
def act_levels(model: nn.Module, x: Tensor, quantizers: dict[str, tuple[nn.Module, int]]) -> list[dict]:
    """Distinct values of each activation quantizer's output on ``x`` (eval mode)."""
    found: dict[str, int] = {}
    handles = []
    for name, (mod, _bits) in quantizers.items():
        def hook(m: nn.Module, inp: tuple, out: Any, name: str = name) -> None:
            t = out.value if hasattr(out, "value") else out
            found[name] = count_levels(t)
        handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return [{"name": n, "bits": b, "levels": found[n]} for n, (_, b) in quantizers.items() if n in found]


def weight_row(name: str, bits: int, codes: Tensor) -> dict[str, Any]:
    """A weight layer's levels: distinct integer codes, and their range."""
    return {"name": name, "bits": int(bits), "levels": count_levels(codes), "min_code": int(codes.min()),
            "max_code": int(codes.max())}


def summarize_levels(weights: list[dict], acts: list[dict], wb: int, ab: int) -> dict[str, Any]:
    """``levels`` of the cell: max over layers at the recipe's bits; the others listed by bits."""
    def mx(rows: list[dict], bits: int) -> int:
        return max((r["levels"] for r in rows if r["bits"] == bits), default=0)

    other = {f"weights_{b}bit": mx(weights, b) for b in sorted({r["bits"] for r in weights} - {wb})}
    other.update({f"acts_{b}bit": mx(acts, b) for b in sorted({r["bits"] for r in acts} - {ab})})
    outside = [f"{r['name']} ({r['bits']}-bit): {r['min_code']}..{r['max_code']}" for r in weights
               if "min_code" in r and not -(2 ** (r["bits"] - 1)) <= r["min_code"] <= r["max_code"]
               <= 2 ** (r["bits"] - 1) - 1]
    return {"levels": {"weights": mx(weights, wb), "acts": mx(acts, ab)}, "levels_other": other,
            "codes_outside_range": outside, "weight_layers": weights, "act_quantizers": acts}


def _level_note(levels: dict[str, int], wb: int, ab: int) -> str:
    over = []
    if levels["weights"] > 2 ** wb:
        over.append(f"weights use {levels['weights']} levels (> {2 ** wb}: not {wb}-bit)")
    if levels["acts"] > 2 ** ab:
        over.append(f"activations use {levels['acts']} levels (> {2 ** ab}: not {ab}-bit)")
    return "; ".join(over)


def saved_bytes(state: dict[str, Tensor], path: Path) -> int:
    """Bytes of ``torch.save(state)`` at ``path``."""
    torch.save(state, path)
    return path.stat().st_size


def out_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv / linear layer."""
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
            for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


# ----------------------------------------------------------------------------------- Torch-Pruning
def tp_shrink(model: nn.Module, example: Tensor, sparsity: float) -> nn.Module:
    """Torch-Pruning magnitude (L1) group pruning of ``model`` (in place) to ``sparsity`` per group."""
    import torch_pruning as tp

    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  global_pruning=False, pruning_ratio=sparsity, ignored_layers=[fc])
    pruner.step()
    return model


def run_tp_pq(setup: Setup, folder: Path) -> dict[str, Any]:
    """Torch-Pruning L1 shrink, then prunequant QAT (the recipe with prune off)."""
    cfg = setup.cfg
    s = cfg.recipe.prune.sparsity
    model = setup.dense_model()
    dense_ch = out_channels(model)
    tp_shrink(model, setup.example, s)
    recipe = cfg.recipe.model_copy(deep=True)
    recipe.prune = None
    comp = Compressor(model, recipe, setup.example, steps_per_epoch=setup.steps_per_epoch)
    setup.train(comp.model, compress_lr_schedule(cfg, setup.comp_steps, comp.timeline.quant_begin),
                lambda k: comp.step())
    final = comp.finalize()
    acc = setup.accuracy(final)
    m = measure(final, setup.example)
    wl = []
    for n, mod in final.named_modules():
        wq = weight_quantizer(mod) if isinstance(mod, LAYER_TYPES) else None
        if wq is not None and bool(wq.enabled):
            wl.append(weight_row(n, wq.bits, wq.int_codes(raw_weight(mod))))
    aqs = {n: (q, q.bits) for n, q in final.named_modules()
           if isinstance(q, ActQuantizer) and bool(q.enabled)}
    al = act_levels(final, setup.calib, aqs)
    return {
        **_cost(m, acc), "accuracy": acc, "weight_levels": wl, "act_levels": al,
        "physical_bytes": saved_bytes(final.state_dict(), folder / "model.pt"), "shrunk": True,
        "channels": {"dense": dense_ch, "after": out_channels(final)}, "timeline": comp.timeline.as_dict(),
        "note": (f"Torch-Pruning {_version('torch-pruning')} MagnitudeImportance(p=1), MetaPruner "
                 f"global_pruning=False, pruning_ratio={s} on every coupled group (residual groups "
                 "included, classifier ignored), physically shrunk; then prunequant QAT with prune off (same "
                 "quant block, steps and optimizer). physical_bytes: torch.save of the shrunk model's state "
                 "dict (float32)."),
    }


# ----------------------------------------------------------------------------------- qsparse
def _qsparse_import() -> Any:
    """qsparse 2.0.1 (no shim needed under torch 2.13: see run_qsparse)."""
    import qsparse

    qsparse.set_qsparse_options(log_on_created=False, log_during_train=False)
    return qsparse


def build_qsparse(setup: Setup, model: nn.Module, bits: dict[str, tuple[int, int]]) -> tuple[nn.Module, dict]:
    """``model`` converted with qsparse's operators as the authors' experiments configure them."""
    qs = _qsparse_import()
    from qsparse.quantize import AdaptiveQuantizer, ScalerQuantizer
    from qsparse.sparse import MagnitudePruningCallback

    comp = timeline(setup, model)
    spec, tl = comp.spec, comp.timeline
    if spec is None or spec.kind != "layerwise" or tl.weight_quant_at is None or tl.act_quant_at is None:
        raise SystemExit("peers.py: the qsparse peer needs a layerwise prune block and a quant block")
    sparsity = setup.cfg.recipe.prune.sparsity
    blocks = [n.rsplit(".", 1)[0] for n, m in model.named_modules() if n.endswith(".relu1")]
    if not blocks or not all(hasattr(model.get_submodule(b), "conv2") for b in blocks):
        raise SystemExit(f"peers.py: the qsparse peer expects ResNet basic blocks (conv1-bn1-relu1-conv2), "
                         f"not {type(model).__name__}")
    ab = setup.cfg.recipe.quant.act_bits
    # Pruning: one PruneLayer after each block-internal ReLU; interval given at construction too, since
    # PruneLayer computes its one-step ramp from the interval it was built with.
    op = qs.prune(sparsity=sparsity, dimensions={1}, start=spec.start, interval=spec.interval, repetition=1,
                  callback=MagnitudePruningCallback(mask_refresh_interval=spec.refresh,
                                                    stop_mask_refresh=spec.interval))
    qs.convert(model, op, activation_layers=[nn.ReLU], include="relu1", log=False)
    qs.devise_layerwise_pruning_schedule(model, start=spec.begin, interval=spec.interval,
                                         mask_refresh_interval=spec.refresh, inplace=True)
    # Weights: per output channel (conv) / per tensor (linear), ScalerQuantizer, from weight_quant_at.
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, LAYER_TYPES):
                conv = not isinstance(child, nn.Linear)
                setattr(mod, cname, qs.quantize(child, bits=bits[full][0], channelwise=0 if conv else -1,
                                                timeout=tl.weight_quant_at, callback=ScalerQuantizer(),
                                                name=full))
    # Activations: after every ReLU whose output feeds a layer (not the last: it feeds the pooling),
    # the classifier's input and the network input; AdaptiveQuantizer (running min / max), per tensor.
    relu_bits = {b for n, (_, b) in bits.items() if n not in ("conv1", "fc")} or {ab}
    qs.convert(model, qs.quantize(bits=max(relu_bits), channelwise=-1, timeout=tl.act_quant_at,
                                  callback=AdaptiveQuantizer()),
               activation_layers=[nn.ReLU], excluded_activation_layer_indexes=[(nn.ReLU, [-1])], log=False)
    fc = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    qs.convert(model, qs.quantize(bits=bits[fc][1], channelwise=-1, timeout=tl.act_quant_at,
                                  callback=AdaptiveQuantizer()),
               activation_layers=[nn.Linear], order="pre", log=False)
    first = next(n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES))
    with warnings.catch_warnings():  # "no weight or activation layers": only the input is converted here
        warnings.simplefilter("ignore", UserWarning)
        net = qs.convert(model, qs.quantize(bits=bits[first][1], channelwise=-1, timeout=tl.act_quant_at,
                                            callback=AdaptiveQuantizer()),
                         activation_layers=[], input=True, log=False)
    return net, {"blocks": blocks, "timeline": tl.as_dict(),
                 "schedule_steps": {"begin": spec.begin, "interval": spec.interval, "refresh": spec.refresh}}


def run_qsparse(setup: Setup, folder: Path) -> dict[str, Any]:
    """qsparse layerwise activation pruning + its quantizers, from the dense weights."""
    from qsparse.quantize import QuantizeLayer
    from qsparse.sparse import PruneLayer

    cfg = setup.cfg
    model = setup.dense_model()
    plain = setup.dense_model()
    bits = layer_bits(setup, plain)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        net, info = build_qsparse(setup, model, bits)
        tl = info["timeline"]
        setup.train(net, compress_lr_schedule(cfg, setup.comp_steps, tl["quant_begin"]))
        net.eval()
        acc = setup.accuracy(net)
    (folder / "qsparse.log").write_text(log.getvalue())
    # Kept channels per block (masks after relu1): conv1 outputs, bn1, conv2 inputs.
    keep: dict[str, tuple[float, float]] = {}
    kept = {}
    for b in info["blocks"]:
        pl = [m for m in model.get_submodule(f"{b}.relu1").modules() if isinstance(m, PruneLayer)]
        mask = pl[0].mask.detach().flatten()
        f = float(mask.float().mean())
        kept[b] = [int(mask.sum()), mask.numel()]
        keep.update({f"{b}.conv1": (1.0, f), f"{b}.bn1": (f, f), f"{b}.conv2": (f, 1.0)})
    m = measure_module(plain, setup.example, layer_bits=bits, keep=keep)
    wl = []
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, LAYER_TYPES) and isinstance(getattr(mod, "quantize", None), QuantizeLayer):
                q = mod.quantize
                s = q.weight.detach().flatten()  # the scale per output channel (or one)
                w = mod.weight  # quantized in eval mode (the QuantizeLayer's forward)
                codes = torch.round(w / (s.reshape([-1] + [1] * (w.dim() - 1)) if s.numel() > 1 else s))
                wl.append({**weight_row(n, q.bits, codes), "quantized": bool(q._quantized)})
    aqs = {n: (q, q.bits) for n, q in net.named_modules()
           if isinstance(q, QuantizeLayer) and q.batch_dimension == 0}
    al = act_levels(net, setup.calib, aqs)
    return {
        **_cost(m, acc), "accuracy": acc, "weight_levels": wl, "act_levels": al,
        "physical_bytes": saved_bytes(net.state_dict(), folder / "model.pt"), "shrunk": False,
        "kept_channels": kept, "timeline": tl, "schedule_steps": info["schedule_steps"],
        "note": (f"qsparse {_version('qsparse')} as the authors' mdpi2022 configs: MagnitudePruningCallback "
                 "(running mean |a|) after each block-internal ReLU, devise_layerwise_pruning_schedule with "
                 "prunequant's S/I/R in steps; ScalerQuantizer weights (conv per channel, fc per tensor), "
                 "AdaptiveQuantizer activations (per tensor, step (ub-lb)/2^b), timeouts at prunequant's "
                 "quantizer start steps; no compatibility shim needed under torch "
                 f"{torch.__version__.split('+')[0]}. Masked, not shrunk: physical_bytes is the masked "
                 "model's state dict (all channels); memory counts kept channels."),
    }


# ----------------------------------------------------------------------------------- Brevitas
def to_brevitas(model: nn.Module, bits: dict[str, tuple[int, int]], act_bits: int) -> tuple[nn.Module, dict]:
    """``model`` with Brevitas layers (weights copied), as Brevitas' ResNet example builds its layers."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    q = copy.deepcopy(model)
    act_q: dict[str, tuple[nn.Module, int]] = {}
    fc = [n for n, m in q.named_modules() if isinstance(m, nn.Linear)][-1]
    first = next(n for n, m in q.named_modules() if isinstance(m, LAYER_TYPES))
    for name, mod in list(q.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Conv2d):
                new = qnn.QuantConv2d(child.in_channels, child.out_channels, child.kernel_size,
                                      stride=child.stride, padding=child.padding, dilation=child.dilation,
                                      groups=child.groups, bias=child.bias is not None,
                                      weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits[full][0])
            elif isinstance(child, nn.Linear):
                lin = qnn.QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                      weight_quant=Int8WeightPerTensorFloat, weight_bit_width=bits[full][0])
                lin.load_state_dict(child.state_dict(), strict=False)
                ident = qnn.QuantIdentity(bit_width=bits[full][1])
                act_q[f"{full}.0"] = (ident, bits[full][1])
                setattr(mod, cname, nn.Sequential(ident, lin))
                continue
            elif isinstance(child, nn.ReLU):
                new = qnn.QuantReLU(bit_width=act_bits)
                act_q[full] = (new, act_bits)
                setattr(mod, cname, new)
                continue
            else:
                continue
            new.load_state_dict(child.state_dict(), strict=False)
            setattr(mod, cname, new)
    inp = qnn.QuantIdentity(bit_width=bits[first][1])
    act_q = {"0": (inp, bits[first][1]), **{f"1.{k}": v for k, v in act_q.items()}}
    assert fc in bits
    return nn.Sequential(inp, q), act_q


def _run_brevitas(setup: Setup, folder: Path, shrink: bool) -> dict[str, Any]:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    cfg = setup.cfg
    plain = setup.dense_model()
    dense_ch = out_channels(plain)
    s = cfg.recipe.prune.sparsity if shrink else 0.0
    if shrink:
        tp_shrink(plain, setup.example, s)
    bits = layer_bits(setup, plain)
    net, act_q = to_brevitas(plain, bits, cfg.recipe.quant.act_bits)
    net.to(setup.device)
    setup.train(net, compress_lr_schedule(cfg, setup.comp_steps, 0))
    net.eval()
    acc = setup.accuracy(net)
    m = measure_module(plain, setup.example, layer_bits=bits)
    wl = []
    with torch.no_grad():
        for n, mod in net.named_modules():
            if isinstance(mod, QuantWeightBiasInputOutputLayer):
                qt = mod.quant_weight()
                wl.append(weight_row(n, int(qt.bit_width), qt.int()))
    al = act_levels(net, setup.calib, act_q)
    what = "Torch-Pruning-shrunk (L1, every coupled group)" if shrink else "dense"
    return {
        **_cost(m, acc), "accuracy": acc, "weight_levels": wl, "act_levels": al,
        "physical_bytes": saved_bytes(net.state_dict(), folder / "model.pt"), "shrunk": shrink,
        "channels": {"dense": dense_ch, "after": out_channels(plain)},
        "note": (f"Brevitas {_version('brevitas')} QAT of the {what} network, layers as brevitas_examples "
                 "bnn_pynq ResNet: QuantConv2d Int8WeightPerChannelFloat (narrow range: 2^b-1 codes), "
                 "QuantReLU (Uint8ActPerTensorFloat, learned scale) for every ReLU, QuantLinear "
                 "Int8WeightPerTensorFloat (float bias), QuantIdentity on the input and the classifier "
                 "input; quantized from step 0. "
                 + ("physical_bytes: the shrunk model's state dict." if shrink else
                    "Nothing pruned: physical_bytes is the full model's state dict.")),
    }


def run_brevitas_dense(setup: Setup, folder: Path) -> dict[str, Any]:
    """Brevitas W4A4 QAT of the dense network."""
    return _run_brevitas(setup, folder, shrink=False)


def run_brevitas_tp(setup: Setup, folder: Path) -> dict[str, Any]:
    """Brevitas W4A4 QAT of the Torch-Pruning-shrunk network."""
    return _run_brevitas(setup, folder, shrink=True)


RUNNERS: dict[str, Callable[[Setup, Path], dict[str, Any]]] = {
    "qsparse": run_qsparse, "tp_pq": run_tp_pq, "brevitas_dense": run_brevitas_dense,
    "brevitas_tp": run_brevitas_tp,
}
LABELS = {"qsparse": "qsparse (authors' library): layerwise A-L1 + QAT",
          "tp_pq": "Torch-Pruning L1 + prunequant QAT",
          "brevitas_dense": "Brevitas QAT (dense)",
          "brevitas_tp": "Torch-Pruning L1 + Brevitas QAT"}
#: Why a peer may use more levels than its bits allow (read in its source).
LEVEL_CAUSE = {"qsparse": (" qsparse's ScalerQuantization does not saturate: its clamp_ acts on a temporary"
                           " copy (q.float().clamp_), so round(w / s) can reach +2^(b-1) (or beyond, the"
                           " scale being a running mean of max|W|/2^(b-1)).")}
METHOD = {"qsparse": ("a_l1", "layerwise"), "tp_pq": ("w_l1", "oneshot"), "brevitas_dense": (None, None),
          "brevitas_tp": ("w_l1", "oneshot")}


# ----------------------------------------------------------------------------------- driver
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_peer(cell: PeerCell, setup: Setup, out: Path, dense_acc: float, quick: bool) -> dict[str, Any]:
    """Run one peer cell (``setup.cfg`` at the cell's sparsity) and write its cell.json (last)."""
    cfg = setup.cfg
    name = cell.name
    assert cfg.train.seed == cell.seed
    assert cell.sparsity is None or cfg.recipe.prune.sparsity == cell.sparsity
    folder = out / cell.id
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = RUNNERS[name](setup, folder)
    q = cfg.recipe.quant
    wb, ab = q.weight_bits, q.act_bits
    lv = summarize_levels(res.pop("weight_levels"), res.pop("act_levels"), wb, ab)
    atomic_write_json(folder / "levels.json", lv)
    importance, schedule = METHOD[name]
    note = res.pop("note") + (f" Physical size: {res['physical_bytes']:,} bytes"
                              f" ({'shrunk' if res['shrunk'] else 'not shrunk'}).")
    over = _level_note(lv["levels"], wb, ab)
    note += f" levels: max over the {wb}-bit weights / {ab}-bit activations"
    if lv["levels_other"]:
        note += " (" + ", ".join(f"{k}: {v}" for k, v in lv["levels_other"].items()) + ")"
    note += "."
    if lv["codes_outside_range"]:
        out_of = lv["codes_outside_range"]
        over = "; ".join(filter(None, [over, f"weight codes outside the signed b-bit range in {len(out_of)} "
                                             f"layers (e.g. {out_of[0]}; {out_of[-1]})"]))
    if over:
        note += " NOTE: " + over + "." + LEVEL_CAUSE.get(name, "")
    if quick:
        note += f" --quick: {grid.QUICK_NOTE}."
    bits = f"W{wb}A{ab}"
    where = bits if cell.sparsity is None else f"{percent(cell.sparsity)} % {bits}"
    record = {
        "id": cell.id, "family": "peer", "label": f"{LABELS[name]}, {where}", "seed": cell.seed,
        "importance": importance, "schedule": schedule, "sparsity": cell.sparsity,
        "bits": bits, "accuracy": res.pop("accuracy"), "dense_accuracy": dense_acc,
        **{k: res.pop(k) for k in ("memory_mbit", "weight_mbit", "act_mbit", "macs", "bops", "params",
                                   "density")},
        "levels": lv["levels"], "note": note,
    }
    extra = {
        "peer": name, "levels_other": lv["levels_other"], "seconds": round(time.time() - t0, 1),
        "versions": {p: _version(p) for p in ("torch", "qsparse", "brevitas", "torch-pruning")},
        "prunequant_commit": _commit(), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "steps": setup.comp_steps, "quick": quick,
        "config": cfg.to_dict(), **res,
    }
    atomic_write_json(folder / "peer.json", extra)  # everything beyond the cell schema
    write_cell(folder, record)  # last: a folder with cell.json is a finished cell
    return {**record, **extra}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, defaults resolved: ``sparsities`` (deduplicated), ``seeds``, ``out``, ``command``;
    a bad value exits with status 2 and one message."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(RECIPE),
                    help=f"base run configuration, as for grid.py (default {RECIPE.name})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the base configuration, as for grid.py / prunequant run "
                         "(repeatable; recipe.prune.sparsity is set by --sparsities)")
    ap.add_argument("--sparsities", type=sparsity_arg, nargs="+", default=list(SPARSITIES), metavar="S",
                    help="channel sparsities of the pruning peers, each in (0, 1) (default 0.5 0.75: "
                         "grid.py's; brevitas_dense prunes nothing and runs once per seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--out", type=Path, default=None,
                    help=f"grid folder (default {OUT}; --quick: {OUT_QUICK}); cells are <out>/peer_<name>_"
                         "<sparsity %%>_s<seed>/, brevitas_dense's <out>/peer_brevitas_dense_s<seed>/")
    ap.add_argument("--quick", action="store_true",
                    help="grid.py's --quick sizes (a hundred-odd images, a few dozen steps), seed 0 (tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (train.threads)")
    ap.add_argument("--poll", type=float, default=30.0, help="seconds between checks for a dense network "
                    "another process is training")
    args = ap.parse_args(argv)
    args.sparsities = list(dict.fromkeys(args.sparsities))
    pcts = [percent(sp) for sp in args.sparsities]
    if len(set(pcts)) < len(pcts):
        ap.error(f"argument --sparsities: {' '.join(f'{sp:g}' for sp in args.sparsities)} name cells by the "
                 "same whole percent; give sparsities at least 0.01 apart")
    args.out = args.out or (OUT_QUICK if args.quick else OUT)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    given = sys.argv[1:] if argv is None else argv
    args.command = shlex.join([".venv/bin/python", "benchmarks/peers.py", *given])
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the missing peer cells; print one line per cell."""
    args = parse_args(argv)
    out: Path = args.out
    sparsities, seeds, command = args.sparsities, args.seeds, args.command
    base = grid.base_config(args.config, args.set, quick=args.quick, threads=args.threads)
    logged = False
    for seed in seeds:
        cells = peer_cells(args.peers, sparsities, seed)
        todo = [c for c in cells if not cell_done(out / c.id)]
        for c in cells:
            if c not in todo:
                print(f"[seed {seed}] {c.id}: finished, skipped", flush=True)
        if not todo:
            continue
        if not logged:  # grid.md lists the commands that ran cells in its folder
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "commands.txt", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {grid.HOST} pid {os.getpid()}: {command}\n")
            logged = True
        cfg = make_config(base, seed)
        torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
        dpath = ensure_dense(cfg, out, seed, args.poll)
        data = load_data(cfg)
        calib = 32 if args.quick else CALIBRATION_IMAGES
        dense_state = load_dense_checkpoint(str(dpath))
        setups = {sp: Setup(make_config(base, seed, sp), data, dense_state, calib)
                  for sp in {c.sparsity for c in todo}}
        some = next(iter(setups.values()))
        dense_acc = some.accuracy(some.dense_model())
        for c in todo:
            if not grid.claim(out, c.id, lambda m: print(m, flush=True)):  # grid.py's per-cell lock
                print(f"[seed {seed}] {c.id}: claimed by another process, left to it", flush=True)
                continue
            try:
                if cell_done(out / c.id):  # finished by another process meanwhile
                    continue
                print(f"[seed {seed}] {c.id}: running", flush=True)
                cell = run_peer(c, setups[c.sparsity], out, dense_acc, args.quick)
            finally:
                grid.release(out, c.id)
            print(f"[seed {seed}] {c.id}: {cell['accuracy']:.2f} % at {cell['memory_mbit']:.3f} Mbit, "
                  f"levels {cell['levels']} ({cell['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
