"""Run folders: where ``prunequant run`` may write, and the checksums that guard what it wrote.

A run folder (``--out``) holds ``manifest.json``::

    {"format": "prunequant-run", "version": 1,
     "files": {"dense.pt": {"sha256": "...", "bytes": 112833}, "masked.pt": {...},
               "model/weights.pt": {...}, "model/pruning.json": {...}, "report.json": {...}}}

It lists every file that prunequant reads back (``summary.md`` and the run's plots are for people
and are not listed; ``prunequant analyze`` lists its ``analysis/ranking.json`` and heatmap). A run
starts a new, empty manifest just before it writes its first file, adds each file right after
writing it (both atomically, so the manifest never lists a file that is not complete) and adds
``report.json`` last. A folder whose manifest does not list ``report.json`` is thus a run that did
not finish, and a file that was truncated, edited or replaced after the run wrote it no longer
matches its entry. ``prunequant export`` checks every listed file before it reads any;
``train.dense_checkpoint`` checks its file against the manifest beside it, if any.

A run folder belongs to one run. A run writes ``config.json`` (its configuration, listed) first, holds
``run.lock`` (pid, host, start time; created with ``O_CREAT | O_EXCL``) while it writes, and keeps
its latest checkpoints in ``checkpoints/`` (listed; see :mod:`prunequant.train.checkpoint`). Another
run may write into the folder only to continue it (``resume``) or to replace it (``overwrite``,
which first removes every file the earlier run wrote); :func:`check_out_dir` refuses anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .recipe import RecipeError
from .utils import atomic_torch_save, atomic_write_json, sha256_file

MANIFEST = "manifest.json"
CONFIG = "config.json"
LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
FORMAT = "prunequant-run"
VERSION = 1
#: What ``prunequant run`` writes at the top of its folder (besides the manifest).
RUN_ENTRIES = ("report.json", "summary.md", "channels.png", "accuracy_memory.png", "dense.pt", "masked.pt",
               "model", CONFIG, CHECKPOINTS)
#: What ``overwrite`` removes: everything a run, ``prunequant export`` (default names) and
#: ``prunequant analyze`` (default folder) write into a run folder; other files stay.
OWN_ENTRIES = (*RUN_ENTRIES, MANIFEST, "analysis", "model.qdq.onnx", "model.qonnx.onnx", "model.pqpack")


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


def _run_in(p: Path) -> tuple[str, bool] | None:
    """What run ``p`` holds (a description, and whether it can be resumed), or None if no run's."""
    if (p / MANIFEST).is_file():
        try:
            files = read_manifest(p)
        except RecipeError:
            return "a run whose manifest.json is damaged", False
        files = files or {}
        if "report.json" in files:
            return "a finished run (its manifest.json lists report.json)", False
        if CONFIG in files:
            return "an unfinished run (manifest.json without report.json)", True
        return "an unfinished run of a prunequant that could not resume it (no config.json)", False
    if _older_run(p):
        return "a run of an older prunequant (its report.json; no manifest.json)", False
    own = [n for n in (CONFIG, CHECKPOINTS) if (p / n).exists()]
    if own:  # the lock alone is not a run: RunLock refuses a live holder and takes over a dead one
        return f"files of a prunequant run ({', '.join(own)}; no {MANIFEST})", False
    return None


