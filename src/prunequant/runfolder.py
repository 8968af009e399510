"""Run folders: where ``prunequant run`` may write, and the checksums that guard what it wrote.

A run folder (``--out``) holds ``manifest.json``::

    {"format": "prunequant-run", "version": 1,
     "files": {"dense.pt": {"sha256": "...", "bytes": 112833}, "masked.pt": {...},
               "model/weights.pt": {...}, "model/pruning.json": {...}, "report.json": {...}}}

It lists every file that prunequant reads back (``summary.md`` and the run's plots are for people and
are not listed; ``prunequant analyze`` lists its ``analysis/ranking.json`` and heatmap). A run starts a
new, empty manifest just before it writes its first file, adds each file right after writing it (both
atomically, so the manifest never lists a file that is not complete) and adds ``report.json`` last. A
folder whose manifest does not list ``report.json`` is thus a run that did not finish, and a file that
was truncated, edited or replaced after the run wrote it no longer matches its entry. ``prunequant
export`` checks every listed file before it reads any; ``train.dense_checkpoint`` checks its file
against the manifest beside it, if any. """

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .recipe import RecipeError
from .utils import atomic_torch_save, atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = "prunequant-run"
VERSION = 1
#: What ``prunequant run`` writes at the top of its folder (besides the manifest).
RUN_ENTRIES = ("report.json", "summary.md", "channels.png", "accuracy_memory.png", "dense.pt", "masked.pt",
               "model")


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _older_run(path: Path) -> bool:
    """Whether ``path`` is the folder of a run by a prunequant without manifests (its report.json)."""
    report = path / "report.json"
    try:
        if not report.is_file() or report.stat().st_size > 1 << 24:
            return False
        data = json.loads(report.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "prunequant_version" in data and "schema_version" in data


def check_out_dir(path: str | Path, field: str = "--out") -> Path:
    """Refuse an output folder that cannot be written, or whose files a run would clobber.

    Accepted: a folder that does not exist yet (under a writable folder), or an existing folder
    that holds none of :data:`RUN_ENTRIES` or is an earlier run's folder (has ``manifest.json``, or,
    written by an older prunequant, a ``report.json`` of a run).
    Checks only; creates nothing. Raises :class:`RecipeError` naming ``field``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        hint = (f"did you mean --config {p}? " if p.suffix in (".yaml", ".yml") else
                f"did you mean --out {p.with_suffix('') if p.suffix else Path(str(p) + '_run')}? ")
        raise RecipeError(f"{field} {p}: is an existing file, not a folder; {hint}(the file was left "
                          "untouched; nothing was written)")
    anc = _first_existing(p)
    if not anc.is_dir():
        raise RecipeError(f"{field} {p}: {anc} is a file, so no folder can be made under it; choose "
                          "another folder (nothing was written)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RecipeError(f"{field} {p}: cannot write into {anc} (permission denied); choose a folder "
                          "you can write to")
    if p.is_dir() and not (p / MANIFEST).is_file() and not _older_run(p):
        clash = sorted(n for n in RUN_ENTRIES if (p / n).exists())
        if clash:
            raise RecipeError(
                f"{field} {p}: holds {', '.join(clash)}, which no prunequant run wrote (there is no "
                f"{MANIFEST} and no run's report.json) and a run would overwrite; choose a new or empty "
                "folder, or move them away (nothing was written)")
    return p


def read_manifest(run_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """The ``files`` table of ``run_dir/manifest.json``; ``None`` when there is no manifest."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not valid JSON (truncated or damaged: {e})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RecipeError(f"{path}: not a prunequant run manifest")
    if data.get("version") != VERSION:
        raise RecipeError(f"{path}: unsupported version {data.get('version')!r} (this prunequant reads "
                          f"version {VERSION})")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and _inside(k) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("bytes"), int) for k, v in files.items()):
        raise RecipeError(f"{path}: malformed 'files' table (expected relative names inside the run folder "
                          "-> {sha256, bytes})")
    return files


def _inside(name: str) -> bool:
    """A relative name that stays inside the run folder (no absolute path, no '..')."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def _write_manifest(run_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(run_dir / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})


def verify_file(run_dir: str | Path, name: str, files: dict[str, dict[str, Any]]) -> Path:
    """Check ``run_dir/name`` against its manifest entry; :class:`RecipeError` naming the file."""
    path = Path(run_dir) / name
    entry = files.get(name)
    if entry is None:
        raise RecipeError(f"{path}: not listed in {MANIFEST}: the run that wrote this folder did not "
                          "write it, or did not finish")
    fix = "restore the file or re-run `prunequant run` into this folder"
    if not path.is_file():
        raise RecipeError(f"{path}: missing ({MANIFEST} lists it); {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise RecipeError(f"{path}: {size:,} bytes, but the run wrote {entry['bytes']:,} ({MANIFEST}): "
                          f"truncated or replaced since; {fix}")
    if sha256_file(path) != entry["sha256"]:
        raise RecipeError(f"{path}: content differs from its SHA-256 in {MANIFEST}: edited or damaged "
                          f"since the run wrote it; {fix}")
    return path


def verify_run(run_dir: str | Path, required: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Check every file ``run_dir``'s manifest lists, and that ``required`` files are listed."""
    files = read_manifest(run_dir)
    if files is None:
        raise RecipeError(f"{run_dir}: no {MANIFEST}, so its files cannot be checked: the run did not "
                          "finish, or an older prunequant wrote it; re-run `prunequant run` into this folder")
    for name in required:
        if name not in files:
            raise RecipeError(f"{Path(run_dir) / name}: not listed in {MANIFEST}: the run that wrote this "
                              "folder did not finish (or did not write it); re-run `prunequant run` into it")
    for name in files:
        verify_file(run_dir, name, files)
    return files


def check_beside_manifest(path: str | Path, field: str) -> None:
    """Check a file that a run wrote (e.g. ``dense.pt``) against the manifest in its folder, if any."""
    p = Path(path)
    if not p.is_file():  # the loader says what is wrong with it
        return
    files = read_manifest(p.parent)
    if files is None:
        return
    if p.name not in files:
        raise RecipeError(f"{field}: {p} is not listed in {p.parent / MANIFEST}: that run did not write "
                          "it, or did not finish; use the dense.pt of a finished run")
    try:
        verify_file(p.parent, p.name, files)
    except RecipeError as e:
        raise RecipeError(f"{field}: {e}") from None


class RunFolder:
    """Writes a run's files and keeps ``manifest.json`` in step (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._begun = False

    def begin(self) -> None:
        """Start a new, empty manifest (called before the run's first file is written)."""
        self._begun = True
        _write_manifest(self.path, {})

    def record(self, *names: str) -> None:
        """Add files (relative names) just written to the manifest, with their SHA-256 and size."""
        files = read_manifest(self.path) or {}
        for name in names:
            p = self.path / name
            files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        _write_manifest(self.path, files)

    def save_tensors(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        """``torch.save`` a state dict atomically and record it."""
        if not self._begun:
            self.begin()
        path = atomic_torch_save(state, self.path / name)
        self.record(name)
        return path


__all__ = ["MANIFEST", "RunFolder", "check_beside_manifest", "check_out_dir", "read_manifest", "verify_file",
           "verify_run"]
