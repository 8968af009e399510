"""Save a pruned (shrunk) model as weights + a small JSON pruning record; rebuild it from model code.

Layout of ``path`` (a directory):

* ``weights.pt``: the shrunk model's ``state_dict`` as a plain ``{name: tensor}`` dict written with
  ``torch.save``; it is read back with ``torch.load(weights_only=True)``, which refuses anything but
  tensors and plain containers, so loading never unpickles arbitrary objects.
* ``pruning.json``: format version, the arguments :func:`~prunequant.graph.instrument` was called
  with (so the same masks and quantizers can be re-inserted), per site the original channel count
  and the indices of the kept channels, per layer the weight / input bit-widths, the SHA-256 of
  the weights file (``sha256``) and the SHA-256 of the record itself (``record_sha256``: of the
  record's canonical JSON, ``sort_keys`` and no spaces, without that field).

Loading checks both digests before anything else, so an edited record (say, ``weight_bits`` 4 ->
8, which would rebuild another model) or a truncated weights file is refused with a message naming
the file. The digests catch damage and accidental edits; they are not a signature (someone who
edits the record on purpose can recompute them, and then the structural checks below still
apply). Version 1 records had no record digest and are refused (re-save the model).

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

from ..errors import GraphError
from ..utils import atomic_write, load_tensor_file, sha256_file
from .instrument import instrument
from .shrink import shrink

FORMAT = "prunequant-pruned"
VERSION = 2
WEIGHTS = "weights.pt"
RECORD = "pruning.json"
DIGEST = "record_sha256"


def record_digest(record: dict[str, Any]) -> str:
    """SHA-256 of a pruning record's canonical JSON, leaving out its own ``record_sha256`` field."""
    body = {k: v for k, v in record.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
        "sha256": sha256_file(out / WEIGHTS),
    }
    record[DIGEST] = record_digest(record)
    text = json.dumps(record, indent=1, sort_keys=True).encode()
    atomic_write(out / RECORD, lambda p: p.write_bytes(text))
    return out


def load_pruned(
    base_model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor
) -> fx.GraphModule:
    """Rebuild a model saved by :func:`save_pruned` from a fresh instance of its original class.

    ``base_model`` is re-instrumented with the recorded arguments (its own modules are reused, so
    pass a fresh instance), the recorded channels are kept, the model is shrunk and the saved
    weights and quantizer statistics are loaded (``strict``). Raises :class:`GraphError`, with a
    message naming the file, when a file is missing, truncated, edited (either checksum differs),
    holds Python objects instead of tensors, or does not fit the model (other architecture, other
    channel counts).
    """
    src = Path(path)
    record, weights = _read_record(src)
    opts = dict(record["instrument"])
    try:
        gm, plan = instrument(base_model, example_input=example_input, **opts)
    except (TypeError, ValueError) as e:
        if isinstance(e, GraphError):
            raise
        raise GraphError(f"{src / RECORD}: 'instrument' holds options this prunequant does not accept "
                         f"({e})") from None
    sites = record["sites"]
    names = {s.name for s in plan.sites}
    if names != set(sites):
        missing, extra = sorted(set(sites) - names), sorted(names - set(sites))
        raise GraphError(f"{src / RECORD}: the model does not match the record (another architecture or "
                         f"width?): sites only in the record {missing}, only in the model {extra}")
    with torch.no_grad():
        for s in plan.sites:
            r = sites[s.name]
            if r["channels"] != s.channels:
                raise GraphError(f"site '{s.name}': the record has {r['channels']} channels, the model "
                                 f"{s.channels}")
            kept = r["kept"]
            if not kept or min(kept) < 0 or max(kept) >= s.channels or len(set(kept)) != len(kept):
                raise GraphError(f"site '{s.name}': invalid kept channel indices in the record")
            mask = gm.get_submodule(s.mask)
            mask.mask.zero_()
            mask.mask[torch.tensor(kept)] = 1.0
            mask.frozen.fill_(True)
    small = shrink(gm, inplace=True)
    state = load_tensor_file(weights, GraphError, "pruned model weights")
    if "pq_step" in state and "pq_step" not in dict(small.named_buffers()):
        small.register_buffer("pq_step", torch.zeros((), dtype=torch.int64))
    try:
        small.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GraphError(f"{weights}: weights do not fit the rebuilt model: {e}") from None
    small.eval()
    return small


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_record(src: Path) -> tuple[dict[str, Any], Path]:
    """Read and check ``src/pruning.json``: format, version, both digests, field types.

    Returns the record and the weights file's path; every problem is a :class:`GraphError` that
    names the file.
    """
    rec_path = src / RECORD
    if not rec_path.is_file():
        raise GraphError(f"{src}: no {RECORD}; not a directory written by save_pruned()")
    try:
        record = json.loads(rec_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphError(f"{rec_path}: not valid JSON (truncated or damaged: {e})") from None
    except OSError as e:
        raise GraphError(f"{rec_path}: cannot be read ({e.strerror})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise GraphError(f"{rec_path}: not a prunequant pruning record")
    if record.get("version") != VERSION:
        raise GraphError(f"{rec_path}: unsupported version {record.get('version')!r} (this prunequant "
                         f"reads version {VERSION}; re-save the model with save_pruned or re-run)")
    if record.get(DIGEST) != record_digest(record):
        raise GraphError(f"{rec_path}: the record's content differs from its checksum ({DIGEST}): it "
                         "was edited or damaged after save_pruned wrote it; re-save the model (save_pruned) "
                         "or re-run `prunequant run`")
    name = record.get("weights", WEIGHTS)
    weights = src / str(name)
    if not isinstance(name, str) or weights.parent != src:
        raise GraphError(f"{rec_path}: the weights file must be in the same directory")
    if not weights.is_file():
        raise GraphError(f"{weights}: missing (named by {RECORD})")
    if sha256_file(weights) != record.get("sha256"):
        raise GraphError(f"{weights}: checksum differs from the pruning record (file changed or truncated)")
    # The digests make these hold for files save_pruned wrote; check them for hand-made records too.
    sites, bits = record.get("sites"), record.get("bits")
    ok = (isinstance(record.get("instrument"), dict) and isinstance(sites, dict) and isinstance(bits, dict)
          and all(isinstance(r, dict) and _is_int(r.get("channels")) and isinstance(r.get("kept"), list)
                  and all(_is_int(i) for i in r["kept"]) for r in sites.values()))
    if not ok:
        raise GraphError(f"{rec_path}: malformed record (expected 'instrument' options, and per site "
                         "'channels' and a list of 'kept' channel indices)")
    return record, weights


__all__ = ["load_pruned", "record_digest", "save_pruned"]