def check_out_dir(path: str | Path, field: str = "--out", *, resume: bool = False,
                  overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot be written, or that holds another run's or foreign files.

    Accepted: a folder that does not exist yet (under a writable folder), or an existing folder
    that holds none of :data:`RUN_ENTRIES` and no run. A run's folder (``manifest.json``, or,
    written by an older prunequant, a ``report.json`` of a run) only with ``overwrite`` (the caller
    replaces it) or, when the run is unfinished and has its ``config.json``, with ``resume``.
    Checks only; creates nothing. Raises :class:`RecipeError` naming ``field``.
    """
    p = Path(path)
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other: --resume continues the run in the "
                          "folder, --overwrite replaces it with a new run; pass one")
    if p.exists() and not p.is_dir():
        hint = (f"did you mean --config {p}? " if p.suffix in (".yaml", ".yml") else
                f"did you mean --out {p.with_suffix('') if p.suffix else Path(str(p) + '_run')}? ")
        raise RecipeError(f"{field} {p}: is an existing file, not a folder; {hint}(the file was left "
                          "untouched; nothing was written)")
    if resume:
        if not p.is_dir():
            raise RecipeError(f"--resume {p}: no such folder; pass the --out folder of an unfinished "
                              "`prunequant run` (nothing was written)")
        held = _run_in(p)
        if held is None:
            raise RecipeError(f"--resume {p}: holds no prunequant run (no {MANIFEST}); pass the --out folder "
                              "of an unfinished `prunequant run` (nothing was written)")
        what, resumable = held
        if not resumable:
            raise RecipeError(f"--resume {p}: holds {what}, which cannot be resumed; run it again with "
                              f"--out {p} --overwrite, or into a new folder (nothing was written)")
    anc = _first_existing(p)
    if not anc.is_dir():
        raise RecipeError(f"{field} {p}: {anc} is a file, so no folder can be made under it; choose "
                          "another folder (nothing was written)")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RecipeError(f"{field} {p}: cannot write into {anc} (permission denied); choose a folder "
                          "you can write to")
    if p.is_dir() and not resume:
        held = _run_in(p)
        if held is not None and not overwrite:
            what, resumable = held
            ways = (f"continue it with `prunequant run --resume {p}`, replace it with --overwrite"
                    if resumable else "replace it with --overwrite")
            raise RecipeError(f"{field} {p}: holds {what}; a run folder belongs to one run: {ways}, or "
                              "choose a new folder (nothing was written)")
        if held is None:
            clash = sorted(n for n in RUN_ENTRIES if (p / n).exists())
            if clash:
                raise RecipeError(
                    f"{field} {p}: holds {', '.join(clash)}, which no prunequant run wrote (there is no "
                    f"{MANIFEST} and no run's report.json) and a run would overwrite; choose a new or empty "
                    "folder, or move them away (nothing was written)")
    return p


def clear_run(path: Path, keep: Iterable[str] = ()) -> list[str]:
    """Remove the files an earlier run wrote into ``path`` (:data:`OWN_ENTRIES` and leftover temporary
    files of atomic writes), except ``keep``; other files stay. The manifest goes first, so an
    interruption leaves a folder that no longer claims to hold the earlier run. Returns what went."""
    keep = set(keep)
    gone = []
    for name in (MANIFEST, *(n for n in OWN_ENTRIES if n != MANIFEST)):  # the manifest first
        q = path / name
        if name in keep or not (q.exists() or q.is_symlink()):
            continue
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q)
        else:
            q.unlink()
        gone.append(name)
    for q in path.glob(".*.tmp"):  # atomic_write's temporary files of a crashed writer
        if q.is_file():
            q.unlink()
            gone.append(q.name)
    return gone


# ----------------------------------------------------------------------------------------------- lock
HOST = socket.gethostname()


def proc_start(pid: int) -> str | None:
    """The process's start time (Linux ``/proc/<pid>/stat`` field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = proc_start(pid)
    return not (started and now and now != started)


