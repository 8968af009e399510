"""The image-restoration data: offline images, the split by image, degradations, seeded patches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunequant.data import DatasetError
from prunequant.data import images as im
from prunequant.data.images import (
    EXCLUDED_IMAGES,
    IMAGE_SOURCES,
    TEST_IMAGES,
    TRAIN_IMAGES,
    VAL_IMAGES,
    DenoiseImageDataset,
    DenoisePatchDataset,
    ImageUnavailable,
    SRImageDataset,
    SRPatchDataset,
    available_images,
    bicubic_baseline,
    bicubic_downscale,
    bicubic_upscale,
    load_denoising,
    load_image,
    load_super_resolution,
    modcrop,
)


@pytest.fixture(scope="module")
def sr2():
    return load_super_resolution(2, patch_size=16, patches_per_epoch=16)


@pytest.fixture(scope="module")
def sr3():
    return load_super_resolution(3, patch_size=12, patches_per_epoch=16)


# ------------------------------------------------------------------------------------ images, split
def test_split_is_by_image_and_disjoint() -> None:
    train, val, test = set(TRAIN_IMAGES), set(VAL_IMAGES), set(TEST_IMAGES)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(IMAGE_SOURCES)
    assert len(train) == len(TRAIN_IMAGES) and len(test) == len(TEST_IMAGES)
    assert "cat" not in IMAGE_SOURCES and "cat" in EXCLUDED_IMAGES  # cat is chelsea


def test_every_image_loads_offline() -> None:
    status = available_images()
    assert status == {n: None for n in IMAGE_SOURCES}, status
    for n in IMAGE_SOURCES:
        img = load_image(n)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 300
        assert not img.flags.writeable
    assert not np.array_equal(load_image("china"), load_image("flower"))


def test_missing_file_is_never_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    import skimage.data

    def boom() -> None:
        raise AssertionError("the skimage loader must not be called for an absent file")

    monkeypatch.setattr(skimage.data, "astronaut", boom)
    monkeypatch.setattr(im, "_bundled_path", lambda package, fname: "/nonexistent/" + fname)
    with pytest.raises(ImageUnavailable, match="not bundled"):
        load_image.__wrapped__("astronaut")  # bypass the cache
    with pytest.raises(DatasetError, match="unknown image"):
        load_image("lena")


def test_unavailable_images_are_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    real = im.load_image

    def fake(name: str) -> np.ndarray:
        if name == "coffee":
            raise ImageUnavailable("coffee: gone")
        return real(name)

    monkeypatch.setattr(im, "load_image", fake)
    with pytest.warns(RuntimeWarning, match="coffee: gone"):
        imgs, used = im._load_set(TEST_IMAGES, "test")
    assert used == tuple(n for n in TEST_IMAGES if n != "coffee") and len(imgs) == len(used)
    monkeypatch.setattr(im, "load_image", lambda name: fake("coffee"))
    with pytest.raises(DatasetError, match="none of the test images"), pytest.warns(RuntimeWarning):
        im._load_set(TEST_IMAGES, "test")


# -------------------------------------------------------------------------------------- degradation
def test_bicubic_resize_shapes_and_constants() -> None:
    x = torch.full((3, 12, 18), 0.4)
    assert torch.allclose(bicubic_downscale(x, 3), torch.full((3, 4, 6), 0.4), atol=1e-6)
    assert bicubic_upscale(torch.rand(2, 1, 5, 7), 3).shape == (2, 1, 15, 21)
    up = bicubic_upscale(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), 4)
    assert up.min() >= 0 and up.max() <= 1  # clamped (bicubic overshoots)
    with pytest.raises(ValueError, match="multiple"):
        bicubic_downscale(torch.rand(1, 10, 10), 3)
    assert modcrop(torch.rand(1, 10, 11), 3).shape == (1, 9, 9)


def test_sr_bundle(sr2, sr3) -> None:
    for b, s in ((sr2, 2), (sr3, 3)):
        assert b.task == "sr" and b.scale == s and b.border == s and b.in_channels == 1
        assert (b.train_images, b.val_images, b.test_images) == (TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES)
        assert isinstance(b.test, SRImageDataset) and b.test.names == TEST_IMAGES
        assert len(b.train.pairs) == len(TRAIN_IMAGES)
        for lr, hr in b.test:
            assert lr.shape[0] == hr.shape[0] == 1
            assert hr.shape[-2:] == (lr.shape[-2] * s, lr.shape[-1] * s)
            assert hr.min() >= 16 / 255 - 1e-6 and hr.max() <= 235 / 255 + 1e-6  # studio-swing Y


def test_sr_test_images_are_whole_modcropped_images(sr3) -> None:
    for name, (_lr, hr) in zip(sr3.test.names, sr3.test):
        h, w = load_image(name).shape[:2]
        assert hr.shape[-2:] == (h - h % 3, w - w % 3)


@pytest.mark.parametrize("scale", [2, 3])
def test_sr_patches_are_aligned(scale: int) -> None:
    ds = SRPatchDataset([load_image("chelsea")], scale, patch_size=24, length=8, seed=3, augment=False)
    for lr, hr in ds:
        assert lr.shape == (1, 24, 24) and hr.shape == (1, 24 * scale, 24 * scale)
        inner = slice(3, -3)
        down = bicubic_downscale(hr, scale)[:, inner, inner]
        # Y of the 8-bit LR RGB vs bicubic of the HR Y: equal up to rounding; off by one pixel is far worse
        assert (down - lr[:, inner, inner]).abs().mean() < 0.004
        shifted = bicubic_downscale(hr, scale)[:, 4:-2, inner]
        assert (shifted - lr[:, inner, inner]).abs().mean() > 0.008


def test_patches_are_seeded() -> None:
    imgs = [load_image("chelsea"), load_image("china")]
    a = SRPatchDataset(imgs, 2, patch_size=16, length=6, seed=1)
    b = SRPatchDataset(imgs, 2, patch_size=16, length=6, seed=1)
    c = SRPatchDataset(imgs, 2, patch_size=16, length=6, seed=2)
    for i in range(6):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i]))
    assert any(not torch.equal(a[i][1], c[i][1]) for i in range(6))
    first = [a[i][1] for i in range(6)]
    a.set_epoch(1)
    assert any(not torch.equal(first[i], a[i][1]) for i in range(6))
    a.set_epoch(0)
    assert all(torch.equal(first[i], a[i][1]) for i in range(6))
    with pytest.raises(IndexError):
        a[6]


def test_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="scale"):
        load_super_resolution(1)
    with pytest.raises(DatasetError, match="channels"):
        load_denoising(channels="lab")
    with pytest.raises(DatasetError, match="larger"):
        SRPatchDataset([load_image("chelsea")], 2, patch_size=400)
    with pytest.raises(DatasetError, match="length"):
        DenoisePatchDataset([load_image("chelsea")], length=0)


# ---------------------------------------------------------------------------------------- denoising
@pytest.mark.parametrize("channels", ["rgb", "y"])
def test_denoise_patches(channels: str) -> None:
    ds = DenoisePatchDataset([load_image("chelsea")], channels=channels, patch_size=40, length=4, seed=0)
    c = 3 if channels == "rgb" else 1
    noise = []
    for noisy, clean in ds:
        assert noisy.shape == clean.shape == (c, 40, 40)
        noise.append(noisy - clean)
    assert torch.cat([n.flatten() for n in noise]).std().item() == pytest.approx(25 / 255, rel=0.05)
    assert torch.equal(ds[2][0], ds[2][0])


def test_denoise_test_noise_is_fixed() -> None:
    imgs, names = [load_image("astronaut"), load_image("coffee")], ("astronaut", "coffee")
    a = DenoiseImageDataset(imgs, names, seed=0)
    b = DenoiseImageDataset(imgs, names, seed=0)
    c = DenoiseImageDataset(imgs, names, seed=1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(2))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0] - a[0][1], a[1][0][:, :512, :512] - a[1][1][:, :512, :512])
    for noisy, _clean in a:
        assert noisy.shape[-1] % 8 == 0 and noisy.shape[-2] % 8 == 0


def test_denoise_bundle() -> None:
    b = load_denoising(channels="y", patch_size=32, patches_per_epoch=4)
    assert b.task == "denoise" and b.in_channels == 1 and b.border == 0 and b.sigma == pytest.approx(25 / 255)
    noisy, clean = b.test[0]
    assert noisy.shape[0] == 1 and b.test.names == TEST_IMAGES
    assert not torch.equal(b.val[0][0] - b.val[0][1], b.test[0][0][:, :8, :8])


# ----------------------------------------------------------------------------------------- baseline
def test_bicubic_baseline_on_held_out_images(sr2, sr3) -> None:
    r2, r3 = bicubic_baseline(sr2.test), bicubic_baseline(sr3.test)
    for r in (r2, r3):
        assert set(r["per_image"]) == set(TEST_IMAGES)
        assert 20.0 < r["psnr"] < 40.0 and 0.5 < r["ssim"] < 1.0
        assert all(math.isfinite(p) for p, _ in r["per_image"].values())
    assert r2["psnr"] > r3["psnr"] and r2["ssim"] > r3["ssim"]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([2, 3, 4]))
def test_bicubic_round_trip_is_close(seed: int, scale: int) -> None:
    """Smooth images survive down- and up-scaling almost unchanged (a sanity check of the pair)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bilinear", align_corners=True)[0]
    back = bicubic_upscale(bicubic_downscale(smooth, scale), scale)
    assert (back - smooth)[:, 6:-6, 6:-6].abs().mean() < 0.01
