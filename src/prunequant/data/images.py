"""Image-restoration data: super-resolution and denoising on the natural RGB photographs shipped with
scikit-image (``skimage.data``) and scikit-learn (``sklearn.datasets.load_sample_images``).

Nothing is ever downloaded: an image is read only from the files bundled with the installed package
(:func:`load_image`; an image whose file is absent raises :class:`ImageUnavailable` and is skipped
by the loaders, which record the names they really used).

**The split is by image**, fixed and documented here, so that no photograph contributes crops to
both sides: :data:`TRAIN_IMAGES` (random patches), :data:`VAL_IMAGES` and :data:`TEST_IMAGES` (whole
images). ``skimage.data.cat`` is the same photograph as ``chelsea`` and the right view of the stereo
pair is the same scene as the left one; both are left out (:data:`EXCLUDED_IMAGES`).

**Degradation (super-resolution).** The high-resolution (HR) RGB image, in [0, 1], is cropped to a
multiple of the scale ("modcrop") and downscaled by ``torch.nn.functional.interpolate(mode="bicubic",
antialias=True, align_corners=False)`` (Keys a = -0.5 with a widened kernel when shrinking, as PIL's
``BICUBIC`` and close to MATLAB's ``imresize``); the low-resolution (LR) RGB image is clamped to [0, 1]
and rounded to 8 bits, as a stored LR PNG would be. Model input and target are the luminance Y of
BT.601 YCbCr (:func:`prunequant.metrics.image.rgb_to_y`), ``[1, h, w]`` and ``[1, h*scale,
w*scale]``. The bicubic reference upscales the LR Y with the same function (:func:`bicubic_upscale`).
Training patches are aligned crops of the whole-image LR / HR pair (the LR image is computed once per
image, so patches see the same degradation as the test images).

**Degradation (denoising).** ``noisy = clean + sigma * N(0, 1)`` (not clipped), ``sigma = 25/255`` by
default, on RGB or on Y. Test / validation noise is fixed: image ``i`` of a set uses a NumPy
``default_rng([seed, i])``; training noise and crops use ``default_rng([seed, epoch, index])``.

**Training patches** are deterministic given ``seed`` (and :meth:`set_epoch`): an item picks a training
image uniformly (each image weighs the same whatever its size), then a position uniformly, then one of
the 8 flips / 90-degree rotations when ``augment`` is on.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..metrics.image import psnr, rgb_to_y, ssim
from .errors import DatasetError

__all__ = [
    "DEFAULT_SIGMA",
    "EXCLUDED_IMAGES",
    "IMAGE_SOURCES",
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "VAL_IMAGES",
    "DenoiseImageDataset",
    "DenoisePatchDataset",
    "ImageUnavailable",
    "RestorationBundle",
    "SRImageDataset",
    "SRPatchDataset",
    "available_images",
    "bicubic_baseline",
    "bicubic_downscale",
    "bicubic_upscale",
    "degrade_sr",
    "evaluate_restoration",
    "load_denoising",
    "load_image",
    "load_super_resolution",
    "modcrop",
]

#: Training images (random patches): natural photographs plus three scientific RGB photographs
#: (a Hubble deep field, an immunohistochemistry slide, a retina fundus image) for texture variety.
TRAIN_IMAGES: tuple[str, ...] = (
    "chelsea", "china", "motorcycle_left", "hubble_deep_field", "immunohistochemistry", "retina",
)  # fmt: skip
#: Validation image (whole image; model selection, early stopping).
VAL_IMAGES: tuple[str, ...] = ("rocket",)
#: Held-out test images (whole images; never seen in training or validation).
TEST_IMAGES: tuple[str, ...] = ("astronaut", "coffee", "flower")

#: name -> (package, loader, bundled file name): where each image comes from.
IMAGE_SOURCES: dict[str, tuple[str, str, str]] = {
    "astronaut": ("skimage", "astronaut", "astronaut.png"),
    "chelsea": ("skimage", "chelsea", "chelsea.png"),
    "coffee": ("skimage", "coffee", "coffee.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field", "hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "immunohistochemistry", "ihc.png"),
    "motorcycle_left": ("skimage", "stereo_motorcycle", "motorcycle_left.png"),
    "retina": ("skimage", "retina", "retina.jpg"),
    "rocket": ("skimage", "rocket", "rocket.jpg"),
    "china": ("sklearn", "load_sample_image", "china.jpg"),
    "flower": ("sklearn", "load_sample_image", "flower.jpg"),
}

#: skimage.data images deliberately not used, and why.
EXCLUDED_IMAGES: dict[str, str] = {
    "cat": "the same photograph as chelsea",
    "motorcycle_right": "the right view of the motorcycle_left stereo pair (same scene)",
    "colorwheel": "synthetic",
    "logo": "synthetic RGBA",
    "lily, kidney, skin, eagle, brain, cells3d, ...": "need a download (pooch); never fetched",
    "camera, moon, coins, brick, grass, gravel, ...": "grayscale",
}

#: Denoising noise level (in [0, 1] pixel units): 25 of 255.
DEFAULT_SIGMA = 25.0 / 255.0


class ImageUnavailable(DatasetError):
    """The image's file is not bundled with the installed package (it would need a download)."""


