"""Model zoo: CIFAR ResNets, VGG-small, MobileNetV2 and LeNet-5; ESPCN, FSRCNN and a U-Net denoiser
(image restoration); all torch.fx traceable."""

from .lenet import LeNet5
from .mobilenetv2 import InvertedResidual, MobileNetV2
from .registry import MODEL_NAMES, RESTORATION_MODEL_NAMES, build_model, build_restoration_model
from .resnet import BasicBlock, ResNetCifar, resnet20, resnet32, resnet56
from .sr import ESPCN, FSRCNN, UNetDenoiser
from .vgg import VGGSmall

__all__ = [
    "ESPCN",
    "FSRCNN",
    "MODEL_NAMES",
    "RESTORATION_MODEL_NAMES",
    "BasicBlock",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV2",
    "ResNetCifar",
    "UNetDenoiser",
    "VGGSmall",
    "build_model",
    "build_restoration_model",
    "resnet20",
    "resnet32",
    "resnet56",
]
