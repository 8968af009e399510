"""Training checkpoints of ``prunequant run``: tensors only, one file each, written atomically.

A checkpoint is ``checkpoints/step-<global step>.pt`` in the run folder, a ``{name: tensor}`` file
(``torch.save``; read back with ``torch.load(weights_only=True)``, nothing is unpickled) holding

* ``model.<key>``: the model's state dict (the dense model in the dense phase, the instrumented
  model in the compression phase: weights, BatchNorm statistics, masks and their statistics,
  quantizer statistics, the schedule's step counter ``pq_step``);
* ``optim.<i>.<key>``: the optimizer's per-parameter state (SGD's momentum buffers);
* ``loader.epoch_state``: the data loader's generator state at the start of the current epoch
  (the epoch's permutation is drawn again from it, and ``batch`` batches are skipped);
* ``rng.torch``, ``rng.cuda.<i>``, ``rng.python``, ``rng.numpy``: every random state;
* ``meta``: UTF-8 JSON as a uint8 tensor: format, version, phase, step, global step, epoch and
  batch position, the SHA-256 of the run's ``config.json``, the results measured so far and the
  scalar parts of the Python / NumPy random states.

The file is written to a temporary name, fsynced and renamed into place, then listed in the run's
``manifest.json`` (its SHA-256 and size); only then is the checkpoint before the previous one
deleted. A process killed at any moment thus leaves the last listed checkpoint whole, and a
checkpoint is used only when it matches its manifest entry.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..recipe import RecipeError
from ..runfolder import CHECKPOINTS, RunFolder, read_manifest, verify_file
from ..utils import atomic_write, load_tensor_file

FORMAT = "prunequant-checkpoint"
VERSION = 1
KEEP = 2  # the newest checkpoints kept (the older one is a fallback if the newest is removed)


def checkpoint_name(global_step: int) -> str:
    return f"{CHECKPOINTS}/step-{global_step:09d}.pt"


# ------------------------------------------------------------------------------------ random states
def rng_tensors() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random state as tensors plus the JSON-able scalars that go with them."""
    py_version, py_state, py_gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.python": torch.tensor(py_state, dtype=torch.int64),
               "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"python_version": py_version, "python_gauss": py_gauss, "numpy_name": name, "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached)}
    return tensors, meta


def set_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_tensors` captured."""
    random.setstate((meta["python_version"], tuple(int(v) for v in tensors["rng.python"].tolist()),
                     meta["python_gauss"]))
    np.random.set_state((meta["numpy_name"], tensors["rng.numpy"].numpy().astype(np.uint32),
                         meta["numpy_pos"], meta["numpy_has_gauss"], meta["numpy_cached"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------------- optimizer state
def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's per-parameter state (momentum buffers) as ``optim.<index>.<key>`` tensors."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if not isinstance(v, Tensor):
                v = torch.tensor(v)
            out[f"optim.{i}.{k}"] = v.detach().clone()
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    """Give ``opt`` (freshly built on the same parameters) the state :func:`optimizer_tensors` saved."""
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        _, i, k = name.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# ------------------------------------------------------------------------------------------ files
def _kill_hook(env: str, global_step: int) -> bool:
    """Test hook: whether ``env`` names this global step (the process then kills itself)."""
    v = os.environ.get(env)
    return v is not None and v.strip() == str(global_step)


def save_checkpoint(folder: RunFolder, global_step: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep: int = KEEP) -> str:
    """Write one checkpoint atomically, list it in the manifest, then drop all but the ``keep`` newest."""
    name = checkpoint_name(global_step)
    body = {**tensors, "meta": torch.frombuffer(bytearray(json.dumps(
        {"format": FORMAT, "version": VERSION, **meta}).encode("utf-8")), dtype=torch.uint8)}

    def write(p: Path) -> None:
        torch.save(body, p)
        if _kill_hook("_PRUNEQUANT_KILL_IN_CHECKPOINT", global_step):  # a crash in the middle of the write
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(folder.path / name, write)
    folder.record(name)
    old = sorted(n for n in (read_manifest(folder.path) or {}) if n.startswith(f"{CHECKPOINTS}/"))[:-keep]
    if old:
        folder.remove(*old)
    return name


def listed_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints the manifest lists, oldest first."""
    return sorted(n for n in (read_manifest(run_dir) or {}) if n.startswith(f"{CHECKPOINTS}/"))


def load_checkpoint(run_dir: Path, name: str, config_sha256: str,
                    log: Any = print) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Check a listed checkpoint against the manifest and the run's configuration, then load it.

    Raises :class:`RecipeError` naming the file and what to do when it is damaged.
    """
    files = read_manifest(run_dir) or {}
    older = [n for n in listed_checkpoints(run_dir) if n < name]
    way = (f"delete it to resume from the checkpoint before it ({run_dir / older[-1]})" if older else
           "no older checkpoint is kept")
    fix = f"{way}, or start the run again with --overwrite"
    try:
        verify_file(run_dir, name, files)
    except RecipeError as e:
        raise RecipeError(f"--resume: checkpoint {e}".replace("; restore the file or re-run `prunequant run` "
                                                              "into this folder", "") + f"; {fix}") from None
    try:
        state = load_tensor_file(run_dir / name, RecipeError, "--resume: checkpoint")
    except RecipeError as e:
        raise RecipeError(f"{e}; {fix}") from None
    raw = state.pop("meta", None)
    try:
        meta = json.loads(bytes(raw.tolist()).decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecipeError(f"--resume: checkpoint {run_dir / name} has no readable meta record (not a "
                          f"prunequant checkpoint); {fix}")
    if meta.get("version") != VERSION:
        raise RecipeError(f"--resume: checkpoint {run_dir / name} has version {meta.get('version')!r}; this "
                          f"prunequant reads version {VERSION}; start the run again with --overwrite")
    if meta.get("config_sha256") != config_sha256:
        raise RecipeError(f"--resume: checkpoint {run_dir / name} was written by a run of another "
                          f"configuration than the folder's config.json; {fix}")
    return state, meta


def pick_checkpoint(run_dir: Path, log: Any = print) -> str | None:
    """The newest listed checkpoint whose file exists (a listed file deleted by the user is skipped)."""
    names = listed_checkpoints(run_dir)
    for name in reversed(names):
        if (run_dir / name).exists():
            return name
        log(f"note: {run_dir / name} is listed but missing; trying the checkpoint before it")
    return None


__all__ = ["load_checkpoint", "load_optimizer", "optimizer_tensors", "pick_checkpoint", "rng_tensors",
           "save_checkpoint", "set_rng"]
