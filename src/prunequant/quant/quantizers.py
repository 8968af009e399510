"""Statistics-based uniform quantizers (METHOD section 5) with straight-through gradients.

Both quantizers keep all their state in buffers, so a model's ``state_dict`` carries it and the
running sums can be all-reduced across ranks (sum of ``stat_sum`` and ``stat_count``).

* :class:`WeightQuantizer`: symmetric, per output channel (conv / transposed conv) or per tensor
  (linear). Scale = equal-weight running mean of ``max|W_c| / 2**(b-1)`` over the steps since the
  quantizer was enabled; optional power-of-two scale; saturating to ``[-2**(b-1), 2**(b-1)-1]``.
  Optionally (not in the paper) the per-step statistic is the MSE-optimal clipped scale
  ``alpha_c * max|W_c| / 2**(b-1)`` instead (``clip="mse"``, see :func:`mse_clip_ratio`).
* :class:`ActQuantizer`: asymmetric, per tensor. Bounds are running means of the per-batch min and
  max (extended to include 0 so that zero, and therefore a pruned channel, is exactly
  representable); ``step = (ub - lb) / (2**b - 1)`` (the textbook choice; the authors' code divides
  by ``2**b``); integer zero point ``round(-lb / step)``. Optionally (not in the paper) the
  per-batch statistic is a high percentile instead of the max (and the matching low percentile
  instead of the min), which clips rare outliers and gives the 2**b levels a finer step.

In eval mode (and for a frozen activation quantizer) the quantization parameters only change when a
buffer, a weight or an option does, so both quantizers cache what they derive from them: the weight
quantizer its scale and, where no gradient is wanted, the fake-quantized weight itself; the activation
quantizer its ``(step, zero_point)`` tensors. Without a gradient the activation is fake-quantized by
the same operations in place, in one buffer (:func:`fake_quantize_nograd`), which on the CPU is reused
from call to call once nothing refers to the previous output any more (see :class:`_BufferPool`;
:func:`set_buffer_pool_bytes`). Outputs are bit-identical to the uncached computation
(:func:`eval_cache` turns the caches off). A cache entry is checked on every
call against the identity, version counter, data pointer, shape and dtype of every tensor it was derived
from, so in-place updates (optimizer steps, ``load_state_dict``, ``copy_``), replaced tensors and
``.to()`` all invalidate it; ``train()`` / ``eval()`` clear it, and it is never saved (not in
``state_dict``, dropped by ``copy.deepcopy`` and pickling). Only writes through ``.data``, which
bypass version counters, go unseen until the next ``train()`` / ``eval()`` or :meth:`clear_cache`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import parallel

MIN_BITS = 2
MAX_BITS = 16
_EPS = 1e-12


def check_bits(bits: int, field: str = "bits") -> int:
    """Validate a bit-width and return it as ``int``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{field} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


#: weight-scale statistics: the paper's max, or the MSE-optimal clipped max.
WEIGHT_CLIPS = ("max", "mse")
#: weight code ranges: ``full`` b-bit codes, or ``reduced``: 7-bit codes in 8-bit weights.
WEIGHT_RANGES = ("full", "reduced")
#: candidate clip ratios for ``clip="mse"``: 0.50, 0.52, ..., 1.00.
CLIP_RATIOS = tuple(round(0.5 + 0.02 * i, 2) for i in range(26))


