"""prunequant.parallel: each piece against its one-process meaning, with two real gloo processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, SequentialSampler

from prunequant import parallel


@given(n=st.integers(1, 60), world=st.sampled_from([1, 2, 3, 4]), per=st.integers(1, 5),
       drop=st.booleans())
def test_sharded_batches_are_the_global_batches_cut_in_rank_order(n: int, world: int, per: int,
                                                                  drop: bool) -> None:
    glob = BatchSampler(SequentialSampler(range(n)), per * world, drop_last=True)
    shards = [list(parallel.ShardedBatches(glob, r, world)) for r in range(world)]
    assert all(len(s) == len(glob) for s in shards)
    for k, b in enumerate(glob):
        assert sum((s[k] for s in shards), []) == b
        assert all(len(s[k]) == per for s in shards)


def test_one_process_is_a_no_op() -> None:
    t = torch.arange(4.0)
    assert parallel.world_size() == 1 and parallel.is_main()
    assert parallel.all_max(t) is t and parallel.all_sum(t) is t and parallel.all_gather_cat(t) is t
    assert parallel.gather_tensors({"a": t})[0]["a"] is t
    bn = torch.nn.BatchNorm2d(3)
    with parallel.synced_batchnorm(bn):
        assert type(bn) is torch.nn.BatchNorm2d
    assert parallel.start(torch.device("cpu")).world == 1


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from prunequant.errors import JobStopped, RecipeError
        from prunequant.quant.quantizers import batch_percentiles, global_aminmax

        res: dict[str, torch.Tensor] = {}
        g = torch.Generator().manual_seed(7)
        full = torch.randn(8, 3, 5, 5, generator=g) * 3
        part = full.chunk(world)[rank]
        lo, hi = global_aminmax(part)
        res["minmax"] = torch.stack([lo, hi])
        for p in (99.0, 99.9, 90.0):
            lo, hi = batch_percentiles(part, p)
            res[f"p{p}"] = torch.stack([lo, hi])

        # BatchNorm over the global batch: forward, input / weight gradients, running statistics;
        # also on inputs far from zero mean (offset 1000), where a one-pass variance would cancel.
        for tag, off in (("", 0.0), ("_off", 1000.0)):
            bn = torch.nn.BatchNorm2d(3, momentum=0.3)
            x = (part + off).requires_grad_(True)
            w = torch.randn(part.shape, generator=torch.Generator().manual_seed(8 + rank))
            with parallel.synced_batchnorm(bn):
                assert type(bn).__name__ == "SyncedBatchNorm2d"
                y = bn(x)
                (y * w).sum().backward()
            assert type(bn) is torch.nn.BatchNorm2d
            res["y" + tag], res["dx" + tag] = y.detach(), x.grad
            res["dweight" + tag], res["dbias" + tag] = bn.weight.grad, bn.bias.grad
            res["running" + tag] = torch.stack([bn.running_mean, bn.running_var])

        got = parallel.gather_tensors({"r": torch.tensor([rank, 10 * rank]), "s": torch.ones(rank + 1)})
        assert [d["r"].tolist() for d in got] == [[r, 10 * r] for r in range(world)]
        assert [d["s"].numel() for d in got] == list(range(1, world + 1))

        # A user error on rank 1 alone: rank 1 raises it, rank 0 stops quietly.
        try:
            with parallel.agreed():
                if rank == 1:
                    raise RecipeError("only on rank 1")
            res["agreed"] = torch.tensor(0)
        except JobStopped:
            res["agreed"] = torch.tensor(1)
        except RecipeError as e:
            res["agreed"] = torch.tensor(2 if getattr(e, "rank_own", None) == 1 else 3)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_compute_what_one_process_computes_on_the_whole_batch(tmp_path: Path) -> None:
    from prunequant.quant.quantizers import batch_percentiles

    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    full = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(7)) * 3
    # min / max and exact percentiles: bit for bit the one-process values, on both ranks
    assert torch.equal(r0["minmax"], torch.stack(torch.aminmax(full)))
    assert torch.equal(r0["minmax"], r1["minmax"])
    for p in (99.0, 99.9, 90.0):
        assert torch.equal(r0[f"p{p}"], torch.stack(batch_percentiles(full, p))), p
        assert torch.equal(r1[f"p{p}"], r0[f"p{p}"])

    for tag, off in (("", 0.0), ("_off", 1000.0)):
        bn = torch.nn.BatchNorm2d(3, momentum=0.3)
        x = (full + off).requires_grad_(True)
        w = torch.cat([torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(8 + r))
                       for r in range(2)])
        y = bn(x)
        (y * w).sum().backward()
        tol = {"rtol": 1e-4, "atol": 1e-4} if off else {"rtol": 1e-5, "atol": 1e-5}
        assert torch.allclose(torch.cat([r0["y" + tag], r1["y" + tag]]), y.detach(), **tol), tag
        assert torch.allclose(torch.cat([r0["dx" + tag], r1["dx" + tag]]), x.grad, **tol), tag
        # DDP averages parameter gradients; here each rank's are its share of the global ones. Sums over
        # inputs near 1000 carry float32 noise of about 1e-4 of their size (float32 steps at 1000 are 6e-5)
        # in both computations; a one-pass E[x^2] - E[x]^2 variance puts the outputs 4e-2 off there.
        tol = {"rtol": 1e-3, "atol": 1e-3} if off else tol
        assert torch.allclose(r0["dweight" + tag] + r1["dweight" + tag], bn.weight.grad, **tol), tag
        assert torch.allclose(r0["dbias" + tag] + r1["dbias" + tag], bn.bias.grad, **tol), tag
        running = torch.stack([bn.running_mean, bn.running_var])
        assert torch.allclose(r0["running" + tag], running, **tol), tag
        assert torch.equal(r0["running" + tag], r1["running" + tag])

    assert int(r0["agreed"]) == 1 and int(r1["agreed"]) == 2
