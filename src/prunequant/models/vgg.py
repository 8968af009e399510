"""A small VGG-style network for CIFAR-sized inputs (conv-BN-ReLU blocks and max pooling)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._common import check_model_args, init_weights, scale_channels

__all__ = ["VGG_SMALL_CFG", "VGGSmall"]

#: Channel plan; ``"M"`` is a 2x2 max pool.
VGG_SMALL_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGSmall(nn.Module):
    """VGG-small: ``features`` (conv3x3-BN-ReLU / MaxPool) then adaptive average pool and a Linear.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
        image_size: square input side (>= 8); only validated, pooling is adaptive.
        width: channel multiplier; channels are ``max(1, round(c * width))``.
        cfg: channel plan, ints for conv widths and ``"M"`` for max pooling.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0, cfg: Sequence[int | str] = VGG_SMALL_CFG) -> None:
        super().__init__()
        check_model_args(num_classes, in_channels, image_size, width)
        n_pools = sum(1 for v in cfg if v == "M")
        if image_size >> n_pools < 1:
            raise ValueError(f"image_size must be >= {2 ** n_pools} for a cfg with {n_pools} max pools, "
                             f"got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"cfg entries must be positive ints or 'M', got {v!r}")
            out = scale_channels(v, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        if not any(isinstance(m, nn.Conv2d) for m in layers):
            raise ValueError("cfg must contain at least one convolution")
        self.width = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))
