"""Several processes, one job: the process group, sharded global batches, synchronized BatchNorm and the
small collectives the trainer and the quantizers use.

``prunequant run`` under ``torchrun`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT``) runs one job on ``WORLD_SIZE`` processes:

* **Same global batches.** Every rank draws the same epoch permutation from the run's seed, cuts it
  into global batches of ``data.batch_size`` exactly as a one-process run does, and takes its own
  contiguous ``batch_size / WORLD_SIZE`` slice of each (:class:`ShardedBatches`). The union of the
  ranks' step-``k`` batches is the one-process run's step-``k`` batch.
* **Same arithmetic on those batches.** BatchNorm layers use the statistics of the global batch
  while training (:func:`synced_batchnorm`), DDP averages the gradients of the ranks' mean losses
  (the gradient of the global mean loss), activation quantizers take the global batch min / max /
  percentile (:func:`all_max`, :func:`all_gather_cat`), and channel masks average their statistics
  over ranks when they are recomputed. What differs from one process is the order of the float
  additions inside the reductions, so continuous values agree to rounding, not bit for bit.

Everything here is a no-op with one process.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import Tensor, nn

from .errors import JobStopped, PrunequantError

TIMEOUT = timedelta(minutes=60)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or not a number)."""
    w = os.environ.get("WORLD_SIZE", "1")
    return int(w) if w.strip().isdigit() and int(w) > 0 else 1


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the job (1 without an initialized process group)."""
    return torch.distributed.get_world_size() if initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def is_main() -> bool:
    """True on rank 0 (the one process that logs and writes files) and without a process group."""
    return rank() == 0


@dataclass
class Job:
    """The processes of one run: ``rank`` of ``world`` and the device this rank trains on (collectives
    run on it with NCCL, on the CPU with gloo). ``owned``: the group was created here and is destroyed
    by :meth:`close`."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owned and initialized():
            torch.distributed.destroy_process_group()
            self.owned = False


def start(device: torch.device) -> Job:
    """Join the job the launcher described (``WORLD_SIZE`` > 1), or a one-process :class:`Job`.

    NCCL when ``device`` is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU. A process group the
    caller already initialized is used as it is. Collectives time out after :data:`TIMEOUT` (rank 0
    evaluates alone while the others wait at their next collective).
    """
    dist = torch.distributed
    if not initialized() and env_world_size() <= 1:
        return Job(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    owned = False
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=TIMEOUT)
        owned = True
    return Job(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owned=owned)


# ----------------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    if initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(t: Tensor) -> Tensor:
    """Elementwise max over ranks (a copy; ``t`` itself with one process)."""
    if world_size() <= 1:
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
    return buf.to(t.device)


def all_sum(t: Tensor) -> Tensor:
    """Elementwise sum over ranks (a copy; ``t`` itself with one process)."""
    if world_size() <= 1:
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def all_gather_cat(t: Tensor) -> Tensor:
    """The ranks' 1-d tensors (equal lengths) concatenated in rank order."""
    if world_size() <= 1:
        return t
    buf = t.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(buf) for _ in range(world_size())]
    torch.distributed.all_gather(parts, buf)
    return torch.cat(parts).to(t.device)