# ------------------------------------------------------------------------------------------ images


def _bundled_path(package: str, fname: str) -> str:
    if package == "skimage":
        import skimage.data

        return os.path.join(os.path.dirname(skimage.data.__file__), fname)
    import sklearn.datasets

    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", fname)


@functools.cache
def load_image(name: str) -> np.ndarray:
    """The image ``name`` of :data:`IMAGE_SOURCES` as a read-only uint8 array ``[H, W, 3]``.

    Raises :class:`ImageUnavailable` when its file is not bundled with the installed package (it is
    never downloaded) or the loader fails, :class:`DatasetError` for an unknown name."""
    if name not in IMAGE_SOURCES:
        raise DatasetError(f"unknown image {name!r}; known: {', '.join(sorted(IMAGE_SOURCES))}")
    package, loader, fname = IMAGE_SOURCES[name]
    try:
        path = _bundled_path(package, fname)
    except ImportError as exc:
        raise ImageUnavailable(f"image {name!r} needs the {package} package") from exc
    if not os.path.isfile(path):  # checked first: the skimage loaders would try to download it
        raise ImageUnavailable(f"image {name!r}: {path} is not bundled with the installed {package}")
    try:
        if package == "skimage":
            import skimage.data

            img = getattr(skimage.data, loader)()
            if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
                img = img[0]
        else:
            from sklearn.datasets import load_sample_image

            img = load_sample_image(fname)
    except Exception as exc:  # noqa: BLE001 - any loader failure means "not available here"
        raise ImageUnavailable(f"image {name!r}: {package} failed to load it ({exc})") from exc
    img = np.ascontiguousarray(np.asarray(img))
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DatasetError(f"image {name!r}: expected uint8 [H, W, 3], got {img.dtype} {img.shape}")
    img.setflags(write=False)
    return img


def available_images(names: Sequence[str] | None = None) -> dict[str, str | None]:
    """name -> ``None`` (loads) or the reason it does not, for ``names`` (default: all known)."""
    out: dict[str, str | None] = {}
    for n in names if names is not None else IMAGE_SOURCES:
        try:
            load_image(n)
            out[n] = None
        except ImageUnavailable as exc:
            out[n] = str(exc)
    return out


def _load_set(names: Sequence[str], what: str) -> tuple[list[np.ndarray], tuple[str, ...]]:
    imgs, used = [], []
    for n in names:
        try:
            imgs.append(load_image(n))
            used.append(n)
        except ImageUnavailable as exc:
            warnings.warn(f"{what} image skipped: {exc}", RuntimeWarning, stacklevel=3)
    if not imgs:
        raise DatasetError(f"none of the {what} images ({', '.join(names)}) can be loaded offline")
    return imgs, tuple(used)


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float() / 255.0


# ------------------------------------------------------------------------------------- degradation


