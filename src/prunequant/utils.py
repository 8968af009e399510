"""Small shared helpers: atomic file writes that honour the umask, checksums, safe tensor loading."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no race-free way elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every OS / filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` in eval mode, then give every module its own mode back (``model.train(was)``
    would put a user's frozen BatchNorm back in train mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place.

    A crash or an error leaves any previous file at ``path`` untouched and no temporary file
    behind. The file gets the mode ``open()`` would give a new file (``0o666`` minus the umask),
    not ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: dict[str, torch.Tensor], path: str | Path) -> Path:
    """``torch.save`` a dict of tensors atomically (load it back with :func:`load_tensor_file`)."""
    return atomic_write(path, lambda p: torch.save(obj, p))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensor_file(path: str | Path, error: type[Exception], what: str) -> dict[str, torch.Tensor]:
    """Load a ``{name: tensor}`` file written by ``torch.save`` without unpickling any object.

    ``torch.load(weights_only=True)`` refuses anything but tensors and plain containers; every way
    the file can be wrong (missing, a folder, truncated, not a torch file, Python objects inside,
    not a flat dict of tensors) raises ``error`` with one message that starts with ``what`` (the
    field or file the user gave) and says what is expected.
    """
    p = Path(path)
    if not p.exists():
        near = difflib.get_close_matches(p.name, [q.name for q in p.parent.glob("*.pt")], n=1) \
            if p.parent.is_dir() else []
        hint = f"; did you mean {p.parent / near[0]}?" if near else ""
        raise error(f"{what}: file not found: {p}{hint}")
    if not p.is_file():
        hint = f"; did you mean {p / 'dense.pt'}?" if (p / "dense.pt").is_file() else ""
        raise error(f"{what}: {p} is not a file{hint}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip format, or its legacy pickle
        raise error(f"{what}: {p} is not a readable PyTorch tensor file (it does not start like one: "
                    f"{'the file is empty' if not head else 'other bytes'})")
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(p):
        raise error(f"{what}: {p} is not a readable PyTorch tensor file (truncated: its zip archive has no "
                    "end record)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            raise error(f"{what}: {p} is not a readable PyTorch tensor file (damaged pickle data)") from None
        raise error(f"{what}: {p} holds Python objects, not only tensors; refused without running "
                    "them (only state dicts written by torch.save / prunequant are loaded)") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: torch's parsers fail in many ways
        detail = (str(e).splitlines() or ["no detail"])[0].split(". ")[0][:120]
        raise error(f"{what}: {p} is not a readable PyTorch tensor file (truncated or corrupted: "
                    f"{type(e).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise error(f"{what}: {p} is not a state dict (expected a {{name: tensor}} dict, got "
                    f"{type(state).__name__})")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise error(f"{what}: {p} is not a state dict: {len(bad)} entries are not named tensors "
                    f"(e.g. {bad[0]!r})")
    return state