def all_true(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (every rank learns it: a failure on one rank stops all)."""
    if world_size() <= 1:
        return ok
    return not bool(all_max(torch.tensor([0 if ok else 1], dtype=torch.int32)).item())


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if world_size() <= 1:
        return flag
    buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    torch.distributed.broadcast(buf, 0)
    return bool(buf.item())


def gather_tensors(tensors: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every rank's small ``{name: tensor}`` dict, in rank order (on every rank). Names, shapes and
    dtypes travel as JSON; tensors are sent one by one (meant for random states, a few kB)."""
    if world_size() <= 1:
        return [tensors]
    dev = _comm_device()
    out: list[dict[str, Tensor]] = []
    for src in range(world_size()):
        head = json.dumps([[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
                           for k, v in tensors.items()]).encode() if src == rank() else b""
        n = all_max(torch.tensor([len(head)], dtype=torch.int64))
        raw = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
        if src == rank():
            raw[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8).to(dev)
        torch.distributed.broadcast(raw, src)
        got: dict[str, Tensor] = {}
        for name, shape, dtype in json.loads(bytes(raw.cpu().tolist()).decode()):
            buf = (tensors[name].to(dev).contiguous() if src == rank()
                   else torch.empty(shape, dtype=getattr(torch, dtype), device=dev))
            torch.distributed.broadcast(buf, src)
            got[name] = buf.cpu().clone()
        out.append(got)
    return out


@contextmanager
def agreed() -> Iterator[None]:
    """Run a block on every rank; when it raises a user error (:class:`PrunequantError`) on any rank,
    every rank stops: the failing rank re-raises its error (rank 0's alone when several failed, so a
    configuration error is printed once) and the others raise a quiet :class:`JobStopped`. With one
    process the error simply propagates. One collective on the way out of the block."""
    err: PrunequantError | None = None
    try:
        yield
    except PrunequantError as e:
        if world_size() <= 1:
            raise
        err = e
    if world_size() > 1 and not all_true(err is None):
        main_failed = broadcast_flag(err is not None)
        if err is not None and (is_main() or not main_failed):
            err.rank_own = rank()  # type: ignore[attr-defined]  # the CLI prints it on this rank
            raise err
        raise JobStopped(f"rank {rank()}: stopped because another process of the job failed")


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------- data
class ShardedBatches:
    """This rank's slice of each global batch of a batch sampler: ranks take contiguous
    ``len(batch) / world`` slices in rank order, so the ranks' step-``k`` batches together are the
    sampler's step-``k`` batch (see the module docs: "same global batches")."""

    def __init__(self, batches: torch.utils.data.Sampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches:
            per = len(b) // self.world
            yield b[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- BatchNorm
class _AllGather(torch.autograd.Function):
    """The ranks' equal-shape tensors stacked in rank order (``[world, ...]``), with its gradient: a
    rank's tensor feeds every rank's result, so its gradient is its row of the sum of the ranks'
    gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D401
        parts = [torch.empty_like(t) for _ in range(world_size())]
        torch.distributed.all_gather(parts, t.detach().contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D401
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g)
        return g[rank()]


def _sync_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Training-mode BatchNorm over the global batch: each rank's per-channel count, mean and sum of
    squared deviations (``torch.var_mean``) gathered in one collective and combined exactly as the
    parallel (Chan et al.) variance formula does, which stays accurate whatever the mean; autograd
    runs through the gather (one collective in backward). Running statistics are updated as
    ``nn.BatchNorm`` does. Eval mode and one process: the ordinary BatchNorm."""
    if not (self.training and world_size() > 1):
        return nn.modules.batchnorm._BatchNorm.forward(self, x)
    self._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    c = x.shape[1]
    var_r, mean_r = torch.var_mean(x, dim=dims, unbiased=False)
    n_r = x.numel() // c
    # one collective: [count, mean, M2] of every rank (ranks may hold unequal batches)
    parts = _AllGather.apply(torch.cat([x.new_tensor([n_r]), mean_r, var_r * n_r]))
    counts, means, m2s = parts[:, :1], parts[:, 1:c + 1], parts[:, c + 1:]
    n = float(counts.detach().sum())
    mean = (counts * means).sum(0) / n
    var = (m2s + counts * (means - mean) ** 2).sum(0) / n
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)), alpha=m)
    y = (x - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
    if self.affine:
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
    return y


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED:
        _SYNCED[cls] = type(f"Synced{cls.__name__}", (cls,), {"forward": _sync_bn_forward,
                                                              "_pq_synced_from": cls})
    return _SYNCED[cls]


@contextmanager
def synced_batchnorm(model: nn.Module) -> Iterator[None]:
    """While inside, the BatchNorm layers of ``model`` normalize over the global batch of all ranks
    (their class is swapped for a synchronized subclass and back: state dicts, hooks and module
    identities stay as they are). With one process nothing changes. Works for gloo (CPU) and NCCL,
    unlike ``nn.SyncBatchNorm``, which refuses CPU tensors."""
    if world_size() <= 1:
        yield
        return
    swapped = []
    for m in model.modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            swapped.append((m, type(m)))
            m.__class__ = _synced_class(type(m))
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def wrap(model: nn.Module, job: Job) -> nn.Module:
    """``model`` in DDP when the job has several processes (parameters and buffers start as rank 0's;
    buffers are not broadcast afterwards: the compression state is kept equal by the reductions)."""
    if job.world <= 1:
        return model
    ids = [job.device.index] if job.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(model, device_ids=ids, forward_sync_buffers=False)  # still synced once, at init
    return ddp(model, device_ids=ids, broadcast_buffers=False)


__all__ = ["Job", "ShardedBatches", "agreed", "all_gather_cat", "all_max", "all_sum", "all_true", "barrier",
           "broadcast_flag", "env_world_size", "gather_tensors", "is_main", "rank", "start",
           "synced_batchnorm", "world_size", "wrap"]
