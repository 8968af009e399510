"""LeNet-5-style CNN (two 5x5 convs with max pooling, three fully connected layers)."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_model_args, init_weights, scale_channels

__all__ = ["LENET_MIN_IMAGE_SIZE", "LeNet5", "lenet_feature_size"]

#: Smallest square input for which the second (unpadded) 5x5 conv and pool still give >= 1 pixel.
LENET_MIN_IMAGE_SIZE = 12


def lenet_feature_size(image_size: int) -> int:
    """Spatial side after conv1 (pad 2) -> pool 2 -> conv2 (5x5, no pad) -> pool 2."""
    return (image_size // 2 - 4) // 2


class LeNet5(nn.Module):
    """conv(in, 6, 5, pad 2)-[BN]-ReLU-MaxPool, conv(6, 16, 5)-[BN]-ReLU-MaxPool, fc 120-84-num_classes.

    The flatten size is computed from ``image_size``, so the model only accepts that input size.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
        image_size: square input side (>= 12 for LeNet-5).
        width: multiplier for all hidden widths (6, 16, 120, 84).
        batchnorm: add ``BatchNorm2d`` after each conv (convs then have no bias); else ``bn1``/``bn2``
            are ``nn.Identity``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0, batchnorm: bool = True) -> None:
        super().__init__()
        check_model_args(num_classes, in_channels, image_size, width, min_image_size=LENET_MIN_IMAGE_SIZE)
        self.width = width
        self.image_size = image_size
        c1, c2, f1, f2 = (scale_channels(c, width) for c in (6, 16, 120, 84))
        side = lenet_feature_size(image_size)

        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2, bias=not batchnorm)
        self.bn1: nn.Module = nn.BatchNorm2d(c1) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5, bias=not batchnorm)
        self.bn2: nn.Module = nn.BatchNorm2d(c2) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
