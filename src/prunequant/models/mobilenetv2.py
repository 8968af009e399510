"""MobileNetV2 (Sandler et al., 2018), CIFAR variant: stride-1 stem and stride 1 in the second stage."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_model_args, init_weights, scale_channels

__all__ = ["CIFAR_MOBILENETV2_CFG", "InvertedResidual", "MobileNetV2"]

#: (expansion t, output channels c, repeats n, first stride s); the paper's table with the
#: 24-channel stage at stride 1 (as in common CIFAR ports), so 32x32 inputs end at 4x4.
CIFAR_MOBILENETV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Inverted residual block: [1x1 expand-BN-ReLU6] (if t != 1), 3x3 depthwise-BN-ReLU6, 1x1 project-BN.

    ``conv`` is a flat ``nn.Sequential`` of those modules; ``use_res_connect`` is true when the stride
    is 1 and input and output channel counts match.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = max(1, int(round(inp * expand_ratio)))
        self.in_channels = inp
        self.out_channels = oup
        self.stride = stride
        self.expand_ratio = expand_ratio
        self.use_res_connect: bool = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images.

    ``features`` = stem (3x3 conv stride 1, BN, ReLU6), the inverted residual blocks, and a final
    1x1 conv to ``1280 * max(1, width)`` channels with BN and ReLU6; then ``avgpool``, ``flatten``,
    ``dropout`` and the Linear ``classifier``.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
        image_size: square input side (>= 8); only validated, pooling is adaptive.
        width: channel multiplier; channels are ``max(1, round(c * width))`` (no rounding to 8).
        dropout: dropout probability before the classifier (0 disables it in effect).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        check_model_args(num_classes, in_channels, image_size, width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.width = width
        stem = scale_channels(32, width)
        last = scale_channels(1280, max(1.0, width))
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False),
                          nn.BatchNorm2d(stem), nn.ReLU6())
        ]
        channels = stem
        for t, c, n, s in CIFAR_MOBILENETV2_CFG:
            out = scale_channels(c, width)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(nn.Sequential(nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last),
                                    nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.avgpool(self.features(x)))
        return self.classifier(self.dropout(x))
