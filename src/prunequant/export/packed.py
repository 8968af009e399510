"""Packed integer checkpoints: b-bit weights bit-packed, everything else exact; no pickle on load.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"PQPACK\\r\\n"
    8       2     format version (2; version 1 files are still read)
    10      2     flags (0, reserved)
    12      4     CRC-32 of everything after the header (record + data)
    16      8     length R of the record (zlib-compressed UTF-8 JSON)
    24      8     length D of the data section
    32      R     record
    32+R    D     data: the stored tensors back to back, in the model's state-dict order, no padding

The 32-byte header is the fixed overhead (:data:`HEADER_BYTES`). The record (0.4-2 kB
compressed) holds the model class, the ``instrument()`` options, a hash of the pruning plan's
structure, the pruning record (per site: original and kept channels and, for a masked model,
which ones), whether the model was shrunk, the folded BatchNorms, every quantizer's bit-width, the
values of all 0-d buffers, a hash of the state-dict keys and a layout string with one character
per state-dict entry saying what is stored for it (see ``_KIND_CHARS``). Shapes and dtypes are not
stored: they follow from the rebuilt model, which the hashes check.

What is stored per entry:

* a quantized weight: its integer codes ``q`` in exactly ``bits`` bits each (offset binary
  ``q - qmin``, least significant bit first, ``numpy.packbits(bitorder="little")``), one
  byte-aligned run per layer, then its scales as float32 (one per output channel or per tensor);
* an activation quantizer: its running-mean bounds ``(lb, ub)`` as two float64;
* a folded BatchNorm (``save_packed(..., fold_bn=True)``, :mod:`prunequant.export.fold`): one sign
  bit per channel and the folded bias as float32; its mean, variance and ``eps`` are 0, 1 and 0;
* any other tensor (biases, norm parameters and statistics, float layers' weights): raw, in its
  own dtype.

Not stored: mask importance statistics (``ChannelMask.stat_sum``), which inference never reads.

Loading rebuilds the instrumented model from a factory (or a base model): instrument with the
recorded options, set the masks, :func:`prunequant.graph.shrink` when the saved model was shrunk,
then fill every tensor: weights become ``q * scale`` and each weight quantizer's statistics are set
so that its scale is the stored float32 value, which makes the outputs bit-identical.
"""

from __future__ import annotations

import copy
import hashlib
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

from ..graph.instrument import instrument, weight_quantizer
from ..graph.ops import LAYER_TYPES
from ..prune.mask import ChannelMask
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..utils import atomic_write
from ._checks import ExportError, check_exportable, shrink_available
from .fold import fold_batchnorm, folded_pairs

MAGIC = b"PQPACK\r\n"
VERSION = 2
#: Versions load_packed reads.
READABLE_VERSIONS = (1, 2)
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
_KINDS = ("packed", "wscale", "abounds", "raw", "sign")


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


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# One character per state-dict entry (v2 layout): what is stored for it, in state-dict order.
#   P packed weight codes (bits from the quantizer)  S its weight scale (float32)
#   A activation bounds (2 x float64)  R raw tensor in its own dtype
#   0 a 0-d buffer (value in the record's scalar list)  G signs of a folded BatchNorm (1 bit each)
#   B a folded BatchNorm's bias (float32)  Z zeros (not stored)  - not stored (derived / unused)
_KIND_CHARS = "PSAR0GBZ-"