@torch.no_grad()
def mse_clip_ratio(rows: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Per row, the ratio ``a`` in :data:`CLIP_RATIOS` minimizing ``sum (Q(w; a*scale) - w)^2``.

    ``rows`` is ``[C, K]`` (one row per channel), ``scale`` ``[C]`` the unclipped scales. Ties go to
    the larger ratio (less clipping), so ``1.0`` wins when clipping does not help.
    """
    w = rows.to(torch.float32).unsqueeze(0)  # [1, C, K]
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float64, device=rows.device)
    s = torch.clamp(ratios[:, None] * scale[None, :].to(torch.float64), min=_EPS)  # [R, C]
    s32 = s.to(torch.float32).unsqueeze(2)
    err = (torch.clamp(torch.round(w / s32), qmin, qmax).mul_(s32).sub_(w)).square_().sum(dim=2)  # [R, C]
    best = err.flip(0).argmin(dim=0)  # first minimum from the top: ties to the larger ratio
    return ratios.flip(0)[best]


def check_percentile(p: float | None, field: str = "act_percentile") -> float | None:
    """Validate an activation-range percentile: ``None`` or a number in the open range (50, 100)."""
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < float(p) < 100.0:
        raise ValueError(f"{field} must be null (batch min/max) or a number in (50, 100), got {p!r}")
    return float(p)


def global_aminmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of ``x``; under ``torch.distributed`` of the ranks' tensors together (one
    all-reduce), so every rank gets what one process sees on the whole global batch."""
    lo, hi = torch.aminmax(x)
    if parallel.world_size() <= 1:
        return lo, hi
    both = parallel.all_max(torch.stack([-lo, hi]))
    return -both[0], both[1]


def batch_percentiles(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``(low, high)``: the ``100 - p``-th and ``p``-th percentiles of all elements of ``x``.

    Exact order statistics: with ``n`` elements and ``k = floor(n * (1 - p/100))``, ``high`` is the
    ``(k+1)``-th largest element (so at most ``k`` elements lie above it) and ``low`` the ``(k+1)``-th
    smallest; ``k = 0`` gives the max and the min. Uses ``topk`` (linear in ``n`` for small ``k``),
    and returns the min as ``low`` when it is not negative (ReLU outputs): the quantizer clamps
    its lower bound to 0 then in either case. Under ``torch.distributed`` ``x`` is this rank's part
    of the global batch and the result that of the whole batch, exactly: each rank contributes its
    ``k + 1`` largest (smallest) elements, which contain the global ones.
    """
    flat = x.reshape(-1)
    world = parallel.world_size()
    n = flat.numel() if world <= 1 else int(parallel.all_sum(torch.tensor([flat.numel()])).item())
    k = int(n * (1.0 - p / 100.0))
    lo, hi = global_aminmax(flat)
    if k == 0:
        return lo, hi
    hi = _kth(flat, k + 1, largest=True, world=world)
    if lo < 0:
        lo = _kth(flat, k + 1, largest=False, world=world)
    return lo, hi


def _kth(flat: Tensor, k: int, largest: bool, world: int) -> Tensor:
    """The ``k``-th largest (smallest) element of the ranks' ``flat`` tensors together."""
    top = torch.topk(flat, min(k, flat.numel()), largest=largest, sorted=False).values
    if world > 1:
        pad = top.new_full((k - top.numel(),), float("-inf") if largest else float("inf"))
        top = torch.topk(parallel.all_gather_cat(torch.cat([top, pad])), k, largest=largest,
                         sorted=False).values
    return top.min() if largest else top.max()


class _FakeQuant(torch.autograd.Function):
    """Affine fake quantization with a clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:  # noqa: D401
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
        lo = (qmin - zero_point) * scale
        hi = (qmax - zero_point) * scale
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D401
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``x``; gradient is identity inside the representable range, 0 outside."""
    return _FakeQuant.apply(x, scale, zero_point.to(x.dtype), qmin, qmax)


def quantize_to_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as int64) that :func:`fake_quantize` represents."""
    return torch.clamp(torch.round(x / scale) + zero_point.to(x.dtype), qmin, qmax).to(torch.int64)


def fake_quantize_nograd(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                         out: Tensor | None = None, zero_point_is_zero: bool = False) -> Tensor:
    """:func:`fake_quantize`'s values without autograd: the same operations in the same order, done in
    place in one buffer (``out``, or a new one), so the result is bit-identical (``zero_point``
    already in ``x.dtype``). ``zero_point_is_zero`` skips subtracting it, exact for every value
    (``t - 0.0`` is ``t``; the addition before it already turned ``-0.0`` into ``+0.0``).

    Large tensors cost several times less than the out-of-place chain, which allocates (and on first
    touch page-faults) a fresh buffer per operation.
    """
    t = torch.div(x, scale) if out is None else torch.div(x, scale, out=out)
    t.round_()
    t.add_(zero_point)
    t.clamp_(qmin, qmax)
    if not zero_point_is_zero:
        t.sub_(zero_point)
    return t.mul_(scale)


def _storage_uses(t: Tensor) -> int:
    """How many references the storage of ``t`` has (tensors and views on it, storage objects)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _BufferPool:
    """Output buffers of the in-place activation fake quantization, reused once nobody holds them.

    A fresh multi-megabyte buffer comes from the operating system page by page (glibc gives large freed
    blocks back), which costs about as much as the quantization arithmetic itself. A buffer is handed
    out as an alias (``buf.detach()``) and taken back only when that alias has died (weak reference)
    and its storage has no other user (the use count it had when it was made), so a caller that keeps
    the output, or any view of it, keeps the memory to itself. Buffers are pooled by layout (shape,
    strides, dtype, device, inference mode), at most two per layout, least recently used dropped first,
    up to :attr:`max_bytes` in all; buffers under :attr:`min_bytes` are not worth it (the allocator
    keeps those), and CUDA tensors are never pooled.
    """

    def __init__(self, max_bytes: int = 64 << 20, min_bytes: int = 256 << 10):
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.enabled = hasattr(torch._C, "_storage_Use_Count")
        self._lock = threading.Lock()
        self._free: OrderedDict[tuple, list[tuple[Tensor, weakref.ref, int]]] = OrderedDict()
        self._bytes = 0

    def wants(self, x: Tensor) -> bool:
        """Whether results of ``x``'s size are pooled: on the CPU (CUDA has a caching allocator, and
        streams this pool does not track), between :attr:`min_bytes` and :attr:`max_bytes`."""
        return self.enabled and x.is_cpu and self.min_bytes <= x.numel() * x.element_size() <= self.max_bytes

    @staticmethod
    def key(x: Tensor) -> tuple:
        """The layout ``torch.div(x, scalar)`` gives its result."""
        return (x.shape, x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled())

    def take(self, key: tuple) -> tuple[Tensor, int] | None:
        """A pooled buffer for ``key`` that nothing else refers to, and its storage use count, or ``None``."""
        if not self.enabled:
            return None
        with self._lock:
            entries = self._free.get(key)
            while entries:
                buf, alias, uses = entries.pop()
                self._bytes -= buf.numel() * buf.element_size()
                if alias() is None and _storage_uses(buf) == uses:
                    return buf, uses
            return None

    def give(self, key: tuple, buf: Tensor, uses: int) -> Tensor:
        """Pool ``buf`` (whose storage had ``uses`` references when it was made); return its alias."""
        alias = buf.detach()
        size = buf.numel() * buf.element_size()
        if not self.enabled or size > self.max_bytes:
            return alias
        with self._lock:
            entries = self._free.setdefault(key, [])
            self._free.move_to_end(key)
            entries.append((buf, weakref.ref(alias), uses))
            self._bytes += size
            if len(entries) > 2:
                old = entries.pop(0)[0]
                self._bytes -= old.numel() * old.element_size()
            while self._bytes > self.max_bytes and self._free:
                _, dropped = self._free.popitem(last=False)
                self._bytes -= sum(b.numel() * b.element_size() for b, _, _ in dropped)
        return alias

    def clear(self) -> None:
        """Drop every pooled buffer."""
        with self._lock:
            self._free.clear()
            self._bytes = 0


_POOL = _BufferPool()


def set_buffer_pool_bytes(max_bytes: int) -> None:
    """Cap (in bytes) the memory the pool of activation-quantizer output buffers keeps between calls
    (default 64 MiB; 0 turns reuse off). The pool only serves eval-mode calls without autograd."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    _POOL.clear()
    _POOL.max_bytes = max_bytes


_EVAL_CACHE = [True]


def eval_cache_enabled() -> bool:
    """Whether quantizers in eval mode use their caches (see :func:`eval_cache`)."""
    return _EVAL_CACHE[0]


@contextlib.contextmanager
def eval_cache(enabled: bool = True) -> Iterator[None]:
    """Within the block, quantizers in eval mode use (``True``) or bypass (``False``) their caches and
    the in-place fake quantization: ``False`` runs exactly the uncached code (for comparisons)."""
    prev = _EVAL_CACHE[0]
    _EVAL_CACHE[0] = bool(enabled)
    try:
        yield
    finally:
        _EVAL_CACHE[0] = prev


_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _use_cache(x: Any) -> bool:
    """The eval-mode caches apply: enabled, a real tensor, not under ``torch.jit`` tracing or
    ``torch.compile`` / ``torch.export`` (which must see the operations, not a cached constant)."""
    return _EVAL_CACHE[0] and isinstance(x, Tensor) and not torch.jit.is_tracing() and not _compiling()


def _key(tensors: tuple[Tensor, ...], options: tuple) -> tuple | None:
    """What identifies the values of ``tensors`` (identity, version counter, data pointer, shape and
    dtype of each) and ``options`` now; ``None`` when one is an inference tensor (no version counter)."""
    k: list[Any] = []
    try:
        for t in tensors:
            k += (id(t), t._version, t.data_ptr(), t.shape, t.dtype)
    except RuntimeError:
        return None
    k += options
    return tuple(k)


class _CacheMixin:
    """One cache entry ``(key, tensors, values)``: ``values`` were derived from ``tensors`` (held, so
    their ids stay theirs) when :func:`_key` gave ``key``. Never saved; dropped on ``train()`` /
    ``eval()``, by copies and pickles."""

    _pq_cache: tuple | None = None

    def clear_cache(self) -> None:
        """Drop the eval-mode cache (needed only after writes through ``.data``, which bypass version
        counters)."""
        self._pq_cache = None

    def train(self, mode: bool = True):  # type: ignore[override]
        """As :meth:`torch.nn.Module.train`; also clears the cache."""
        self._pq_cache = None
        return super().train(mode)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_pq_cache", None)
        return state

    def _cache_get(self, key: tuple | None) -> dict[str, Any] | None:
        c = self._pq_cache
        if c is not None and key is not None and c[0] == key:
            return c[2]
        return None

    def _cache_put(self, key: tuple | None, tensors: tuple[Tensor, ...],
                   values: dict[str, Any]) -> dict[str, Any]:
        self._pq_cache = None if key is None else (key, tensors, values)
        return values


def clear_quantizer_caches(model: nn.Module) -> None:
    """Clear the eval-mode cache of every quantizer in ``model`` (after writes through ``.data``)."""
    for m in model.modules():
        if isinstance(m, _CacheMixin):
            m.clear_cache()


class WeightQuantizer(_CacheMixin, nn.Module):
    """Symmetric weight fake-quantizer with a running-mean scale.

    Args:
        bits: bit-width in [2, 16].
        channels: number of output channels for per-channel scales, or ``None`` for per tensor.
        axis: the output-channel axis of the weight (0 for conv, 1 for transposed conv).
        power_of_two: round the scale to the nearest power of two (shift-only hardware).
        clip: ``"max"`` (the paper's ``max|W_c| / 2**(b-1)``) or ``"mse"`` (that scale times the
            ratio in :data:`CLIP_RATIOS` that minimizes the channel's quantization error at this step).
        weight_range: ``"full"`` (codes in ``[-2**(b-1), 2**(b-1)-1]``) or ``"reduced"``: an 8-bit
            quantizer uses 7-bit codes ``[-64, 63]`` in its 8-bit container (scale ``max|W_c| / 64``),
            which integer u8s8 kernels without VNNI sum without 16-bit saturation (see
            ``prunequant.export.cpu``). Other widths are unchanged: up to 7 bits the codes fit
            already, and wider weights use 16-bit containers that no 8-bit kernel reads.
    """

    def __init__(self, bits: int, channels: int | None = None, axis: int = 0, power_of_two: bool = False,
                 clip: str = "max", weight_range: str = "full"):
        super().__init__()
        self.bits = check_bits(bits, "weight_bits")
        if clip not in WEIGHT_CLIPS:
            raise ValueError(f"weight_clip must be one of {list(WEIGHT_CLIPS)}, got {clip!r}")
        if weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range must be one of {list(WEIGHT_RANGES)}, got {weight_range!r}")
        self.clip = clip
        self.weight_range = weight_range
        self.axis = axis
        self.power_of_two = bool(power_of_two)
        n = 1 if channels is None else int(channels)
        self.per_channel = channels is not None
        self.register_buffer("stat_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("stat_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))

    @property
    def code_bits(self) -> int:
        """Bits of the integer codes: ``bits``, or 7 for an 8-bit ``weight_range="reduced"`` quantizer."""
        return 7 if self.weight_range == "reduced" and self.bits == 8 else self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.code_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.code_bits - 1) - 1

    def _current_stat(self, w: Tensor) -> Tensor:
        """``max|W_c| / 2**(c-1)`` per channel (or per tensor; ``c`` = :attr:`code_bits`), times the MSE
        clip ratio if ``clip="mse"``."""
        w = w.detach()
        if self.per_channel:
            rows = w.movedim(self.axis, 0).reshape(w.shape[self.axis], -1)
        else:
            rows = w.reshape(1, -1)
        s = rows.abs().amax(dim=1).to(torch.float64) / 2 ** (self.code_bits - 1)
        if self.clip == "mse":
            s = s * mse_clip_ratio(rows, s, self.qmin, self.qmax)
        return s

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        """Add the current weight's statistic to the running mean (called once per training step)."""
        self.stat_sum += self._current_stat(w)
        self.stat_count += 1

    def scale(self, w: Tensor | None = None) -> Tensor:
        """The quantization step per channel (float32, shape ``[C]`` or ``[1]``)."""
        if self.stat_count > 0:
            s = self.stat_sum / self.stat_count
        elif w is not None:
            s = self._current_stat(w)
        else:
            raise RuntimeError("WeightQuantizer has no statistics yet and no weight was given")
        s = torch.clamp(s, min=_EPS)
        if self.power_of_two:
            s = torch.exp2(torch.round(torch.log2(s)))
        return s.to(torch.float32)

    def _broadcast(self, s: Tensor, w: Tensor) -> Tensor:
        if not self.per_channel:
            return s.reshape(())
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return s.reshape(shape)

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantized weight when enabled, else ``w`` unchanged."""
        if not self.training and _use_cache(w):
            return self._forward_cached(w)
        if not bool(self.enabled):
            return w
        s = self._broadcast(self.scale(w).to(w.device, w.dtype), w)
        return fake_quantize(w, s, torch.zeros((), device=w.device), self.qmin, self.qmax)

    def _forward_cached(self, w: Tensor) -> Tensor:
        """Eval mode: :meth:`forward` with the scale, and (without autograd) the result, cached."""
        b = self._buffers
        tensors = (w, b["stat_sum"], b["stat_count"], b["enabled"])
        key = _key(tensors, (self.bits, self.weight_range, self.power_of_two, self.per_channel, self.axis,
                             self.clip))
        v = self._cache_get(key)
        if v is None:
            if not bool(self.enabled):
                v = {"off": True}
            else:
                with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode
                    s = self._broadcast(self.scale(w).to(w.device, w.dtype), w)
                    v = {"off": False, "scale": s, "zero": torch.zeros((), device=w.device).to(w.dtype)}
            v = self._cache_put(key, tensors, v)
        if v["off"]:
            return w
        if torch.is_grad_enabled() and w.requires_grad:
            return _FakeQuant.apply(w, v["scale"], v["zero"], self.qmin, self.qmax)
        out = v.get("out")
        if out is None or out._version != v["out_version"]:  # first use, or written to by a caller
            with torch.inference_mode(False), torch.no_grad():
                out = fake_quantize_nograd(w.detach(), v["scale"], v["zero"], self.qmin, self.qmax)
            v["out"], v["out_version"] = out, out._version
        return out

    def int_codes(self, w: Tensor) -> Tensor:
        """Integer weight codes in ``[qmin, qmax]``."""
        s = self._broadcast(self.scale(w).to(w.device, w.dtype), w)
        return quantize_to_int(w, s, torch.zeros((), device=w.device), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = f"per_channel(axis={self.axis})" if self.per_channel else "per_tensor"
        clip = "" if self.clip == "max" else f", clip={self.clip}"
        rng = "" if self.weight_range == "full" else f", weight_range={self.weight_range}"
        return f"bits={self.bits}, {kind}, power_of_two={self.power_of_two}{clip}{rng}"


_NO_DATA = "ActQuantizer is enabled but has never seen data; run a training or calibration pass first"


class ActQuantizer(_CacheMixin, nn.Module):
    """Asymmetric per-tensor activation fake-quantizer with running-mean min/max bounds.

    In training mode (and while not frozen) each forward adds the batch min and max to the
    running means, then quantizes with the updated bounds. In eval mode the statistics are frozen.
    Before it is enabled it passes its input through unchanged and gathers nothing.

    Args:
        bits: bit-width in [2, 16].
        percentile: ``None`` (the paper's batch min / max) or ``p`` in (50, 100): the batch statistic
            is then the ``p``-th percentile (upper bound) and the ``100 - p``-th percentile (lower
            bound), computed exactly (see :func:`batch_percentiles`).
    """

    def __init__(self, bits: int, percentile: float | None = None):
        super().__init__()
        self.bits = check_bits(bits, "act_bits")
        self.percentile = check_percentile(percentile)
        self.register_buffer("min_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("max_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("stat_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def bounds(self) -> tuple[float, float]:
        """Running-mean ``(lb, ub)``, extended to contain 0."""
        if self.stat_count <= 0:
            raise RuntimeError("ActQuantizer has no statistics yet")
        lb = float(self.min_sum / self.stat_count)
        ub = float(self.max_sum / self.stat_count)
        return min(lb, 0.0), max(ub, 0.0)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(step, zero_point)``: float32 step and an integer-valued zero point."""
        lb, ub = self.bounds()
        step = max((ub - lb) / (2**self.bits - 1), _EPS)
        zp = min(max(round(-lb / step), 0), self.qmax)
        return torch.tensor(step, dtype=torch.float32), torch.tensor(float(zp), dtype=torch.float32)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        if self.percentile is None:
            lo, hi = global_aminmax(x.detach())
        else:
            lo, hi = batch_percentiles(x.detach(), self.percentile)
        self.min_sum += lo.to(torch.float64)
        self.max_sum += hi.to(torch.float64)
        self.stat_count += 1

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantized activation when enabled."""
        gathering = self.training and not bool(self.frozen)
        if not gathering and _use_cache(x):
            return self._forward_cached(x)
        if not bool(self.enabled):
            return x
        if gathering:
            self._observe(x)
        if self.stat_count <= 0:  # enabled in eval without calibration: nothing to quantize with
            raise RuntimeError(_NO_DATA)
        step, zp = self.qparams()
        return fake_quantize(x, step.to(x.device, x.dtype), zp.to(x.device), self.qmin, self.qmax)

    def _forward_cached(self, x: Tensor) -> Tensor:
        """Statistics not updating (eval mode or frozen): :meth:`forward` with ``(step, zero_point)``
        cached, fake-quantized in place when no gradient is wanted."""
        b = self._buffers
        tensors = (b["min_sum"], b["max_sum"], b["stat_count"], b["enabled"])
        key = _key(tensors, (self.bits, x.dtype, x.device))
        v = self._cache_get(key)
        if v is None:
            if not bool(self.enabled):
                v = {"off": True}
            else:
                if self.stat_count <= 0:
                    raise RuntimeError(_NO_DATA)
                with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode
                    step, zp = self.qparams()
                    v = {"off": False, "step": step.to(x.device, x.dtype), "zp": zp.to(x.device).to(x.dtype),
                         "zp0": float(zp) == 0.0}
            v = self._cache_put(key, tensors, v)
        if v["off"]:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return _FakeQuant.apply(x, v["step"], v["zp"], self.qmin, self.qmax)
        step, zp, zp0 = v["step"], v["zp"], v["zp0"]
        if not _POOL.wants(x):
            return fake_quantize_nograd(x, step, zp, self.qmin, self.qmax, zero_point_is_zero=zp0)
        key = _POOL.key(x)
        got = _POOL.take(key)
        t = fake_quantize_nograd(x, step, zp, self.qmin, self.qmax, out=None if got is None else got[0],
                                 zero_point_is_zero=zp0)
        return _POOL.give(key, t, _storage_uses(t) if got is None else got[1])

    def int_codes(self, x: Tensor) -> Tensor:
        """Unsigned integer activation codes in ``[0, 2**b - 1]``."""
        step, zp = self.qparams()
        return quantize_to_int(x, step.to(x.device, x.dtype), zp.to(x.device), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + ("" if self.percentile is None else f", percentile={self.percentile}")
