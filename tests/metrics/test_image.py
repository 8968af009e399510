"""PSNR / SSIM / BT.601 luminance against scikit-image and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from prunequant.data.images import bicubic_upscale, degrade_sr, load_image, to_tensor
from prunequant.metrics.image import gaussian_window, psnr, rgb_to_y, rgb_to_ycbcr, ssim


def _sk_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None = None) -> float:
    return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=1.0, channel_axis=channel_axis))


def _noisy_pair(seed: int, shape: tuple[int, ...], noise: float) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    a = g.random(shape)
    return a, np.clip(a + noise * g.standard_normal(shape), 0.0, 1.0)


# ------------------------------------------------------------------------------------------- colour
def test_bt601_known_values() -> None:
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                        [0.5, 0.5, 0.5]], dtype=torch.float64).T[:, None, :]  # [3, 1, 6]
    ycc = rgb_to_ycbcr(rgb)[:, 0, :] * 255.0
    y, cb, cr = ycc
    want_y = [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 0.5 * 219.0]
    assert torch.allclose(y, torch.tensor(want_y, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(cb[[0, 1, 5]], torch.full((3,), 128.0, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(cr[[0, 1, 5]], torch.full((3,), 128.0, dtype=torch.float64), atol=1e-9)
    assert cb[4] == pytest.approx(128 + 112.0) and cr[2] == pytest.approx(128 + 112.0)
    assert torch.equal(rgb_to_y(rgb), rgb_to_ycbcr(rgb)[:1])


def test_ycbcr_matches_skimage_on_a_real_image() -> None:
    img = load_image("astronaut")[:64, :64]
    ours = rgb_to_ycbcr(to_tensor(img).double()).permute(1, 2, 0).numpy() * 255.0
    np.testing.assert_allclose(ours, rgb2ycbcr(img.astype(np.float64) / 255.0), atol=1e-9)


def test_rgb_to_y_shapes_and_errors() -> None:
    assert rgb_to_y(torch.rand(2, 3, 5, 7)).shape == (2, 1, 5, 7)
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_y(torch.rand(1, 5, 7))


# --------------------------------------------------------------------------------------------- PSNR
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("noise", [0.01, 0.1, 0.3])
def test_psnr_matches_skimage_random(seed: int, noise: float) -> None:
    a, b = _noisy_pair(seed, (3, 37, 41), noise)
    ours = float(psnr(torch.from_numpy(b), torch.from_numpy(a)))
    assert ours == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)


@pytest.mark.parametrize("scale", [2, 3])
def test_psnr_ssim_match_skimage_on_real_y_with_border(scale: int) -> None:
    lr, hr = degrade_sr(to_tensor(load_image("coffee")[:120, :150]), scale)
    sr = bicubic_upscale(lr, scale)
    a = hr[0, scale:-scale, scale:-scale].double().numpy()
    b = sr[0, scale:-scale, scale:-scale].double().numpy()
    assert float(psnr(sr, hr, border=scale)) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0),
                                                              abs=1e-4)
    assert float(ssim(sr, hr, border=scale)) == pytest.approx(_sk_ssim(a, b), abs=1e-4)


def test_psnr_batch_and_known_value() -> None:
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    out = psnr(y, x)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(20.0) and math.isinf(out[1].item())
    assert psnr(y[0, 0] * 255, x[0, 0], data_range=255.0).item() == pytest.approx(20.0)  # 8-bit units


def test_border_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.rand(1, 4, 4), torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="border"):
        psnr(torch.rand(1, 4, 4), torch.rand(1, 4, 4), border=2)
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 10, 20), torch.rand(1, 10, 20))


# --------------------------------------------------------------------------------------------- SSIM
def test_gaussian_window() -> None:
    w = gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max() and torch.allclose(w, w.T)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("noise", [0.02, 0.1, 0.4])
def test_ssim_matches_skimage_random_gray(seed: int, noise: float) -> None:
    a, b = _noisy_pair(seed, (33, 47), noise)
    assert float(ssim(torch.from_numpy(b), torch.from_numpy(a))) == pytest.approx(_sk_ssim(b, a), abs=1e-4)


def test_ssim_matches_skimage_random_rgb_batch() -> None:
    a, b = _noisy_pair(7, (2, 3, 30, 30), 0.1)
    ours = ssim(torch.from_numpy(b), torch.from_numpy(a))
    assert ours.shape == (2,)
    for i in range(2):
        assert ours[i].item() == pytest.approx(_sk_ssim(b[i], a[i], channel_axis=0), abs=1e-4)


def test_ssim_matches_skimage_on_real_rgb() -> None:
    clean = to_tensor(load_image("chelsea")[:80, :96]).double()
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)).clamp(0, 1)
    want = _sk_ssim(noisy.numpy(), clean.numpy(), channel_axis=0)
    assert ssim(noisy, clean).item() == pytest.approx(want, abs=1e-4)


_IMAGES = st.integers(0, 2**31 - 1).map(
    lambda s: torch.rand(1, 12, 14, generator=torch.Generator().manual_seed(s)))


@settings(max_examples=25, deadline=None)
@given(img=_IMAGES)
def test_identical_images(img: torch.Tensor) -> None:
    assert math.isinf(psnr(img, img).item()) and psnr(img, img).item() > 0
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(a=_IMAGES, b=_IMAGES)
def test_ssim_symmetric_and_bounded(a: torch.Tensor, b: torch.Tensor) -> None:
    s = ssim(a, b).item()
    assert s == pytest.approx(ssim(b, a).item(), abs=1e-12)
    assert -1.0 <= s <= 1.0 + 1e-12
    assert psnr(a, b).item() == pytest.approx(psnr(b, a).item())