def _layout(gm: fx.GraphModule) -> tuple[str, list[Any], list[_Entry], list[int]]:
    """``(kinds, scalars, entries, quantizer bits)`` of the v2 layout for an instrumented model."""
    state = gm.state_dict()
    modules = dict(gm.named_modules())
    folded = list(getattr(gm, "pq_folded", []) or [])
    folded_convs = {conv for conv, _ in folded_pairs(gm)}
    kind: dict[str, str] = {}
    entries: list[_Entry] = []
    blobs: dict[str, _Entry] = {}
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
            blobs[f"{pw}.original"] = _Entry(f"{pw}.original", "packed", f"int{wq.bits}", list(codes.shape),
                                             pack_codes(codes, wq.bits, wq.qmin), wq.bits, wq.qmin)
            blobs[f"{pw}.0.stat_sum"] = _Entry(f"{pw}.0.stat_sum", "wscale", "float32", list(scale.shape),
                                               scale.tobytes())
            kind.update({f"{pw}.original": "P", f"{pw}.0.stat_sum": "S", f"{pw}.0.stat_count": "-"})
            if name in folded_convs and m.bias is not None:
                kind[f"{prefix}bias"] = "Z"
        elif isinstance(m, ActQuantizer) and float(m.stat_count) > 0:
            lb, ub = float(m.min_sum / m.stat_count), float(m.max_sum / m.stat_count)
            blobs[f"{prefix}min_sum"] = _Entry(f"{prefix}min_sum", "abounds", "float64", [2],
                                               np.array([lb, ub], dtype="<f8").tobytes())
            kind.update({f"{prefix}min_sum": "A", f"{prefix}max_sum": "-", f"{prefix}stat_count": "-"})
        elif isinstance(m, ChannelMask):
            kind.update({f"{prefix}mask": "-", f"{prefix}stat_sum": "-"})  # mask: in the site record
        elif name in folded:
            sign = (m.weight.detach().cpu() < 0).numpy().astype(np.uint8)
            bias = m.bias.detach().cpu().numpy().astype("<f4")
            blobs[f"{prefix}weight"] = _Entry(f"{prefix}weight", "sign", "bool", [int(sign.size)],
                                              np.packbits(sign, bitorder="little").tobytes())
            blobs[f"{prefix}bias"] = _Entry(f"{prefix}bias", "raw", "float32", list(bias.shape),
                                            bias.tobytes())
            kind.update({f"{prefix}weight": "G", f"{prefix}bias": "B", f"{prefix}running_mean": "-",
                         f"{prefix}running_var": "-"})
    kinds, scalars = [], []
    for key, t in state.items():
        k = kind.get(key)
        if k is None:
            k = "0" if t.dim() == 0 else "R"
        kinds.append(k)
        if k == "0":
            v = t.item()
            scalars.append(bool(v) if t.dtype == torch.bool else v)
        elif k == "R":
            entries.append(_raw_entry(key, t))
        elif k in "PSAGB":
            entries.append(blobs[key])
    bits = [int(m.bits) for m in modules.values() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    return "".join(kinds), scalars, entries, bits


def _record(gm: fx.GraphModule) -> tuple[dict[str, Any], list[_Entry]]:
    kinds, scalars, entries, bits = _layout(gm)
    state_keys = list(gm.state_dict().keys())
    plan = gm.pq_plan
    record = {
        "format": "prunequant-packed",
        "version": VERSION,
        "model_class": getattr(gm, "pq_original_class", type(gm).__name__),
        "options": _options(gm),
        "plan_sha": _sha(_signature(plan)),
        "shrunk": bool(getattr(plan, "shrunk", False)),
        "sites": [[r["channels"], r["kept"], r.get("keep_bits")] for r in _site_records(gm)],
        "rewrites": {k: list(v.sizes) for k, v in (getattr(plan, "rewrites", {}) or {}).items()},
        "has_pq_step": "pq_step" in state_keys,
        "folded": list(getattr(gm, "pq_folded", []) or []),
        "keys_sha": _sha(state_keys),
        "kinds": kinds,
        "scalars": scalars,
        "bits": bits,
        "power_of_two": sorted(n for n, m in gm.named_modules()
                               if isinstance(m, WeightQuantizer) and m.power_of_two),
    }
    return record, entries


def _entry_table(t: _Entry) -> dict[str, Any]:
    d: dict[str, Any] = {"key": t.key, "kind": t.kind, "dtype": t.dtype, "shape": t.shape}
    if t.bits is not None:
        d.update(bits=t.bits, qmin=t.qmin)
    return d


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise ExportError(f"save_packed: instrument options are not JSON-serializable ({e})") from e


def encode_packed(model: nn.Module, *, allow_masked: bool = False,
                  example_input: torch.Tensor | None = None, fold_bn: bool = False) -> bytes:
    """The bytes :func:`save_packed` writes."""
    check_exportable(model, allow_masked=allow_masked, what="save_packed")
    if not isinstance(model, fx.GraphModule) or getattr(model, "pq_plan", None) is None:
        raise ExportError("save_packed needs a model instrumented by prunequant (Compressor.model or the "
                          "model Compressor.finalize() returns, optionally shrunk)")
    if fold_bn:
        model = fold_batchnorm(model)
    record, entries = _record(model)
    sizes = {"packed_weights": 0, "weight_scales": 0, "activation_params": 0, "other_tensors": 0}
    kind_to = {"packed": "packed_weights", "wscale": "weight_scales", "abounds": "activation_params"}
    for e in entries:
        sizes[kind_to.get(e.kind, "other_tensors")] += len(e.data)
    record["sizes"] = sizes
    if example_input is not None:
        record["example_input_shape"] = [int(s) for s in example_input.shape]
    elif _needs_shapes(model.pq_plan):
        raise ExportError("save_packed: this model's pruning plan follows channels through views / "
                          "concatenations / splits, which needs tensor shapes to rebuild: pass "
                          "example_input=<a batch shaped like the model's input> (the one given to the "
                          "Compressor)")
    data = io.BytesIO()
    for e in entries:
        expect = _nbytes(_entry_table(e))
        if expect != len(e.data):  # pragma: no cover - internal consistency
            raise AssertionError(f"{e.key}: {len(e.data)} bytes, its shape and dtype say {expect}")
        data.write(e.data)
    rec = zlib.compress(json.dumps(record, separators=(",", ":")).encode("utf-8"), 9)
    body = rec + data.getvalue()
    header = HEADER.pack(MAGIC, VERSION, 0, zlib.crc32(body) & 0xFFFFFFFF, len(rec), len(data.getvalue()))
    return header + body


def save_packed(model: nn.Module, path: str | Path, *, allow_masked: bool = False,
                example_input: torch.Tensor | None = None, fold_bn: bool = False) -> Path:
    """Write ``model`` (quantized, finalized, shrunk) as a packed integer checkpoint; atomic.

    Args:
        model: the model ``Compressor.finalize()`` returned (after :func:`prunequant.graph.shrink`
            when available; a masked model is refused then unless ``allow_masked``).
        path: destination file (conventionally ``*.pqpack``).
        allow_masked: store a masked model as is (pruned channels are stored as zeros, so the file
            is larger than the pruned weight memory).
        example_input: needed only if the model was instrumented with an example input (models
            whose sites go through concatenations / splits); its shape is recorded for loading.
        fold_bn: store the deployment form: each BatchNorm after a per-channel quantized conv folded
            into the conv's scale and a bias (:func:`prunequant.export.fold_batchnorm`): 2 float32
            numbers and a sign bit per channel instead of 5 float32 numbers. Reloading is then
            bit-identical to ``fold_batchnorm(model)``, which equals ``model`` up to the folding's
            float rounding (docs/export.md).
    """
    blob = encode_packed(model, allow_masked=allow_masked, example_input=example_input, fold_bn=fold_bn)
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
    if version not in READABLE_VERSIONS:
        raise PackedFormatError(f"packed checkpoint version {version} is not supported (this prunequant "
                                f"reads versions {', '.join(map(str, READABLE_VERSIONS))})")
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
    if record.get("version") != version:
        raise PackedFormatError("packed checkpoint header and record disagree on the version")
    if version >= 2:  # tensor shapes follow from the rebuilt model; the record sums the bytes
        try:
            total = sum(int(v) for v in record["sizes"].values())
            ok = isinstance(record["kinds"], str) and set(record["kinds"]) <= set(_KIND_CHARS)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PackedFormatError(f"packed checkpoint record is malformed ({e!r})") from e
        if not ok:
            raise PackedFormatError("packed checkpoint record has an invalid layout string")
        if total != len(data):
            raise PackedFormatError(f"packed checkpoint data section has {len(data)} bytes, the record "
                                    f"describes {total}")
        return record, data
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
    if t["kind"] == "sign":
        return (n + 7) // 8
    return n * _DTYPES[t["dtype"]][1].itemsize


def _tensor(t: dict[str, Any], data: memoryview) -> torch.Tensor:
    buf = bytes(data[t["offset"]: t["offset"] + t["nbytes"]])
    shape = [int(s) for s in t["shape"]]
    n = int(np.prod(shape)) if shape else 1
    if t["kind"] == "packed":
        return torch.from_numpy(unpack_codes(buf, n, int(t["bits"]), int(t["qmin"])).reshape(shape))
    if t["kind"] == "sign":
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=n, bitorder="little")
        return torch.from_numpy(bits.astype(bool).reshape(shape))
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
    sig = _signature(plan)
    if int(record.get("version", 1)) >= 2:
        sites = record.get("sites", [])
        if _sha(sig) != record.get("plan_sha") or len(sites) != len(plan.sites):
            raise ExportError("load_packed: the model given is not the architecture that was saved (its "
                              "layers or prunable sites differ). Pass a model built with the same "
                              "constructor arguments as the one that was compressed")
        saved = {s.name: {"channels": c, "kept": k, **({"keep_bits": kb} if kb else {})}
                 for s, (c, k, kb) in zip(plan.sites, sites, strict=True)}
    else:
        saved = {s["name"]: s for s in record.get("sites", [])}
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
    if int(record.get("version", 1)) >= 2:
        _fill_v2(gm, record, data)
    else:
        _fill_v1(gm, record, data)
    gm.eval()
    return gm.to(map_location)


