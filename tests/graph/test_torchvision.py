"""torchvision 0.28 architectures nobody tuned discovery for (random weights).

torchvision is a test dependency (pinned in pyproject's ``test`` extra); it imports beside the CPU
torch wheel through the op-schema shim in ``tests/tvshim.py``.
"""

from __future__ import annotations

import pytest
import torch


def _torchvision():
    from tvshim import import_torchvision

    return import_torchvision().models


@pytest.mark.parametrize("name,min_sites", [("resnet18", 8), ("mobilenet_v2", 18), ("densenet121", 58),
                                            ("efficientnet_b0", 33), ("shufflenet_v2_x1_0", 17)])
def test_torchvision_equivalence(name: str, min_sites: int) -> None:
    models = _torchvision()
    from gtools import set_masks

    from prunequant import measure
    from prunequant.graph import instrument, shrink

    torch.manual_seed(0)
    model = getattr(models, name)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    gm, plan = instrument(model, prune_stat="none", example_input=x)
    assert len(plan.sites) >= min_sites, plan.skipped
    set_masks(gm)
    with torch.no_grad():
        masked = gm(x)
        small = shrink(gm)
        out = small(x)
    assert float((out - masked).abs().max()) <= 1e-5 * float(masked.abs().max())
    m0, m1 = measure(gm, x), measure(small, x)
    assert (m0.params, m0.macs) == (m1.params, m1.macs)
