"""torchvision 0.28 beside the CPU-only torch 2.13 wheel.

The PyPI torchvision 0.28.0 wheel registers its C++ kernels for ``torchvision::nms`` / ``qnms``
against schemas that its own (CUDA-built) extension would define; beside the local CPU torch they
are missing and ``import torchvision`` fails with "operator torchvision::nms does not exist".
Defining the two schemas first is enough: the model zoo (all the tests use) needs neither op.
"""

from __future__ import annotations

import torch


def import_torchvision():
    """``torchvision`` with the two op schemas defined when they are missing."""
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}",
                                 "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined (a real torchvision build, or a second call)
            pass
    import torchvision

    return torchvision
