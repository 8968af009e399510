"""Channel masks on activations, with the running importance statistics of METHOD section 2.

A :class:`ChannelMask` sits right after a prunable activation (the tensor the next conv / linear
sees). It multiplies channel ``c`` by ``mask[c]`` (0 or 1). While ``collecting`` is set and the
module is in training mode it adds the per-channel statistic of its *input* (the activation before
its own mask, after every earlier mask) to ``stat_sum`` and counts the batch in ``stat_count``:
an equal-weight mean over the batches of the estimation window.

A channel group (tensors joined by residual adds, see :func:`prunequant.graph.discover.discover_groups`)
has one mask applied at several points and gathers one row of statistics per point
(``points > 1``: ``stat_sum`` is ``[points, channels]``, ``stat_count`` ``[points]``). Its importance
is the mean over points (``aggregate="mean"``: every tensor of the group weighs the same, as each is
read by the next block) or the maximum (``"max"``: a channel any block relies on strongly is kept).

All state is in buffers (``mask``, ``stat_sum``, ``stat_count``, ``collecting``, ``frozen``,
``collected_steps``), so ``state_dict`` round-trips it. Under ``torch.distributed`` each batch's
statistic is averaged over the ranks as it is gathered (one small all-reduce per collecting mask and
step): with equal per-rank batches that is the statistic of the global batch, and every rank holds the
same sums.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import parallel

ACTIVATION_STATS = ("a_l1", "a_l0")
GROUP_AGGREGATES = ("mean", "max")


def batch_channel_stat(x: Tensor, kind: str, dim: int = 1) -> Tensor:
    """Per-channel statistic of one batch, channels on ``dim``: mean |a| (A-L1) or fraction != 0 (A-L0)."""
    x = x.detach()
    dim = dim % x.dim()
    dims = [d for d in range(x.dim()) if d != dim]
    if kind == "a_l1":
        return x.abs().mean(dim=dims)
    if kind == "a_l0":
        return (x != 0).to(x.dtype).mean(dim=dims)
    raise ValueError(f"unknown activation statistic {kind!r}; allowed: {ACTIVATION_STATS}")


def n_pruned(sparsity: float, channels: int) -> int:
    """``floor(s * C)`` channels to remove, keeping at least one channel."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    # The small epsilon protects against 0.3 * 10 = 2.9999999999999996.
    return min(int(math.floor(sparsity * channels + 1e-9)), channels - 1)


def importance_order(scores: Tensor) -> Tensor:
    """Channel indices from the most to the least important: the reverse of the order in which
    :func:`mask_from_scores` removes channels (lowest score first; among equal scores the lower index
    first), so the ``k`` channels it keeps are the first ``k`` of this order (with ``block = parts = 1``)."""
    s = scores.detach().reshape(-1).to(torch.float64)
    return torch.sort(s, stable=True).indices.flip(0)


def mask_from_scores(
    scores: Tensor,
    sparsity: float,
    *,
    round_to: int | None = None,
    block: int = 1,
    parts: int = 1,
) -> Tensor:
    """Keep-mask (float 0/1) removing the ``floor(s*C)`` lowest-scoring channels.

    Ties are broken deterministically: among equal scores the lower channel index is removed first.

    Structure (from :class:`prunequant.graph.Site`, so that the physically smaller network stays
    valid): ``block`` > 1 removes aligned blocks of that many channels together, ranked by their
    mean score (GroupNorm groups, PixelShuffle blocks); ``parts`` > 1 splits the channels into that
    many equal contiguous partitions that each lose the same number of blocks (groups of grouped
    convs, pieces of a split). Each partition keeps at least one block. ``round_to``: the number
    removed is reduced (never increased) until the kept count is a multiple of ``round_to``, when
    some count allows it; otherwise it is left as is.
    """
    c = scores.numel()
    mask = torch.ones(c, dtype=torch.float32, device=scores.device)
    if round_to is not None and (isinstance(round_to, bool) or int(round_to) < 1):
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    if block < 1 or parts < 1 or c % (block * parts):
        raise ValueError(f"{c} channels cannot be split into {parts} partitions of blocks of {block}")
    per = c // (block * parts)  # blocks per partition
    k = n_pruned(sparsity, per) if (block > 1 or parts > 1) else n_pruned(sparsity, c)
    if round_to is not None and round_to > 1:
        unit = block * parts  # channels removed per step of k
        j = k
        while j > 0 and (c - j * unit) % round_to:
            j -= 1
        if (c - j * unit) % round_to == 0:
            k = j
    if k == 0:
        return mask
    s = scores.detach().to(torch.float64)
    if block > 1:
        s = s.reshape(-1, block).mean(dim=1)
    s = s.reshape(parts, per)
    # Stable sort on (score, index): torch.sort(stable=True) keeps index order among equal scores.
    order = torch.sort(s, dim=1, stable=True).indices[:, :k]
    gone = torch.zeros(parts, per, dtype=torch.bool, device=scores.device)
    gone.scatter_(1, order.to(scores.device), True)
    mask[gone.reshape(-1).repeat_interleave(block)] = 0.0
    return mask


