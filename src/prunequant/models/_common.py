"""Shared helpers for the model zoo: channel scaling, argument checks and weight init."""

from __future__ import annotations

import math

from torch import nn

#: Smallest image size accepted by every model (LeNet-5 needs more, see :mod:`.lenet`).
MIN_IMAGE_SIZE = 8


def scale_channels(channels: int, width: float) -> int:
    """Return ``max(1, round(channels * width))``: the channel count after a width multiplier."""
    return max(1, int(round(channels * width)))


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_model_args(num_classes: int, in_channels: int, image_size: int, width: float,
                     min_image_size: int = MIN_IMAGE_SIZE) -> None:
    """Validate the common constructor arguments, raising ``ValueError`` naming the bad argument."""
    _check_int("num_classes", num_classes, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("image_size", image_size, min_image_size)
    if (isinstance(width, bool) or not isinstance(width, int | float)
            or not math.isfinite(width) or width <= 0):
        raise ValueError(f"width must be a finite number > 0 (e.g. 1.0, 0.5, 0.25), got {width!r}")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0, Linear PyTorch default / bias 0.

    Linear layers keep PyTorch's default (Kaiming-uniform) init: a small normal(0, 0.01) init
    vanishes the signal through LeNet's three stacked linear layers.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)
