"""Image-restoration metrics with the conventions of the super-resolution literature.

* Colour: :func:`rgb_to_ycbcr` / :func:`rgb_to_y` are ITU-R BT.601 "studio swing" as MATLAB's
  ``rgb2ycbcr`` computes it, for RGB in [0, 1]: ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255``
  (Y in [16/255, 235/255]); the result is not rounded to 8 bits (the BasicSR / EDSR evaluation code).
* :func:`psnr`: ``10 log10(data_range**2 / MSE)``, the MSE over each image's channels and pixels after
  cutting ``border`` pixels off every side (SR evaluation: ``border = scale``). Identical images give
  ``inf``.
* :func:`ssim`: Wang et al. 2004, an 11x11 Gaussian window (sigma 1.5, truncated at radius 5),
  K1 = 0.01, K2 = 0.03, population (not sample) covariances, the SSIM map over the "valid" window
  positions only, averaged over channels and pixels. This is ``skimage.metrics.structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=...)`` and the original
  MATLAB ``ssim_index``.

Inputs are tensors ``[H, W]``, ``[C, H, W]`` or ``[N, C, H, W]``; the metrics return one value per
image (a 0-d tensor, or ``[N]``), computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_window", "psnr", "rgb_to_y", "rgb_to_ycbcr", "ssim"]

#: BT.601 RGB -> YCbCr for RGB in [0, 1] (rows: Y, Cb, Cr; MATLAB ``rgb2ycbcr``), and the offsets.
_YCBCR_MATRIX = (
    (65.481, 128.553, 24.966),
    (-37.797, -74.203, 112.0),
    (112.0, -93.786, -18.214),
)
_YCBCR_OFFSET = (16.0, 128.0, 128.0)


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """BT.601 YCbCr (MATLAB ``rgb2ycbcr``) of RGB in [0, 1], channels on dim -3; output in [0, 1] units."""
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_ycbcr: expected RGB on dim -3 ([..., 3, H, W]), got {tuple(rgb.shape)}")
    m = torch.tensor(_YCBCR_MATRIX, dtype=rgb.dtype, device=rgb.device) / 255.0
    off = torch.tensor(_YCBCR_OFFSET, dtype=rgb.dtype, device=rgb.device) / 255.0
    return torch.einsum("ij,...jhw->...ihw", m, rgb) + off[:, None, None]


def rgb_to_y(rgb: Tensor) -> Tensor:
    """The luminance Y of :func:`rgb_to_ycbcr`, keeping a channel dim of size 1 (``[..., 1, H, W]``)."""
    return rgb_to_ycbcr(rgb)[..., :1, :, :]


def _as_nchw(x: Tensor, name: str) -> Tensor:
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    if x.dim() == 4:
        return x
    raise ValueError(f"{name}: expected [H, W], [C, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")


def _prepare(pred: Tensor, target: Tensor, border: int, fn: str) -> tuple[Tensor, Tensor, bool]:
    if pred.shape != target.shape:
        raise ValueError(f"{fn}: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if isinstance(border, bool) or not isinstance(border, int) or border < 0:
        raise ValueError(f"{fn}: border must be an integer >= 0, got {border!r}")
    batched = pred.dim() == 4
    p, t = _as_nchw(pred, fn).double(), _as_nchw(target, fn).double()
    if border:
        if min(p.shape[-2:]) <= 2 * border:
            raise ValueError(f"{fn}: a border of {border} leaves nothing of a {tuple(p.shape[-2:])} image")
        p = p[..., border:-border, border:-border]
        t = t[..., border:-border, border:-border]
    return p, t, batched


def psnr(pred: Tensor, target: Tensor, border: int = 0, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, after cutting ``border`` pixels off each side.

    ``inf`` where the images are identical (no clamping or epsilon)."""
    p, t, batched = _prepare(pred, target, border, "psnr")
    mse = (p - t).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(float(data_range) ** 2 / mse)  # mse 0 -> inf
    return out if batched else out[0]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalized ``size x size`` Gaussian window (outer product of the 1-D kernel)."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: Tensor, target: Tensor, border: int = 0, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image; see the module docs for the conventions."""
    p, t, batched = _prepare(pred, target, border, "ssim")
    if min(p.shape[-2:]) < window:
        raise ValueError(f"ssim: the image ({tuple(p.shape[-2:])} after the border) is smaller than the "
                         f"{window}x{window} window")
    c = p.shape[1]
    w = gaussian_window(window, sigma).to(p.device)[None, None].expand(c, 1, window, window)

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, w, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_p, mu_t = filt(p), filt(t)
    var_p = filt(p * p) - mu_p * mu_p
    var_t = filt(t * t) - mu_t * mu_t
    cov = filt(p * t) - mu_p * mu_t
    num = (2 * mu_p * mu_t + c1) * (2 * cov + c2)
    den = (mu_p * mu_p + mu_t * mu_t + c1) * (var_p + var_t + c2)
    out = (num / den).flatten(1).mean(1)
    return out if batched else out[0]
