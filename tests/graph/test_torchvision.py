"""Optional group: torchvision 0.28 architectures nobody tuned discovery for (random weights).

Runs only when torchvision is importable in the test environment (it is not a dependency).
"""

from __future__ import annotations

import pytest
import torch


def _torchvision():
    try:
        import torchvision  # noqa: F401
        from torchvision import models
    except Exception as e:  # ImportError, or a build that does not match this torch
        pytest.skip(f"torchvision not importable: {type(e).__name__}: {e}")
    return models


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
