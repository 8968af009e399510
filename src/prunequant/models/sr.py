"""Image-restoration models: ESPCN and FSRCNN super-resolution, a small U-Net denoiser.

All are torch.fx traceable and built so that prunequant's pruning sites (a conv followed by an
activation, every use of which reaches conv inputs) cover their hidden layers:

* :class:`ESPCN` (Shi et al. 2016) uses ReLU instead of the paper's tanh. tanh also maps 0 to 0, so
  it would prune as well; ReLU is the usual choice of reimplementations and trains faster.
* :class:`FSRCNN` (Dong et al. 2016) keeps the paper's per-channel PReLU: the graph code follows a
  per-channel PReLU as part of the producer chain (it loses the pruned channels too), so every layer
  but the last deconvolution is a site.
* :class:`UNetDenoiser`: conv-ReLU pairs, max-pool down, transposed conv + ReLU up, skip
  concatenations along channels (pruned through: a skip's channels sit at an offset of the decoder
  conv's input). It predicts the noise and returns ``x - noise`` (residual learning, as DnCNN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import init_weights, scale_channels

__all__ = ["ESPCN", "FSRCNN", "UNetDenoiser", "check_restoration_args"]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_restoration_args(scale: int, in_channels: int, width: float, min_scale: int = 2) -> None:
    """Validate the common constructor arguments, raising ``ValueError`` naming the bad argument."""
    _check_int("scale", scale, min_scale)
    _check_int("in_channels", in_channels, 1)
    if (isinstance(width, bool) or not isinstance(width, int | float) or not math.isfinite(width)
            or width <= 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")


class ESPCN(nn.Module):
    """conv5x5(in, 64)-ReLU, conv3x3(64, 32)-ReLU, conv3x3(32, in * scale**2), PixelShuffle(scale).

    Args:
        scale: upscaling factor (>= 2).
        in_channels: image channels (1: the Y channel).
        width: multiplier for the hidden widths (64, 32).
    """

    def __init__(self, scale: int = 3, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        check_restoration_args(scale, in_channels, width)
        self.scale = scale
        c1, c2 = scale_channels(64, width), scale_channels(32, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c2, in_channels * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.shuffle(self.conv3(x))


class FSRCNN(nn.Module):
    """Feature extraction conv5x5(in, d)-PReLU, shrinking conv1x1(d, s)-PReLU, ``m`` x mapping
    conv3x3(s, s)-PReLU, expanding conv1x1(s, d)-PReLU, deconvolution 9x9 (d, in) with stride = scale.

    Args:
        scale: upscaling factor (>= 2).
        in_channels: image channels (1: the Y channel).
        width: multiplier for ``d`` and ``s``.
        d, s, m: the paper's FSRCNN(d, s, m); (56, 12, 4) is FSRCNN, (32, 5, 1) FSRCNN-s.
    """

    def __init__(self, scale: int = 3, in_channels: int = 1, width: float = 1.0, d: int = 56, s: int = 12,
                 m: int = 4) -> None:
        super().__init__()
        check_restoration_args(scale, in_channels, width)
        for name, v in (("d", d), ("s", s), ("m", m)):
            _check_int(name, v, 1)
        self.scale = scale
        d, s = scale_channels(d, width), scale_channels(s, width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, d, 5, padding=2), nn.PReLU(d),
                                   nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.body = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(d, in_channels, 9, stride=scale, padding=4, output_padding=scale - 1)
        init_weights(self)
        nn.init.normal_(self.deconv.weight, std=0.001)  # the paper's deconvolution init
        nn.init.zeros_(self.deconv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(self.body(x))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNetDenoiser(nn.Module):
    """A small U-Net: ``levels`` resolutions (2 or 3), two conv3x3-ReLU per level, 2x2 max-pool down,
    2x2 stride-2 transposed conv + ReLU up, skip concatenations, a final conv1x1 predicting the noise.

    Input sides must be multiples of ``2 ** (levels - 1)``.

    Args:
        in_channels: image channels (3: RGB, 1: Y); also the output channels.
        width: multiplier for the base width 32 (doubled at each level down).
        levels: number of resolutions (2 or 3).
        residual: return ``x - net(x)`` (the net predicts the noise) instead of ``net(x)``.
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, levels: int = 3,
                 residual: bool = True) -> None:
        super().__init__()
        check_restoration_args(1, in_channels, width, min_scale=1)
        if levels not in (2, 3):
            raise ValueError(f"levels must be 2 or 3, got {levels!r}")
        self.levels, self.residual = levels, residual
        widths = [scale_channels(32 * 2**i, width) for i in range(levels)]
        self.downs = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.downs.append(_double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = _double_conv(cin, widths[-1])
        self.ups = nn.ModuleList()
        self.decs = nn.ModuleList()
        for w_hi, w in zip(widths[:0:-1], widths[-2::-1]):
            self.ups.append(nn.Sequential(nn.ConvTranspose2d(w_hi, w, 2, stride=2), nn.ReLU()))
            self.decs.append(_double_conv(2 * w, w))
        self.head = nn.Conv2d(widths[0], in_channels, 1)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        h = x
        for down in self.downs:
            h = down(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottom(h)
        for up, dec, skip in zip(self.ups, self.decs, reversed(skips)):
            h = dec(torch.cat([skip, up(h)], dim=1))
        noise = self.head(h)
        return x - noise if self.residual else noise