def aggregate_stat(stat_sum: Tensor, stat_count: Tensor, how: str = "mean") -> Tensor:
    """Per-channel importance from running sums: ``sum / count``; with one row per point (``[P, C]``
    sums, ``[P]`` counts) the rows that saw data are combined by ``how`` ("mean" or "max")."""
    if stat_sum.dim() == 1:
        return stat_sum / stat_count if float(stat_count) > 0 else torch.zeros_like(stat_sum)
    seen = stat_count > 0
    if not bool(seen.any()):
        return torch.zeros_like(stat_sum[0])
    rows = stat_sum[seen] / stat_count[seen].unsqueeze(1)
    if how == "mean":
        return rows.mean(dim=0)
    if how == "max":
        return rows.amax(dim=0)
    raise ValueError(f"unknown aggregate {how!r}; allowed: {GROUP_AGGREGATES}")


class ChannelMask(nn.Module):
    """Multiply channel ``c`` (dim 1) by ``mask[c]``; optionally gather activation statistics.

    ``points`` > 1: the mask of a channel group, applied at several tensors, with one row of
    statistics per point, combined by ``aggregate`` (see module docs). ``dim``: the channel dimension,
    1 (``[N, C, ...]``) or -1 (channels-last tensors, e.g. ``[N, H, W, C]`` or ``[N, T, C]`` read by
    linear layers).
    """

    def __init__(self, channels: int, stat: str = "a_l1", points: int = 1, aggregate: str = "mean",
                 dim: int = 1):
        super().__init__()
        if stat not in ACTIVATION_STATS + ("none",):
            raise ValueError(f"unknown statistic {stat!r}")
        if aggregate not in GROUP_AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; allowed: {GROUP_AGGREGATES}")
        self.channels = int(channels)
        self.stat = stat
        self.points = int(points)
        self.aggregate = aggregate
        if dim not in (1, -1):
            raise ValueError(f"dim must be 1 or -1, got {dim!r}")
        self.dim = dim
        rows = () if self.points == 1 else (self.points,)
        self.register_buffer("mask", torch.ones(channels))
        self.register_buffer("stat_sum", torch.zeros(*rows, channels, dtype=torch.float64))
        self.register_buffer("stat_count", torch.zeros(rows, dtype=torch.float64))
        self.register_buffer("collecting", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def reset_stats(self) -> None:
        """Forget the running statistics (start of an estimation window)."""
        self.stat_sum.zero_()
        self.stat_count.zero_()

    def mean_stat(self) -> Tensor:
        """Equal-weight mean of the per-batch statistic over the batches seen so far (combined over
        the points of a group by :attr:`aggregate`)."""
        return aggregate_stat(self.stat_sum, self.stat_count, self.aggregate)

    @property
    def kept(self) -> int:
        """Number of channels the mask keeps."""
        return int(self.mask.count_nonzero())

    def forward(self, x: Tensor, collect: bool | int = True, dim: int | None = None) -> Tensor:
        """Apply the mask; gather statistics of the unmasked input while collecting.

        ``collect=False`` is used where the same mask is applied a second time (tied depthwise, a
        group's member outputs); an integer is the statistics row of a group's point. ``dim``: the
        channel dim of this tensor when it differs from :attr:`dim` (a group spanning both layouts).
        """
        dim = self.dim if dim is None else dim
        if collect is not False and self.training and bool(self.collecting) and self.stat != "none":
            with torch.no_grad():
                s = batch_channel_stat(x, self.stat, dim).to(torch.float64)
                if parallel.world_size() > 1:
                    s = parallel.all_sum(s) / parallel.world_size()
                if self.points == 1:
                    self.stat_sum += s
                    self.stat_count += 1
                else:
                    i = 0 if collect is True else int(collect)
                    self.stat_sum[i] += s
                    self.stat_count[i] += 1
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.mask.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        extra = f", points={self.points}, aggregate={self.aggregate}" if self.points > 1 else ""
        extra += ", dim=-1" if self.dim == -1 else ""
        return f"channels={self.channels}, stat={self.stat}{extra}"


def masked_layer_norm(x: Tensor, normalized_shape: list[int] | tuple[int, ...], weight: Tensor | None,
                      bias: Tensor | None, eps: float, mask: Tensor) -> Tensor:
    """LayerNorm over the last dim computed on the channels ``mask`` keeps; removed channels output 0.

    What ``F.layer_norm`` gives on the physically smaller tensor, at the kept positions: a LayerNorm
    over channels whose channels are pruned (ConvNeXt) is exact only with statistics over the kept ones.
    """
    if len(normalized_shape) != 1:
        raise ValueError("masked_layer_norm normalizes over the last dim only")
    m = mask.to(x.dtype)
    k = m.sum().clamp(min=1)
    mean = (x * m).sum(dim=-1, keepdim=True) / k
    var = (((x - mean) * m) ** 2).sum(dim=-1, keepdim=True) / k
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * m