def read_lock(path: Path) -> dict[str, Any] | None:
    """A lock file's holder, ``{}`` when unreadable (being written), None when there is no lock."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return d if isinstance(d, dict) else {}


class FileLock:
    """A lock file, taken with ``O_CREAT | O_EXCL`` (atomic) and holding ``{pid, host, started, time}``.

    A lock of a process on this host that no longer runs (or whose pid now belongs to another process),
    or one left empty for a minute (its writer died), is stale and taken over: renamed away (only one
    process wins the rename), checked to be the stale one, removed. A live holder, or one on another
    host (whose processes cannot be checked from here), keeps it. Run folders (:class:`RunLock`) and
    benchmark cells (``benchmarks/grid.py``) use it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def stale(self, holder: dict[str, Any]) -> bool:
        """Whether the lock ``holder`` (as :func:`read_lock` gives it) may be taken over."""
        if not holder:  # empty: being written, unless it stayed empty (its writer died)
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return False
        if holder.get("host") != HOST or not isinstance(holder.get("pid"), int):
            return False  # another machine's process cannot be checked from here
        return not _alive(holder["pid"], holder.get("started"))

    def try_acquire(self, on_takeover: Callable[[dict[str, Any]], None] | None = None
                    ) -> dict[str, Any] | None:
        """Take the lock: None when taken, else its live holder (``{}`` when others kept taking it).
        ``on_takeover(holder)`` is told of a stale lock taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": HOST, "started": proc_start(os.getpid()), "time": time.time()}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is None:
                    continue  # released meanwhile
                if not self.stale(holder):
                    return holder
                away = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, away)
                except FileNotFoundError:
                    continue  # another process took it over first
                if read_lock(away) != holder:  # a fresh lock replaced the stale one: put it back
                    try:
                        os.link(away, self.path)
                    except FileExistsError:
                        pass
                    os.unlink(away)
                    continue
                os.unlink(away)
                if on_takeover is not None:
                    on_takeover(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return None
        return {}

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        holder = read_lock(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == HOST:
            self.path.unlink(missing_ok=True)


class RunLock(FileLock):
    """``run.lock`` in a run folder: one process writes the folder at a time (see :class:`FileLock`)."""

    def __init__(self, folder: str | Path, field: str = "--out"):
        super().__init__(Path(folder) / LOCK)
        self.field = field
        self.held = False

    def acquire(self, log: Callable[[str], None] = print) -> None:
        """Take the lock or raise :class:`RecipeError` naming its holder."""
        holder = self.try_acquire(lambda h: log(
            f"note: {self.path}: took over the lock of pid {h.get('pid')} on {h.get('host')}, which is no "
            "longer running (an interrupted run)"))
        if holder is None:
            self.held = True
            return
        if not holder:
            raise RecipeError(f"{self.field} {self.path.parent}: could not take {self.path} (other processes "
                              "keep taking it); try again")
        self._refuse(holder)

    def _refuse(self, holder: dict[str, Any]) -> None:
        since = holder.get("time")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) \
            else "?"
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {when}"
        extra = (f"; if that process is gone (another machine's processes cannot be checked from here), "
                 f"delete {self.path}") if holder.get("host") not in (None, HOST) else ""
        raise RecipeError(f"{self.field} {self.path.parent}: another prunequant process is writing this "
                          f"folder ({who}; {LOCK}); a run folder belongs to one run: wait for it to end or "
                          f"choose another folder{extra} (nothing was written)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        super().release()


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

    def __init__(self, path: str | Path, existing: bool = False):
        self.path = Path(path)
        self._begun = existing  # True: continue the folder's manifest (a resumed run)

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

    def save_json(self, name: str, data: Any) -> Path:
        """Write JSON atomically and record it."""
        if not self._begun:
            self.begin()
        path = atomic_write_json(self.path / name, data)
        self.record(name)
        return path

    def remove(self, *names: str) -> None:
        """Drop files from the manifest, then delete them (a crash in between leaves unlisted files)."""
        if not names:
            return
        files = read_manifest(self.path) or {}
        for name in names:
            files.pop(name, None)
        _write_manifest(self.path, files)
        for name in names:
            (self.path / name).unlink(missing_ok=True)


__all__ = ["CHECKPOINTS", "CONFIG", "LOCK", "MANIFEST", "RunFolder", "RunLock", "check_beside_manifest",
           "check_out_dir", "clear_run", "read_manifest", "verify_file", "verify_run"]
