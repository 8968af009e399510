"""Model zoo: CIFAR ResNets, VGG-small, MobileNetV2 and LeNet-5, all torch.fx traceable."""

from .lenet import LeNet5
from .mobilenetv2 import InvertedResidual, MobileNetV2
from .registry import MODEL_NAMES, build_model
from .resnet import BasicBlock, ResNetCifar, resnet20, resnet32, resnet56
from .vgg import VGGSmall

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV2",
    "ResNetCifar",
    "VGGSmall",
    "build_model",
    "resnet20",
    "resnet32",
    "resnet56",
]
