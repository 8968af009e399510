"""Packed integer checkpoints: b-bit weights bit-packed, everything else exact; no pickle on load.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"PQPACK\\r\\n"
    8       2     format version (1)
    10      2     flags (0, reserved)
    12      4     CRC-32 of everything after the header (record + data)
    16      8     length R of the record (zlib-compressed UTF-8 JSON)
    24      8     length D of the data section
    32      R     record
    32+R    D     data: the tensors listed in the record, back to back in that order, no padding

The 32-byte header is the fixed overhead (:data:`HEADER_BYTES`). The record holds the model class,
the ``instrument()`` options, the pruning record (per site: original channels, kept channels and,
for a masked model, which ones), whether the model was shrunk, every 0-d buffer (flags, counters)
and, for each stored tensor, its state-dict key, kind, dtype and shape (offsets and lengths follow).

Tensor kinds in the data section:

* ``packed``: a quantized weight, stored as its integer codes ``q`` in exactly ``bits`` bits each
  (offset binary ``q - qmin``, least significant bit first, ``numpy.packbits(bitorder="little")``),
  one byte-aligned run per layer; the layer's quantization scales follow as ``wscale`` (float32,
  one per output channel, or one per tensor);
* ``abounds``: an activation quantizer's running-mean bounds ``(lb, ub)`` as two float64;
* ``raw``: any other tensor (biases, norm parameters and statistics, float layers' weights), in
  its own dtype (float32 normally).

Not stored: mask importance statistics (``ChannelMask.stat_sum``), which inference never reads.

Loading rebuilds the instrumented model from a factory (or a base model): instrument with the
recorded options, set the masks, :func:`prunequant.graph.shrink` when the saved model was shrunk,
then fill every tensor: weights become ``q * scale`` and each weight quantizer's statistics are set
so that its scale is the stored float32 value, which makes the outputs bit-identical.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..graph.discover import LAYER_TYPES, instrument, weight_quantizer
from ..prune.mask import ChannelMask
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..utils import atomic_write
from ._checks import ExportError, check_exportable, shrink_available

MAGIC = b"PQPACK\r\n"
VERSION = 1
HEADER = struct.Struct("<8sHHIQQ")
#: Fixed size of the binary header in bytes (the only model-independent overhead).
HEADER_BYTES = HEADER.size  # 32

_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),  # stored as its 16-bit pattern
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("u1")),
}
_BY_TORCH = {t: k for k, (t, _) in _DTYPES.items()}
_KINDS = ("packed", "wscale", "abounds", "raw")


class PackedFormatError(ExportError):
    """A packed checkpoint that is damaged, truncated or not in this format."""


# ---------------------------------------------------------------------------------------- bits
def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> bytes:
    """Pack integer ``codes`` (in ``[qmin, qmin + 2**bits - 1]``) into ``ceil(n * bits / 8)`` bytes."""
    u = (np.asarray(codes, dtype=np.int64).ravel() - qmin).astype(np.uint32)
    if u.size and int(u.max()) >= 2**bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    if bits == 8:
        return u.astype(np.uint8).tobytes()
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_codes(buf: bytes, n: int, bits: int, qmin: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n`` integers as int64."""
    if len(buf) != packed_nbytes(n, bits):
        raise PackedFormatError(f"packed run has {len(buf)} bytes, expected {packed_nbytes(n, bits)}")
    raw = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        return raw.astype(np.int64) + qmin
    planes = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1) + qmin


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` values at ``bits`` bits, rounded up to a whole byte."""
    return (int(n) * int(bits) + 7) // 8


# ---------------------------------------------------------------------------------------- save
@dataclass
class _Entry:
    key: str
    kind: str
    dtype: str
    shape: list[int]
    data: bytes
    bits: int | None = None
    qmin: int | None = None


def _raw_entry(key: str, t: torch.Tensor) -> _Entry:
    t = t.detach().cpu().contiguous()
    if t.dtype not in _BY_TORCH:
        raise ExportError(f"save_packed: tensor {key} has dtype {t.dtype}, which the format does not store")
    name = _BY_TORCH[t.dtype]
    if name == "bfloat16":
        arr = t.view(torch.int16).numpy()
    elif name == "bool":
        arr = t.to(torch.uint8).numpy()
    else:
        arr = t.numpy()
    return _Entry(key, "raw", name, list(t.shape), arr.astype(_DTYPES[name][1], copy=False).tobytes())


def _scalar(t: torch.Tensor) -> dict[str, Any]:
    name = _BY_TORCH.get(t.dtype)
    if name is None:
        raise ExportError(f"save_packed: a 0-d buffer of dtype {t.dtype} cannot be stored")
    v = t.item()
    return {"dtype": name, "value": bool(v) if name == "bool" else v}


def _site_records(gm: fx.GraphModule) -> list[dict[str, Any]]:
    plan = gm.pq_plan
    out = []
    for s in plan.sites:
        m = gm.get_submodule(s.mask)
        keep = (m.mask.detach().cpu() != 0).numpy()
        channels = int(s.channels)
        if getattr(plan, "shrunk", False):
            kept_idx = getattr(s, "kept", None)  # original indices of the kept channels, if recorded
            channels = int(getattr(s, "original_channels", 0) or s.channels)
            keep = np.zeros(channels, dtype=bool)
            if kept_idx is not None:
                keep[np.asarray(list(kept_idx), dtype=np.int64)] = True
            else:
                keep = None
        rec: dict[str, Any] = {"name": s.name, "channels": channels, "kept": int(m.kept)}
        if keep is not None:
            rec["keep_bits"] = np.packbits(keep.astype(np.uint8), bitorder="little").tobytes().hex()
        out.append(rec)
    return out


def _options(gm: fx.GraphModule) -> dict[str, Any]:
    """The ``instrument()`` arguments: ``plan.options`` when recorded, else derived from the plan."""
    plan = gm.pq_plan
    opts = getattr(plan, "options", None)
    if opts:
        return _jsonable(opts)
    masks = [m for m in gm.modules() if isinstance(m, ChannelMask)]
    wqs = [m for m in gm.modules() if isinstance(m, WeightQuantizer)]
    return {
        "prune_stat": masks[0].stat if masks else None,
        "exclude": sorted(k for k, v in plan.skipped.items() if v == "excluded by pattern"),
        "weight_bits": None, "act_bits": None,
        "power_of_two": bool(wqs and wqs[0].power_of_two),
        "layer_bits": {n: {"weight_bits": i.weight_bits, "act_bits": i.act_bits}
                       for n, i in plan.layers.items()},
    }


def _signature(plan: Any) -> dict[str, Any]:
    """Structure of a plan that shrinking does not change (compared when loading)."""
    return {
        "sites": [[s.name, s.producer, sorted(s.consumers), sorted(s.tied)] for s in plan.sites],
        "layers": {n: [i.kind, i.input_site, i.output_site, len(getattr(i, "input_taps", []) or [])]
                   for n, i in plan.layers.items()},
    }


def _needs_shapes(plan: Any) -> bool:
    """True when re-discovering the plan needs an example input (views, concatenations, splits)."""
    if getattr(plan, "rewrites", None):
        return True
    for info in plan.layers.values():
        taps = getattr(info, "input_taps", []) or []
        if len(taps) > 1 or any(t.num != 1 or t.den != 1 or t.offset != 0 for t in taps):
            return True
    return False


def _records_and_entries(gm: fx.GraphModule) -> tuple[dict[str, Any], list[_Entry]]:
    state = gm.state_dict()
    handled: set[str] = set()
    entries: list[_Entry] = []
    scalars: dict[str, Any] = {}
    overrides: list[str] = []
    modules = dict(gm.named_modules())
    for name, m in modules.items():
        prefix = f"{name}." if name else ""
        if isinstance(m, LAYER_TYPES):
            wq = weight_quantizer(m)
            if wq is None or not bool(wq.enabled):
                continue
            pw = f"{prefix}parametrizations.weight"
            w = m.parametrizations["weight"].original.detach().to(torch.float32).cpu()
            codes = wq.int_codes(w).numpy()
            scale = wq.scale(w).cpu().numpy().astype("<f4")
            entries.append(_Entry(f"{pw}.original", "packed", f"int{wq.bits}", list(codes.shape),
                                  pack_codes(codes, wq.bits, wq.qmin), wq.bits, wq.qmin))
            entries.append(_Entry(f"{pw}.0.stat_sum", "wscale", "float32", list(scale.shape),
                                  scale.tobytes()))
            handled.update({f"{pw}.original", f"{pw}.0.stat_sum", f"{pw}.0.stat_count"})
            overrides.append(f"{pw}.0")
        elif isinstance(m, ActQuantizer) and float(m.stat_count) > 0:
            lb = float(m.min_sum / m.stat_count)
            ub = float(m.max_sum / m.stat_count)
            entries.append(_Entry(f"{prefix}min_sum", "abounds", "float64", [2],
                                  np.array([lb, ub], dtype="<f8").tobytes()))
            handled.update({f"{prefix}min_sum", f"{prefix}max_sum", f"{prefix}stat_count"})
            overrides.append(name)
        elif isinstance(m, ChannelMask):
            handled.update({f"{prefix}mask", f"{prefix}stat_sum"})  # mask: in the site record
    quant: dict[str, Any] = {}
    for name, m in modules.items():
        if isinstance(m, WeightQuantizer):
            quant[name] = {"bits": m.bits, "power_of_two": m.power_of_two, "axis": m.axis,
                           "per_channel": m.per_channel}
        elif isinstance(m, ActQuantizer):
            quant[name] = {"bits": m.bits}
    for key, t in state.items():
        if key in handled:
            continue
        if t.dim() == 0:
            scalars[key] = _scalar(t)
        else:
            entries.append(_raw_entry(key, t))
    plan = gm.pq_plan
    record = {
        "format": "prunequant-packed",
        "version": VERSION,
        "model_class": getattr(gm, "pq_original_class", type(gm).__name__),
        "options": _options(gm),
        "plan": _signature(plan),
        "shrunk": bool(getattr(plan, "shrunk", False)),
        "sites": _site_records(gm),
        "rewrites": {k: list(v.sizes) for k, v in (getattr(plan, "rewrites", {}) or {}).items()},
        "has_pq_step": "pq_step" in state,
        "scalars": scalars,
        "stats_from_record": overrides,
        "quantizers": quant,
    }
    return record, entries


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise ExportError(f"save_packed: instrument options are not JSON-serializable ({e})") from e


def encode_packed(model: nn.Module, *, allow_masked: bool = False,
                  example_input: torch.Tensor | None = None) -> bytes:
    """The bytes :func:`save_packed` writes."""
    check_exportable(model, allow_masked=allow_masked, what="save_packed")
    if not isinstance(model, fx.GraphModule) or getattr(model, "pq_plan", None) is None:
        raise ExportError("save_packed needs a model instrumented by prunequant (Compressor.model or the "
                          "model Compressor.finalize() returns, optionally shrunk)")
    record, entries = _records_and_entries(model)
    if example_input is not None:
        record["example_input_shape"] = [int(s) for s in example_input.shape]
    elif _needs_shapes(model.pq_plan):
        raise ExportError("save_packed: this model's pruning plan follows channels through views / "
                          "concatenations / splits, which needs tensor shapes to rebuild: pass "
                          "example_input=<a batch shaped like the model's input> (the one given to the "
                          "Compressor)")
    data = io.BytesIO()
    table = []
    for e in entries:  # offsets and lengths follow from the order, dtypes and shapes
        d: dict[str, Any] = {"key": e.key, "kind": e.kind, "dtype": e.dtype, "shape": e.shape}
        if e.bits is not None:
            d.update(bits=e.bits, qmin=e.qmin)
        if _nbytes(d) != len(e.data):  # pragma: no cover - internal consistency
            raise AssertionError(f"{e.key}: {len(e.data)} bytes, table says {_nbytes(d)}")
        table.append(d)
        data.write(e.data)
    record["tensors"] = table
    rec = zlib.compress(json.dumps(record, separators=(",", ":")).encode("utf-8"), 9)
    body = rec + data.getvalue()
    header = HEADER.pack(MAGIC, VERSION, 0, zlib.crc32(body) & 0xFFFFFFFF, len(rec), len(data.getvalue()))
    return header + body


def save_packed(model: nn.Module, path: str | Path, *, allow_masked: bool = False,
                example_input: torch.Tensor | None = None) -> Path:
    """Write ``model`` (quantized, finalized, shrunk) as a packed integer checkpoint; atomic.

    Args:
        model: the model ``Compressor.finalize()`` returned (after :func:`prunequant.graph.shrink`
            when available; a masked model is refused then unless ``allow_masked``).
        path: destination file (conventionally ``*.pqpack``).
        allow_masked: store a masked model as is (pruned channels are stored as zeros, so the file
            is larger than the pruned weight memory).
        example_input: needed only if the model was instrumented with an example input (models
            whose sites go through concatenations / splits); its shape is recorded for loading.
    """
    blob = encode_packed(model, allow_masked=allow_masked, example_input=example_input)
    return atomic_write(path, lambda p: p.write_bytes(blob))


# ---------------------------------------------------------------------------------------- load
def read_packed(path_or_bytes: str | Path | bytes) -> tuple[dict[str, Any], memoryview]:
    """Validate a packed file and return ``(record, data)``; never unpickles anything."""
    blob = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    if len(blob) < HEADER_BYTES:
        raise PackedFormatError("not a prunequant packed checkpoint (file shorter than the header)")
    magic, version, _flags, crc, rlen, dlen = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise PackedFormatError("not a prunequant packed checkpoint (bad magic bytes)")
    if version != VERSION:
        raise PackedFormatError(f"packed checkpoint version {version} is not supported (this prunequant "
                                f"reads version {VERSION})")
    if HEADER_BYTES + rlen + dlen != len(blob):
        raise PackedFormatError(f"packed checkpoint is truncated or has trailing bytes ({len(blob)} bytes, "
                                f"header says {HEADER_BYTES + rlen + dlen})")
    body = memoryview(blob)[HEADER_BYTES:]
    if zlib.crc32(body) & 0xFFFFFFFF != crc:
        raise PackedFormatError("packed checkpoint is corrupted (CRC-32 mismatch)")
    try:
        record = json.loads(zlib.decompress(bytes(body[:rlen])).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackedFormatError(f"packed checkpoint record is unreadable ({e})") from e
    if not isinstance(record, dict) or record.get("format") != "prunequant-packed":
        raise PackedFormatError("packed checkpoint record is not a prunequant record")
    data = body[rlen:]
    offset = 0
    try:
        for t in record["tensors"]:
            if t["kind"] not in _KINDS:
                raise PackedFormatError(f"tensor {t['key']} has unknown kind {t['kind']!r}")
            if t["kind"] != "packed" and t["dtype"] not in _DTYPES:
                raise PackedFormatError(f"tensor {t['key']} has unsupported dtype {t['dtype']!r}")
            if t["kind"] == "packed" and not (isinstance(t["bits"], int) and 1 <= t["bits"] <= 32):
                raise PackedFormatError(f"tensor {t['key']} has an invalid bit-width {t['bits']!r}")
            if any(not isinstance(d, int) or d < 0 for d in t["shape"]):
                raise PackedFormatError(f"tensor {t['key']} has an invalid shape {t['shape']!r}")
            t["offset"], t["nbytes"] = offset, _nbytes(t)
            offset += t["nbytes"]
    except (KeyError, TypeError) as e:
        raise PackedFormatError(f"packed checkpoint tensor table is malformed ({e!r})") from e
    if offset != len(data):
        raise PackedFormatError(f"packed checkpoint data section has {len(data)} bytes, the tensor table "
                                f"describes {offset}")
    return record, data


def _nbytes(t: dict[str, Any]) -> int:
    n = int(np.prod(t["shape"])) if t["shape"] else 1
    if t["kind"] == "packed":
        return packed_nbytes(n, int(t["bits"]))
    return n * _DTYPES[t["dtype"]][1].itemsize


def _tensor(t: dict[str, Any], data: memoryview) -> torch.Tensor:
    buf = bytes(data[t["offset"]: t["offset"] + t["nbytes"]])
    shape = [int(s) for s in t["shape"]]
    n = int(np.prod(shape)) if shape else 1
    if t["kind"] == "packed":
        return torch.from_numpy(unpack_codes(buf, n, int(t["bits"]), int(t["qmin"])).reshape(shape))
    tdt, ndt = _DTYPES[t["dtype"]]
    if n * ndt.itemsize != len(buf):
        raise PackedFormatError(f"tensor {t['key']}: {len(buf)} bytes for shape {shape} {t['dtype']}")
    arr = np.frombuffer(buf, dtype=ndt).reshape(shape).copy()
    x = torch.from_numpy(arr)
    if t["dtype"] == "bfloat16":
        return x.view(torch.bfloat16)
    if t["dtype"] == "bool":
        return x.to(torch.bool)
    return x.to(tdt)


def _synthetic_mask(channels: int, kept: int, block: int, parts: int) -> torch.Tensor:
    """A structurally valid 0/1 mask keeping ``kept`` channels (first ones of each partition)."""
    parts = max(1, parts)
    per = channels // parts
    keep_per = kept // parts
    m = torch.zeros(channels)
    for p in range(parts):
        m[p * per: p * per + keep_per] = 1.0
    del block  # kept channels per partition are whole blocks already (kept // parts is a multiple)
    return m


def _rebuild(base: nn.Module, record: dict[str, Any]) -> fx.GraphModule:
    opts = dict(record.get("options") or {})
    shape = record.get("example_input_shape")
    kwargs: dict[str, Any] = dict(opts)
    if shape is not None:
        kwargs["example_input"] = torch.zeros(shape)
    try:
        gm, plan = instrument(base, **kwargs)
    except TypeError as e:
        raise ExportError(f"load_packed: cannot re-instrument the model with the recorded options {opts} "
                          f"({e})") from e
    if record.get("has_pq_step"):
        gm.register_buffer("pq_step", torch.zeros((), dtype=torch.int64))
    saved = {s["name"]: s for s in record.get("sites", [])}
    sig = _signature(plan)
    if sig != record.get("plan", sig) or sorted(s.name for s in plan.sites) != sorted(saved):
        diff = sorted(set(sig["layers"]) ^ set(record.get("plan", sig)["layers"]))[:5]
        raise ExportError("load_packed: the model given is not the architecture that was saved (its layers "
                          f"or prunable sites differ{': ' + str(diff) if diff else ''}). Pass a model built "
                          "with the same constructor arguments as the one that was compressed")
    shrunk = bool(record.get("shrunk"))
    with torch.no_grad():
        for s in plan.sites:
            rec = saved[s.name]
            cm = gm.get_submodule(s.mask)
            if int(rec.get("channels", s.channels)) != s.channels:
                raise ExportError(f"load_packed: site {s.name} has {s.channels} channels in the model given, "
                                  f"{rec['channels']} in the checkpoint; different architecture?")
            if "keep_bits" in rec:
                bits = np.unpackbits(np.frombuffer(bytes.fromhex(rec["keep_bits"]), np.uint8),
                                     count=s.channels, bitorder="little")
                if int(bits.sum()) != int(rec["kept"]):
                    raise PackedFormatError(f"site {s.name}: the kept-channel record is inconsistent")
                cm.mask.copy_(torch.from_numpy(bits.astype(np.float32)))
            elif shrunk:
                if not 0 < rec["kept"] <= s.channels:
                    raise PackedFormatError(f"site {s.name}: kept {rec['kept']} of {s.channels} channels")
                cm.mask.copy_(_synthetic_mask(s.channels, int(rec["kept"]), s.block, s.parts))
            cm.frozen.fill_(True)
            cm.collecting.fill_(False)
    if shrunk:
        if not shrink_available():
            raise ExportError("load_packed: the checkpoint holds a shrunk model but prunequant.graph.shrink "
                              "is not available in this installation")
        from ..graph import shrink

        gm = shrink(gm, inplace=True)
        got = {k: list(v.sizes) for k, v in (getattr(gm.pq_plan, "rewrites", {}) or {}).items()}
        if got != record.get("rewrites", {}):
            raise ExportError("load_packed: rebuilding the shrunk graph gave different split / slice sizes "
                              f"({got} vs {record.get('rewrites')})")
    return gm


def load_packed(path: str | Path, model: nn.Module | Callable[[], nn.Module],
                map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild the compressed model saved by :func:`save_packed`; outputs are bit-identical.

    Args:
        path: the packed file.
        model: the *uncompressed* architecture: a model instance (deep-copied, its weights are
            irrelevant) or a zero-argument factory returning one, built with the same constructor
            arguments as the model that was compressed.
        map_location: device of the returned model.

    Returns:
        The instrumented (and, if it was, shrunk) ``GraphModule`` in eval mode with the saved masks,
        quantizer calibration, weights, biases and norm statistics.
    """
    record, data = read_packed(path)
    base = model() if callable(model) and not isinstance(model, nn.Module) else copy.deepcopy(model)
    if not isinstance(base, nn.Module):
        raise ExportError("load_packed: `model` must be an nn.Module or a factory returning one")
    if isinstance(base, fx.GraphModule) and getattr(base, "pq_plan", None) is not None:
        raise ExportError("load_packed: pass the uncompressed architecture (e.g. build_model(...)), not an "
                          "instrumented model")
    want = record.get("model_class")
    if want and type(base).__name__ != want:
        raise ExportError(f"load_packed: the checkpoint holds a {want}, got a {type(base).__name__}")
    gm = _rebuild(base, record)
    modules = dict(gm.named_modules())
    saved_q = record.get("quantizers", {})
    have_q = {n for n, m in modules.items() if isinstance(m, (WeightQuantizer, ActQuantizer))}
    if set(saved_q) != have_q:
        raise ExportError("load_packed: the rebuilt model has different quantizers than the saved one "
                          f"({sorted(set(saved_q) ^ have_q)[:4]}); different architecture or options?")
    for name, q in saved_q.items():  # bit-widths as saved (they may differ from the recipe's)
        m = modules[name]
        m.bits = int(q["bits"])
        if isinstance(m, WeightQuantizer):
            if bool(q["per_channel"]) != m.per_channel or int(q["axis"]) != m.axis:
                raise ExportError(f"load_packed: weight quantizer {name} differs in granularity")
            m.power_of_two = bool(q["power_of_two"])
    state = gm.state_dict()
    new: dict[str, torch.Tensor] = {}
    tensors = {t["key"]: t for t in record["tensors"]}
    for key, t in tensors.items():
        if key not in state:
            raise ExportError(f"load_packed: the rebuilt model has no tensor {key}; different architecture?")
        x = _tensor(t, data)
        if t["kind"] == "abounds":
            continue
        if t["kind"] == "wscale":
            continue
        if list(x.shape) != list(state[key].shape):
            raise ExportError(f"load_packed: {key} has shape {list(x.shape)} in the file but "
                              f"{list(state[key].shape)} in the rebuilt model; different architecture?")
        new[key] = x
    for key, sc in record.get("scalars", {}).items():
        if key in state:
            new[key] = torch.tensor(sc["value"], dtype=_DTYPES[sc["dtype"]][0])
    with torch.no_grad():
        for name in record.get("stats_from_record", []):
            m = modules.get(name)
            prefix = f"{name}." if name else ""
            if isinstance(m, WeightQuantizer):
                layer = name.rsplit(".parametrizations.weight.0", 1)[0]
                s = _tensor(tensors[f"{prefix}stat_sum"], data)
                codes = new[f"{layer}.parametrizations.weight.original"]
                sb = m._broadcast(s, codes)
                new[f"{layer}.parametrizations.weight.original"] = codes.to(torch.float32) * sb
                new[f"{prefix}stat_sum"] = s.to(torch.float64)
                new[f"{prefix}stat_count"] = torch.ones((), dtype=torch.float64)
            elif isinstance(m, ActQuantizer):
                lb, ub = _tensor(tensors[f"{prefix}min_sum"], data).tolist()
                new[f"{prefix}min_sum"] = torch.tensor(lb, dtype=torch.float64)
                new[f"{prefix}max_sum"] = torch.tensor(ub, dtype=torch.float64)
                new[f"{prefix}stat_count"] = torch.ones((), dtype=torch.float64)
            else:
                raise ExportError(f"load_packed: {name} is not a quantizer in the rebuilt model")
    for key, v in state.items():
        if key not in new:
            new[key] = v  # not stored: mask statistics (and nothing else)
    gm.load_state_dict(new, strict=True)
    gm.eval()
    return gm.to(map_location)


def packed_size_report(path_or_bytes: str | Path | bytes) -> dict[str, int]:
    """Bytes of a packed file by part: header, record, packed weights, scales, other tensors."""
    blob = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    record, data = read_packed(blob)
    rep = {"header": HEADER_BYTES, "record": len(blob) - HEADER_BYTES - len(data), "packed_weights": 0,
           "weight_scales": 0, "activation_params": 0, "other_tensors": 0}
    kind_to = {"packed": "packed_weights", "wscale": "weight_scales", "abounds": "activation_params",
               "raw": "other_tensors"}
    for t in record["tensors"]:
        rep[kind_to[t["kind"]]] += int(t["nbytes"])
    rep["total"] = len(blob)
    return rep


__all__ = [
    "HEADER_BYTES", "PackedFormatError", "encode_packed", "load_packed", "pack_codes", "packed_nbytes",
    "packed_size_report", "read_packed", "save_packed", "unpack_codes",
]