def _fill_v2(gm: fx.GraphModule, record: dict[str, Any], data: memoryview) -> None:
    """Set every tensor of the rebuilt model from a version-2 record and data section."""
    modules = dict(gm.named_modules())
    quants = [(n, m) for n, m in modules.items() if isinstance(m, (WeightQuantizer, ActQuantizer))]
    bits = record.get("bits", [])
    if len(bits) != len(quants):
        raise ExportError("load_packed: the rebuilt model has a different number of quantizers than the "
                          "saved one; different architecture or options?")
    p2 = set(record.get("power_of_two", []))
    for (name, m), b in zip(quants, bits, strict=True):  # bit-widths as saved (may differ from the recipe)
        m.bits = int(b)
        if isinstance(m, WeightQuantizer):
            m.power_of_two = name in p2
    folded = list(record.get("folded") or [])
    for name in folded:
        bn = modules.get(name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ExportError(f"load_packed: folded BatchNorm {name} is not a BatchNorm in the rebuilt model")
        bn.eps = 0.0
    gm.pq_folded = folded
    state = gm.state_dict()
    keys = list(state.keys())
    kinds = record["kinds"]
    if _sha(keys) != record.get("keys_sha") or len(kinds) != len(keys):
        raise ExportError("load_packed: the rebuilt model's tensors differ from the saved one's; different "
                          "architecture or options?")
    scalars = list(record.get("scalars", []))
    new: dict[str, torch.Tensor] = {}
    offset = 0
    si = 0

    def take(t: dict[str, Any]) -> torch.Tensor:
        nonlocal offset
        t["offset"], t["nbytes"] = offset, _nbytes(t)
        if offset + t["nbytes"] > len(data):
            raise PackedFormatError(f"packed checkpoint data ends inside {t['key']}")
        offset += t["nbytes"]
        return _tensor(t, data)

    pending_w: dict[str, torch.Tensor] = {}
    for key, k in zip(keys, kinds, strict=True):
        ref = state[key]
        shape = list(ref.shape)
        if k == "0":
            if si >= len(scalars) or ref.dim() != 0:
                raise PackedFormatError(f"packed checkpoint scalar list does not match {key}")
            new[key] = torch.tensor(scalars[si], dtype=ref.dtype)
            si += 1
        elif k == "R":
            dt = _BY_TORCH.get(ref.dtype)
            if dt is None:
                raise ExportError(f"load_packed: {key} has dtype {ref.dtype}, which the format cannot store")
            new[key] = take({"key": key, "kind": "raw", "dtype": dt, "shape": shape})
        elif k == "P":
            wq = _weight_quantizer_of(modules, key)
            pending_w[key] = take({"key": key, "kind": "packed", "dtype": f"int{wq.bits}", "shape": shape,
                                   "bits": wq.bits, "qmin": wq.qmin})
        elif k == "S":
            wkey = key.rsplit(".0.stat_sum", 1)[0] + ".original"
            sc = take({"key": key, "kind": "wscale", "dtype": "float32", "shape": shape})
            wq = modules[key.rsplit(".stat_sum", 1)[0]]
            codes = pending_w.pop(wkey)
            new[wkey] = codes.to(torch.float32) * wq._broadcast(sc, codes)
            new[key] = sc.to(torch.float64)
            new[key.rsplit(".stat_sum", 1)[0] + ".stat_count"] = torch.ones((), dtype=torch.float64)
        elif k == "A":
            lb, ub = take({"key": key, "kind": "abounds", "dtype": "float64", "shape": [2]}).tolist()
            prefix = key.rsplit("min_sum", 1)[0]
            new[key] = torch.tensor(lb, dtype=torch.float64)
            new[f"{prefix}max_sum"] = torch.tensor(ub, dtype=torch.float64)
            new[f"{prefix}stat_count"] = torch.ones((), dtype=torch.float64)
        elif k == "G":
            signs = take({"key": key, "kind": "sign", "dtype": "bool", "shape": shape})
            new[key] = 1.0 - 2.0 * signs.to(ref.dtype)
            prefix = key.rsplit("weight", 1)[0]
            new[f"{prefix}running_mean"] = torch.zeros_like(state[f"{prefix}running_mean"])
            new[f"{prefix}running_var"] = torch.ones_like(state[f"{prefix}running_var"])
        elif k == "B":
            new[key] = take({"key": key, "kind": "raw", "dtype": "float32", "shape": shape}).to(ref.dtype)
        elif k == "Z":
            new[key] = torch.zeros_like(ref)
    if pending_w:
        raise PackedFormatError(f"packed checkpoint has weights without scales: {sorted(pending_w)[:3]}")
    if si != len(scalars) or offset != len(data):
        raise PackedFormatError("packed checkpoint layout does not use the whole record and data section")
    for key, v in state.items():
        if key not in new:
            new[key] = v  # not stored: mask statistics (and nothing else)
    gm.load_state_dict(new, strict=True)


def _weight_quantizer_of(modules: dict[str, nn.Module], key: str) -> WeightQuantizer:
    wq = modules.get(key.rsplit(".original", 1)[0] + ".0")
    if not isinstance(wq, WeightQuantizer):
        raise ExportError(f"load_packed: {key} has no weight quantizer in the rebuilt model")
    return wq


def _fill_v1(gm: fx.GraphModule, record: dict[str, Any], data: memoryview) -> None:
    """Set every tensor of the rebuilt model from a version-1 record (a tensor table)."""
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




def packed_size_report(path_or_bytes: str | Path | bytes) -> dict[str, int]:
    """Bytes of a packed file by part: header, record, packed weights, scales, other tensors."""
    blob = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    record, data = read_packed(blob)
    rep = {"header": HEADER_BYTES, "record": len(blob) - HEADER_BYTES - len(data), "packed_weights": 0,
           "weight_scales": 0, "activation_params": 0, "other_tensors": 0}
    kind_to = {"packed": "packed_weights", "wscale": "weight_scales", "abounds": "activation_params",
               "raw": "other_tensors"}
    if "sizes" in record:
        rep.update({k: int(v) for k, v in record["sizes"].items()})
    else:
        for t in record["tensors"]:
            rep[kind_to[t["kind"]]] += int(t["nbytes"])
    rep["total"] = len(blob)
    return rep


__all__ = [
    "HEADER_BYTES", "PackedFormatError", "encode_packed", "load_packed", "pack_codes", "packed_nbytes",
    "packed_size_report", "read_packed", "save_packed", "unpack_codes",
]
