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
"""

from __future__ import annotations

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


class WeightQuantizer(nn.Module):
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
        if not bool(self.enabled):
            return w
        s = self._broadcast(self.scale(w).to(w.device, w.dtype), w)
        return fake_quantize(w, s, torch.zeros((), device=w.device), self.qmin, self.qmax)

    def int_codes(self, w: Tensor) -> Tensor:
        """Integer weight codes in ``[qmin, qmax]``."""
        s = self._broadcast(self.scale(w).to(w.device, w.dtype), w)
        return quantize_to_int(w, s, torch.zeros((), device=w.device), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = f"per_channel(axis={self.axis})" if self.per_channel else "per_tensor"
        clip = "" if self.clip == "max" else f", clip={self.clip}"
        rng = "" if self.weight_range == "full" else f", weight_range={self.weight_range}"
        return f"bits={self.bits}, {kind}, power_of_two={self.power_of_two}{clip}{rng}"


class ActQuantizer(nn.Module):
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
        if not bool(self.enabled):
            return x
        if self.training and not bool(self.frozen):
            self._observe(x)
        if self.stat_count <= 0:  # enabled in eval without calibration: nothing to quantize with
            raise RuntimeError("ActQuantizer is enabled but has never seen data; run a training or "
                               "calibration pass first")
        step, zp = self.qparams()
        return fake_quantize(x, step.to(x.device, x.dtype), zp.to(x.device), self.qmin, self.qmax)

    def int_codes(self, x: Tensor) -> Tensor:
        """Unsigned integer activation codes in ``[0, 2**b - 1]``."""
        step, zp = self.qparams()
        return quantize_to_int(x, step.to(x.device, x.dtype), zp.to(x.device), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + ("" if self.percentile is None else f", percentile={self.percentile}")