def modcrop(x: Tensor, multiple: int) -> Tensor:
    """Crop the bottom / right of ``[..., H, W]`` so both sides are multiples of ``multiple``."""
    h, w = x.shape[-2] - x.shape[-2] % multiple, x.shape[-1] - x.shape[-1] % multiple
    return x[..., :h, :w]


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    x4 = x if x.dim() == 4 else x[None]
    out = F.interpolate(x4.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    out = out.clamp(0.0, 1.0)
    return out if x.dim() == 4 else out[0]


def bicubic_downscale(x: Tensor, scale: int) -> Tensor:
    """``[..., C, H, W]`` (H, W multiples of ``scale``) -> ``[..., C, H/scale, W/scale]``, in [0, 1]."""
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"bicubic_downscale: {h}x{w} is not a multiple of the scale {scale} (modcrop first)")
    return _resize(x, (h // scale, w // scale))


def bicubic_upscale(x: Tensor, scale: int) -> Tensor:
    """``[..., C, h, w]`` -> ``[..., C, h*scale, w*scale]`` by the same bicubic, clamped to [0, 1]."""
    return _resize(x, (x.shape[-2] * scale, x.shape[-1] * scale))


def quantize8(x: Tensor) -> Tensor:
    """Round values in [0, 1] to the 256 levels of an 8-bit image."""
    return torch.round(x * 255.0) / 255.0


def degrade_sr(hr_rgb: Tensor, scale: int) -> tuple[Tensor, Tensor]:
    """``(lr_y, hr_y)`` of an HR RGB ``[3, H, W]`` in [0, 1] (module docs: modcrop, bicubic, 8 bits, Y)."""
    hr = modcrop(hr_rgb, scale)
    lr = quantize8(bicubic_downscale(hr, scale))
    return rgb_to_y(lr), rgb_to_y(hr)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise DatasetError(f"scale must be an integer >= 2, got {scale!r}")
    return scale


def _check_channels(channels: str) -> str:
    if channels not in ("rgb", "y"):
        raise DatasetError(f"channels must be 'rgb' or 'y', got {channels!r}")
    return channels


def _dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 flips / rotations of ``[C, H, W]`` (k in 0..7; 0 is the identity)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


# ----------------------------------------------------------------------------------------- datasets


class _Patches(Dataset):
    """Seeded random patches: ``length`` per epoch; item ``i`` of epoch ``e`` uses rng ``[seed, e, i]``."""

    def __init__(self, length: int, seed: int, augment: bool) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise DatasetError(f"length (patches per epoch) must be an integer >= 1, got {length!r}")
        self.length, self.seed, self.augment, self.epoch = length, int(seed), bool(augment), 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still seeded) set of patches for ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return np.random.default_rng([self.seed, self.epoch, index])


class SRPatchDataset(_Patches):
    """Training patches for super-resolution: ``(lr_y [1, p, p], hr_y [1, p*scale, p*scale])``.

    ``images``: HR RGB uint8 ``[H, W, 3]``; ``patch_size``: the LR side ``p``."""

    def __init__(self, images: Sequence[np.ndarray], scale: int, patch_size: int = 32, length: int = 1024,
                 seed: int = 0, augment: bool = True) -> None:
        super().__init__(length, seed, augment)
        self.scale, self.patch_size = _check_scale(scale), int(patch_size)
        self.pairs = [degrade_sr(to_tensor(im), scale) for im in images]
        small = [tuple(lr.shape[-2:]) for lr, _ in self.pairs if min(lr.shape[-2:]) < self.patch_size]
        if small or not self.pairs:
            raise DatasetError(f"SRPatchDataset: LR patch {patch_size} larger than LR images {small}")

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng, p, s = self._rng(index), self.patch_size, self.scale
        lr, hr = self.pairs[int(rng.integers(len(self.pairs)))]
        y = int(rng.integers(lr.shape[-2] - p + 1))
        x = int(rng.integers(lr.shape[-1] - p + 1))
        lo, hi = lr[:, y:y + p, x:x + p], hr[:, y * s:(y + p) * s, x * s:(x + p) * s]
        if self.augment:
            k = int(rng.integers(8))
            lo, hi = _dihedral(lo, k), _dihedral(hi, k)
        return lo.contiguous(), hi.contiguous()


class SRImageDataset(Dataset):
    """Whole images for evaluation: ``(lr_y [1, h, w], hr_y [1, h*scale, w*scale])``, HR modcropped.

    Sizes differ between images: use batch size 1. ``names[i]`` names item ``i``."""

    def __init__(self, images: Sequence[np.ndarray], names: Sequence[str], scale: int) -> None:
        self.scale, self.names = _check_scale(scale), tuple(names)
        self.pairs = [degrade_sr(to_tensor(im), scale) for im in images]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.pairs[index]


def _clean(img: np.ndarray, channels: str) -> Tensor:
    t = to_tensor(img)
    return rgb_to_y(t) if channels == "y" else t


class DenoisePatchDataset(_Patches):
    """Training patches for denoising: ``(noisy [C, p, p], clean [C, p, p])``, C = 3 (rgb) or 1 (y)."""

    def __init__(self, images: Sequence[np.ndarray], sigma: float = DEFAULT_SIGMA, channels: str = "rgb",
                 patch_size: int = 64, length: int = 1024, seed: int = 0, augment: bool = True) -> None:
        super().__init__(length, seed, augment)
        self.sigma, self.channels, self.patch_size = float(sigma), _check_channels(channels), int(patch_size)
        self.clean = [_clean(im, channels) for im in images]
        if not self.clean or any(min(c.shape[-2:]) < self.patch_size for c in self.clean):
            raise DatasetError(f"DenoisePatchDataset: patch {patch_size} larger than an image")

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rng, p = self._rng(index), self.patch_size
        img = self.clean[int(rng.integers(len(self.clean)))]
        y, x = int(rng.integers(img.shape[-2] - p + 1)), int(rng.integers(img.shape[-1] - p + 1))
        clean = img[:, y:y + p, x:x + p]
        if self.augment:
            clean = _dihedral(clean, int(rng.integers(8)))
        noise = torch.from_numpy(rng.standard_normal(clean.shape, dtype=np.float32))
        return clean + self.sigma * noise, clean.contiguous()


class DenoiseImageDataset(Dataset):
    """Whole images for evaluation: ``(noisy, clean)``, cropped to a multiple of ``multiple`` (U-Net
    levels); the noise of image ``i`` is fixed by ``default_rng([seed, i])``."""

    def __init__(self, images: Sequence[np.ndarray], names: Sequence[str], sigma: float = DEFAULT_SIGMA,
                 channels: str = "rgb", seed: int = 0, multiple: int = 8) -> None:
        self.names, self.sigma, self.channels = tuple(names), float(sigma), _check_channels(channels)
        self.items = []
        for i, im in enumerate(images):
            clean = modcrop(_clean(im, channels), multiple)
            noise = np.random.default_rng([int(seed), i]).standard_normal(clean.shape, dtype=np.float32)
            self.items.append((clean + self.sigma * torch.from_numpy(noise), clean))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.items[index]


# ------------------------------------------------------------------------------------------ bundles


@dataclass
class RestorationBundle:
    """Train / val / test sets of an image-restoration task (``DataBundle`` is for classification: it
    has class counts and one image size, these have targets that are images of varying size)."""

    train: Dataset  # random patches (SRPatchDataset / DenoisePatchDataset)
    val: Dataset  # whole images
    test: Dataset  # whole images
    task: str  # "sr" or "denoise"
    in_channels: int  # model input channels (1 for Y, 3 for RGB)
    scale: int  # SR factor (1 for denoising)
    border: int  # pixels cut off each side before PSNR / SSIM (scale for SR, 0 for denoising)
    sigma: float  # noise level (0 for SR)
    train_images: tuple[str, ...] = field(default_factory=tuple)  # the images really used
    val_images: tuple[str, ...] = field(default_factory=tuple)
    test_images: tuple[str, ...] = field(default_factory=tuple)
    degradation: str = ""
    name: str = ""  # the run's data.name (sr_images / denoise_images), set by the trainer's task


def load_super_resolution(scale: int = 2, patch_size: int = 32, patches_per_epoch: int = 1024,
                          seed: int = 0, augment: bool = True) -> RestorationBundle:
    """Super-resolution x``scale`` on Y: seeded LR patches of side ``patch_size`` from :data:`TRAIN_IMAGES`,
    whole :data:`VAL_IMAGES` / :data:`TEST_IMAGES` (module docs for the degradation)."""
    _check_scale(scale)
    tr, tr_n = _load_set(TRAIN_IMAGES, "training")
    va, va_n = _load_set(VAL_IMAGES, "validation")
    te, te_n = _load_set(TEST_IMAGES, "test")
    return RestorationBundle(
        train=SRPatchDataset(tr, scale, patch_size, patches_per_epoch, seed, augment),
        val=SRImageDataset(va, va_n, scale), test=SRImageDataset(te, te_n, scale),
        task="sr", in_channels=1, scale=scale, border=scale, sigma=0.0,
        train_images=tr_n, val_images=va_n, test_images=te_n,
        degradation=f"x{scale} bicubic (torch, antialias) of the modcropped RGB, 8-bit LR, BT.601 Y",
    )


def load_denoising(sigma: float = DEFAULT_SIGMA, channels: str = "rgb", patch_size: int = 64,
                   patches_per_epoch: int = 1024, seed: int = 0, augment: bool = True,
                   test_seed: int = 0) -> RestorationBundle:
    """Gaussian denoising (``sigma`` in [0, 1] units) on RGB or Y; test / val noise fixed by ``test_seed``."""
    _check_channels(channels)
    tr, tr_n = _load_set(TRAIN_IMAGES, "training")
    va, va_n = _load_set(VAL_IMAGES, "validation")
    te, te_n = _load_set(TEST_IMAGES, "test")
    return RestorationBundle(
        train=DenoisePatchDataset(tr, sigma, channels, patch_size, patches_per_epoch, seed, augment),
        val=DenoiseImageDataset(va, va_n, sigma, channels, seed=test_seed + 1),
        test=DenoiseImageDataset(te, te_n, sigma, channels, seed=test_seed),
        task="denoise", in_channels=3 if channels == "rgb" else 1, scale=1, border=0, sigma=float(sigma),
        train_images=tr_n, val_images=va_n, test_images=te_n,
        degradation=f"additive Gaussian noise sigma {sigma * 255:g}/255 on {channels}, not clipped",
    )


# -------------------------------------------------------------------------------------- evaluation


def evaluate_restoration(predict: Callable[[Tensor], Tensor], dataset: Dataset, border: int = 0,
                         clamp: bool = True) -> dict[str, object]:
    """Mean PSNR / SSIM of ``predict(input[None])[0]`` against the targets of a whole-image set.

    ``border``: pixels cut off each side (the scale for SR). ``clamp``: clamp predictions to [0, 1].
    Returns ``{"psnr": mean, "ssim": mean, "per_image": {name: (psnr, ssim)}}``."""
    names = getattr(dataset, "names", None)
    per: dict[str, tuple[float, float]] = {}
    for i in range(len(dataset)):  # type: ignore[arg-type]
        x, target = dataset[i]
        with torch.no_grad():
            out = predict(x[None])[0].to(target.dtype)
        if clamp:
            out = out.clamp(0.0, 1.0)
        name = names[i] if names is not None else str(i)
        per[name] = (float(psnr(out, target, border)), float(ssim(out, target, border)))
    vals = list(per.values())
    return {"psnr": float(np.mean([v[0] for v in vals])), "ssim": float(np.mean([v[1] for v in vals])),
            "per_image": per}


def bicubic_baseline(dataset: SRImageDataset) -> dict[str, object]:
    """The bicubic reference row: :func:`evaluate_restoration` of :func:`bicubic_upscale`, border = scale."""
    return evaluate_restoration(lambda x: bicubic_upscale(x, dataset.scale), dataset, border=dataset.scale)
