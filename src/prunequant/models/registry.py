"""Name -> constructor registry for the model zoo."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ._common import check_model_args
from .lenet import LENET_MIN_IMAGE_SIZE, LeNet5
from .mobilenetv2 import MobileNetV2
from .resnet import resnet20, resnet32, resnet56
from .vgg import VGGSmall

__all__ = ["MODEL_NAMES", "build_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg_small": VGGSmall,
    "mobilenetv2": MobileNetV2,
    "lenet5": LeNet5,
}

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                width: float = 1.0, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised classification model by name.

    Args:
        name: one of :data:`MODEL_NAMES` (case-insensitive).
        num_classes: number of output logits (>= 1).
        in_channels: input image channels (>= 1).
        image_size: square input side (>= 8; >= 12 for ``lenet5``).
        width: channel multiplier (> 0).
        **kwargs: model-specific options (``batchnorm`` for lenet5, ``dropout`` for mobilenetv2,
            ``cfg`` for vgg_small).

    Raises:
        ValueError: unknown ``name`` or an argument out of range (the message names it).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; allowed names: {', '.join(MODEL_NAMES)}")
    min_size = LENET_MIN_IMAGE_SIZE if key == "lenet5" else 8
    check_model_args(num_classes, in_channels, image_size, width, min_image_size=min_size)
    return _BUILDERS[key](num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                          width=width, **kwargs)
