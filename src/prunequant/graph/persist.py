"""Save a pruned (shrunk) model as weights + a small JSON pruning record; rebuild it from model code.

Layout of ``path`` (a directory):

* ``weights.pt``: the shrunk model's ``state_dict`` as a plain ``{name: tensor}`` dict written with
  ``torch.save``; it is read back with ``torch.load(weights_only=True)``, which refuses anything but
  tensors and plain containers, so loading never unpickles arbitrary objects.
* ``pruning.json``: format version, the arguments :func:`~prunequant.graph.instrument` was called
  with (so the same masks and quantizers can be re-inserted), per site the original channel count
  and the indices of the kept channels, per layer the weight / input bit-widths, and the SHA-256 of
  the weights file.

Both files are written to a temporary name in the same directory and moved into place with
``os.replace``, the record last, so a reader never sees a half-written pair.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..utils import atomic_write
from .discover import GraphError, instrument
from .shrink import shrink

FORMAT = "prunequant-pruned"
VERSION = 1
WEIGHTS = "weights.pt"
RECORD = "pruning.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_pruned(model: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``model`` (shrunk, or masked: it is then shrunk first) to the directory ``path``.

    Returns the directory. The model must come from :func:`~prunequant.graph.instrument` (e.g.
    ``Compressor.finalize()``), so that the record can name how to rebuild it.
    """
    plan = getattr(model, "pq_plan", None)
    if plan is None:
        raise GraphError("save_pruned() needs a model instrumented by prunequant (with pq_plan)")
    if not plan.shrunk:
        model = shrink(model)
        plan = model.pq_plan
    if not plan.options:
        raise GraphError("this model's plan does not record how it was instrumented; cannot save it")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: torch.save(state, p))
    record: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": getattr(model, "pq_original_class", None),
        "instrument": plan.options,
        "sites": {
            s.name: {"channels": s.original_channels or s.channels,
                     "kept": list(s.kept) if s.kept is not None else list(range(s.channels))}
            for s in plan.sites
        },
        "bits": {n: {"weight_bits": i.weight_bits, "act_bits": i.act_bits} for n, i in plan.layers.items()},
        "weights": WEIGHTS,
        "sha256": _sha256(out / WEIGHTS),
    }
    text = json.dumps(record, indent=1, sort_keys=True).encode()
    atomic_write(out / RECORD, lambda p: p.write_bytes(text))
    return out


def load_pruned(
    base_model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor
) -> fx.GraphModule:
    """Rebuild a model saved by :func:`save_pruned` from a fresh instance of its original class.

    ``base_model`` is re-instrumented with the recorded arguments (its own modules are reused, so
    pass a fresh instance), the recorded channels are kept, the model is shrunk and the saved
    weights and quantizer statistics are loaded (``strict``). Raises :class:`GraphError` when the
    record does not fit the model (other architecture, other channel counts, edited weights file).
    """
    src = Path(path)
    try:
        record = json.loads((src / RECORD).read_text())
    except FileNotFoundError:
        raise GraphError(f"{src}: no {RECORD}; not a directory written by save_pruned()") from None
    except json.JSONDecodeError as e:
        raise GraphError(f"{src / RECORD}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise GraphError(f"{src / RECORD}: not a prunequant pruning record")
    if record.get("version") != VERSION:
        raise GraphError(f"{src / RECORD}: unsupported version {record.get('version')!r} "
                         f"(expected {VERSION})")
    weights = src / str(record.get("weights", WEIGHTS))
    if weights.parent != src:
        raise GraphError(f"{src / RECORD}: the weights file must be in the same directory")
    if _sha256(weights) != record.get("sha256"):
        raise GraphError(f"{weights}: checksum differs from the pruning record (file changed or truncated)")
    opts = dict(record["instrument"])
    gm, plan = instrument(base_model, example_input=example_input, **opts)
    sites = record["sites"]
    names = {s.name for s in plan.sites}
    if names != set(sites):
        missing, extra = sorted(set(sites) - names), sorted(names - set(sites))
        raise GraphError(f"the model does not match the record: sites only in the record {missing}, "
                         f"only in the model {extra}")
    with torch.no_grad():
        for s in plan.sites:
            r = sites[s.name]
            if int(r["channels"]) != s.channels:
                raise GraphError(f"site '{s.name}': the record has {r['channels']} channels, the model "
                                 f"{s.channels}")
            kept = [int(i) for i in r["kept"]]
            if not kept or min(kept) < 0 or max(kept) >= s.channels or len(set(kept)) != len(kept):
                raise GraphError(f"site '{s.name}': invalid kept channel indices in the record")
            mask = gm.get_submodule(s.mask)
            mask.mask.zero_()
            mask.mask[torch.tensor(kept)] = 1.0
            mask.frozen.fill_(True)
    small = shrink(gm, inplace=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise GraphError(f"{weights}: expected a flat dict of tensors")
    if "pq_step" in state and "pq_step" not in dict(small.named_buffers()):
        small.register_buffer("pq_step", torch.zeros((), dtype=torch.int64))
    try:
        small.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GraphError(f"{weights}: weights do not fit the rebuilt model: {e}") from None
    small.eval()
    return small


__all__ = ["load_pruned", "save_pruned"]
