"""Helpers for the graph tests: instrument a zoo model, set masks, calibrate quantizers."""

from __future__ import annotations

import torch

from prunequant.graph import instrument, raw_weight, weight_quantizer
from prunequant.prune.mask import mask_from_scores
from prunequant.quant.quantizers import ActQuantizer


def set_masks(gm, sparsity: float = 0.5, seed: int = 1, round_to: int | None = None) -> None:
    """Random-score masks that respect each site's structure."""
    g = torch.Generator().manual_seed(seed)
    for s in gm.pq_plan.sites:
        m = gm.get_submodule(s.mask)
        m.mask.copy_(mask_from_scores(torch.rand(s.channels, generator=g), sparsity, round_to=round_to,
                                      block=s.block, parts=s.parts))
        m.frozen.fill_(True)


def calibrate(gm, shape, steps: int = 2, seed: int = 3) -> None:
    """Enable every quantizer and give it statistics from a few random batches."""
    for name in gm.pq_plan.layers:
        mod = gm.get_submodule(name)
        wq = weight_quantizer(mod)
        if wq is not None:
            wq.enabled.fill_(True)
            wq.observe(raw_weight(mod))
    for m in gm.modules():
        if isinstance(m, ActQuantizer):
            m.enabled.fill_(True)
    g = torch.Generator().manual_seed(seed)
    gm.train()
    with torch.no_grad():
        for _ in range(steps):
            gm(torch.randn(*shape, generator=g))
    for m in gm.modules():
        if isinstance(m, ActQuantizer):
            m.frozen.fill_(True)
    gm.eval()


def build(name: str, bits: int | None = None, sparsity: float = 0.5, weight_range: str = "full",
          groups: bool = False):
    from zoo import ZOO, randomize

    builder, shape = ZOO[name]
    model = randomize(builder()).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    gm, plan = instrument(model, prune_stat="none", example_input=x, weight_bits=bits, act_bits=bits,
                          weight_range=weight_range, groups=groups)
    set_masks(gm, sparsity)
    if bits is not None:
        calibrate(gm, shape)
    gm.eval()
    return model, gm, x
