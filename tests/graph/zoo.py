"""Small models covering the structures that channel removal must handle.

Each entry of :data:`ZOO` is ``name -> (builder, input_shape)``; the builders take no arguments and
return a model with randomly initialised weights and non-trivial BatchNorm statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunequant.models import LeNet5, MobileNetV2, VGGSmall, resnet20


def cbr(i: int, o: int, k: int = 3, s: int = 1, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)  # one module called three times, as in torchvision
        self.down = None
        if stride != 1 or inp != out:
            self.down = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(self.conv1(x)))
        o = self.relu(self.bn2(self.conv2(o)))
        o = self.bn3(self.conv3(o))
        idt = x if self.down is None else self.down(x)
        return self.relu(o + idt)


class BottleneckNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layer1 = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 8))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, 2), Bottleneck(64, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActBlock(nn.Module):
    def __init__(self, inp: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or inp != planes:
            self.shortcut = nn.Conv2d(inp, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(16, 16), PreActBlock(16, 32, 2), PreActBlock(32, 32))
        self.bn = nn.BatchNorm2d(32)
        self.linear = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


class DenseBlockNet(nn.Module):
    """DenseNet-style: every layer sees the concatenation of all earlier outputs (post-activation)."""

    def __init__(self, c0: int = 12, growth: int = 8, n: int = 3):
        super().__init__()
        self.stem = cbr(3, c0)
        self.layers = nn.ModuleList()
        c = c0
        for _ in range(n):
            self.layers.append(nn.Sequential(nn.Conv2d(c, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                             nn.Conv2d(16, growth, 3, 1, 1, bias=False),
                                             nn.BatchNorm2d(growth), nn.ReLU()))
            c += growth
        self.trans = cbr(c, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        x = self.trans(torch.cat(feats, 1))
        x = F.max_pool2d(x, 2)
        return self.fc(x.reshape(x.shape[0], -1))


class UNet(nn.Module):
    """Two-level U-Net: skip concatenations, a transposed-conv and an upsampling decoder."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Sequential(cbr(3, 12), cbr(12, 12))
        self.e2 = nn.Sequential(cbr(12, 16), cbr(16, 16))
        self.mid = cbr(16, 24)
        self.up2 = nn.ConvTranspose2d(24, 16, 2, 2)
        self.d2 = nn.Sequential(cbr(32, 16), cbr(16, 16))
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d1 = nn.Sequential(cbr(16 + 12, 12), cbr(12, 12))
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.d1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class ESPCN(nn.Module):
    """ESPCN x3 (Shi et al.): tanh features, sub-pixel convolution at the end."""

    def __init__(self, r: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, 1, 2)
        self.conv2 = nn.Conv2d(32, 16, 3, 1, 1)
        self.conv3 = nn.Conv2d(16, r * r, 3, 1, 1)
        self.ps = nn.PixelShuffle(r)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return torch.sigmoid(self.ps(self.conv3(x)))


class SRUpsampler(nn.Module):
    """EDSR-style upsampling: conv -> PixelShuffle -> PReLU (producer side), plus a PixelShuffle and a
    PixelUnshuffle on the consumer side."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, 1, 1)
        self.act = nn.PReLU(16)
        self.up = nn.Conv2d(16, 16 * 4, 3, 1, 1)
        self.ps = nn.PixelShuffle(2)
        self.act2 = nn.PReLU(16)
        self.mid = nn.Conv2d(16, 32, 3, 1, 1)
        self.ps2 = nn.PixelShuffle(2)
        self.body = nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.PixelUnshuffle(2)
        self.tail = nn.Conv2d(32, 3, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.head(x))
        x = self.act2(self.ps(self.up(x)))
        y = torch.relu(self.mid(x))
        z = torch.relu(self.body(self.ps2(y)))
        return self.tail(self.down(z))


class DCGANGenerator(nn.Module):
    def __init__(self, nz: int = 16, ngf: int = 8):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class SplitNet(nn.Module):
    """Channels split with chunk, split (uneven) and slicing, then concatenated again."""

    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 16)
        self.a = cbr(8, 8)
        self.b = cbr(8, 8)
        self.c2 = cbr(16, 24)
        self.d = cbr(8, 8)
        self.e = cbr(16, 8)
        self.c3 = cbr(16, 12)
        self.f = cbr(4, 6)
        self.g = cbr(8, 6)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c1(x)
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([self.a(a), self.b(b)], dim=1)
        x = self.c2(x)
        d, e = x.split([8, 16], dim=1)
        x = torch.cat([self.d(d), self.e(e)], 1)
        x = self.c3(x)
        x = torch.cat([self.f(x[:, :4]), self.g(x[:, 4:])], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class GroupedSENet(nn.Module):
    """ResNeXt-style grouped conv, squeeze-excitation gates, GroupNorm, InstanceNorm and SiLU."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.reduce = cbr(16, 32, 1)
        self.grouped = cbr(32, 32, 3, 1, 4)
        self.se = SE(32)
        self.proj = nn.Conv2d(32, 24, 1, bias=False)
        self.gn = nn.GroupNorm(4, 24)
        self.act = nn.SiLU()
        self.inorm = nn.Sequential(nn.Conv2d(24, 16, 3, 1, 1), nn.InstanceNorm2d(16, affine=True), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.se(self.grouped(self.reduce(x)))
        x = self.act(self.gn(self.proj(x)))
        x = self.inorm(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: depthwise convs without activation, channel split / concat / shuffle."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        b_in = inp if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(b_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=True), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 12)
        self.stages = nn.Sequential(ShuffleBlock(12, 24, 2), ShuffleBlock(24, 24, 1), ShuffleBlock(24, 32, 2))
        self.head = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, 10, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.fc1(x))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.fc3(x)


ZOO: dict[str, tuple] = {
    "resnet20": (lambda: resnet20(width=0.5), (2, 3, 16, 16)),
    "vgg_small": (lambda: VGGSmall(width=0.125), (2, 3, 16, 16)),
    "mobilenetv2": (lambda: MobileNetV2(width=0.25), (2, 3, 16, 16)),
    "lenet5": (lambda: LeNet5(width=1.0), (2, 3, 32, 32)),
    "bottleneck": (BottleneckNet, (2, 3, 16, 16)),
    "preact_resnet": (PreActResNet, (2, 3, 16, 16)),
    "densenet_block": (DenseBlockNet, (2, 3, 8, 8)),
    "unet": (UNet, (2, 3, 16, 16)),
    "espcn": (ESPCN, (2, 1, 12, 12)),
    "sr_upsampler": (SRUpsampler, (2, 3, 8, 8)),
    "dcgan": (DCGANGenerator, (2, 16, 1, 1)),
    "split": (SplitNet, (2, 3, 12, 12)),
    "grouped_se": (GroupedSENet, (2, 3, 12, 12)),
    "shufflenet": (ShuffleNet, (2, 3, 16, 16)),
    "mlp": (MLP, (4, 20)),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters so that removal errors would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.1 + 0.3 * torch.rand(m.weight.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model
