"""Real multi-process training (torch.distributed, gloo, 2 CPU processes, DDP) in a user's own loop:
every rank ends with identical masks and activation quantizers although each rank sees different data."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

RECIPE = {
    "ordering": "joint",
    # groups on: sites and residual groups (one statistics row per point) are both reduced across ranks
    "prune": {"sparsity": 0.5, "unit": "steps", "start": 2, "interval": 4, "refresh": 2, "groups": True},
    "quant": {"weight_bits": 4, "act_bits": 4, "unit": "steps", "weight_delay": 0, "act_delay": 0},
}


def _worker(rank: int, world: int, init: str, out: str, reduce: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from sklearn.datasets import load_digits

        from prunequant import Compressor
        from prunequant.models import build_model
        from prunequant.prune import mask as mmod
        from prunequant.quant import quantizers as qmod
        from prunequant.quant.quantizers import ActQuantizer

        if not reduce:  # the control: rank-local statistics only
            qmod.global_aminmax = torch.aminmax
            qmod.parallel = mmod.parallel = types.SimpleNamespace(world_size=lambda: 1)
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, width=0.25)
        comp = Compressor(model, RECIPE, x[:4])
        net = torch.nn.parallel.DistributedDataParallel(comp.model, broadcast_buffers=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(comp.total_steps_hint + 3):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            comp.step()
        comp.finalize(shrink=False)
        masks = [m.mask.clone() for m in comp._masks]
        local = [m.stat_sum.clone() for m in comp._masks]
        aq = [torch.tensor([float(a.min_sum), float(a.max_sum), float(a.stat_count)])
              for a in comp.model.modules() if isinstance(a, ActQuantizer)]
        w = [p.detach().clone() for p in comp.model.parameters()]
        torch.save({"masks": masks, "local": local, "aq": aq, "w": w}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, reduce: bool) -> list[dict]:
    out = tmp_path / ("reduced" if reduce else "local")
    out.mkdir()
    init = f"file://{tmp_path / ('store_r' if reduce else 'store_l')}"
    mp.spawn(_worker, args=(2, init, str(out), reduce), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_end_with_identical_masks_and_quantizers(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, reduce=True)
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
    assert all(int((m == 0).sum()) == m.numel() // 2 for m in r0["masks"])  # pruned to 50 %
    assert any(s.dim() == 2 for s in r0["local"])  # the residual groups were pruned too
    assert all(torch.equal(a, b) for a, b in zip(r0["aq"], r1["aq"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["w"], r1["w"]))  # DDP kept the weights in step
    # The mask statistics are averaged over the ranks as they are gathered: equal sums on both.
    assert all(torch.equal(a, b) for a, b in zip(r0["local"], r1["local"]))

    # Control: with rank-local statistics the activation quantizers and mask statistics diverge
    # (the ranks did see different data), so the checks above are not vacuous.
    c0, c1 = _run(tmp_path, reduce=False)
    assert any(not torch.equal(a, b) for a, b in zip(c0["aq"], c1["aq"]))
    assert any(not torch.equal(a, b) for a, b in zip(c0["local"], c1["local"]))
