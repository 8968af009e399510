"""CIFAR-style ResNet-20/32/56 (He et al., 2016) with 1x1-conv ("option B") projection shortcuts."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_model_args, init_weights, scale_channels

__all__ = ["BasicBlock", "ResNetCifar", "resnet20", "resnet32", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; ReLU after the first BN and after the add.

    The shortcut is a 1x1 conv + BN when the stride or channel count changes, else an empty
    ``nn.Sequential`` (identity).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``: 3x3 stem, three stages of 16/32/64 (times ``width``) channels.

    Args:
        depth: network depth, ``6n + 2`` (20, 32, 56, ...).
        num_classes: number of output logits.
        in_channels: input image channels.
        image_size: square input side (>= 8); only validated, pooling is adaptive.
        width: channel multiplier; channels are ``max(1, round(c * width))``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        check_model_args(num_classes, in_channels, image_size, width)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 56), got {depth!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.width = width
        c1, c2, c3 = (scale_channels(c, width) for c in (16, 32, 64))

        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(c1, c1, n, stride=1)
        self.layer2 = self._make_stage(c1, c2, n, stride=2)
        self.layer3 = self._make_stage(c2, c3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c3, num_classes)
        init_weights(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
             width: float = 1.0) -> ResNetCifar:
    """ResNet-20 (n = 3 blocks per stage)."""
    return ResNetCifar(20, num_classes, in_channels, image_size, width)


def resnet32(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
             width: float = 1.0) -> ResNetCifar:
    """ResNet-32 (n = 5 blocks per stage)."""
    return ResNetCifar(32, num_classes, in_channels, image_size, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
             width: float = 1.0) -> ResNetCifar:
    """ResNet-56 (n = 9 blocks per stage)."""
    return ResNetCifar(56, num_classes, in_channels, image_size, width)
