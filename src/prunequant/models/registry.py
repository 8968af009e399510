"""Name -> constructor registry for the model zoo."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ._common import check_model_args
from .lenet import LENET_MIN_IMAGE_SIZE, LeNet5
from .mobilenetv2 import MobileNetV2
from .resnet import resnet20, resnet32, resnet56
from .sr import ESPCN, FSRCNN, UNetDenoiser
from .vgg import VGGSmall

__all__ = ["MODEL_NAMES", "RESTORATION_MODEL_NAMES", "build_model", "build_restoration_model"]

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

#: Image-restoration models (image in, image out; no classes): name -> (constructor, upscales).
_RESTORATION_BUILDERS: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "espcn": (ESPCN, True),
    "fsrcnn": (FSRCNN, True),
    "unet_denoise": (UNetDenoiser, False),
}

#: Names accepted by :func:`build_restoration_model` (kept apart from :data:`MODEL_NAMES`, whose models
#: all map an image to ``num_classes`` logits).
RESTORATION_MODEL_NAMES: tuple[str, ...] = tuple(_RESTORATION_BUILDERS)


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
    if key in _RESTORATION_BUILDERS:
        raise ValueError(f"{name!r} is an image-restoration model (no classes): use build_restoration_model")
    if key not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; allowed names: {', '.join(MODEL_NAMES)}")
    min_size = LENET_MIN_IMAGE_SIZE if key == "lenet5" else 8
    check_model_args(num_classes, in_channels, image_size, width, min_image_size=min_size)
    return _BUILDERS[key](num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                          width=width, **kwargs)


def build_restoration_model(name: str, in_channels: int = 1, scale: int = 1, width: float = 1.0,
                            **kwargs: Any) -> nn.Module:
    """Build a freshly initialised image-restoration model by name.

    Args:
        name: one of :data:`RESTORATION_MODEL_NAMES` (case-insensitive): ``espcn`` / ``fsrcnn``
            (super-resolution, ``scale`` >= 2) or ``unet_denoise`` (``scale`` 1).
        in_channels: image channels (1: the Y channel, 3: RGB); the output has as many.
        scale: upscaling factor.
        width: channel multiplier (> 0).
        **kwargs: model-specific options (``d``, ``s``, ``m`` for fsrcnn; ``levels``, ``residual`` for
            unet_denoise).

    Raises:
        ValueError: unknown ``name`` or an argument out of range (the message names it).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _RESTORATION_BUILDERS:
        raise ValueError(f"unknown restoration model name {name!r}; allowed names: "
                         f"{', '.join(RESTORATION_MODEL_NAMES)}")
    builder, upscales = _RESTORATION_BUILDERS[key]
    if upscales:
        return builder(scale=scale, in_channels=in_channels, width=width, **kwargs)
    if scale != 1:
        raise ValueError(f"{key} does not upscale: scale must be 1, got {scale!r}")
    return builder(in_channels=in_channels, width=width, **kwargs)
