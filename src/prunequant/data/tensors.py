"""In-memory image datasets: uint8 storage, normalization on access, optional augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

Sample = tuple[torch.Tensor, torch.Tensor]


def channel_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 ``images`` [N, C, H, W] divided by ``scale``.

    Uses a 256-bin histogram per channel, so no float copy of the data is made.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"channel_stats expects uint8 images, got {images.dtype}")
    values = np.arange(256, dtype=np.float64) / scale
    means: list[float] = []
    stds: list[float] = []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var, 1e-12) ** 0.5)
    return tuple(means), tuple(stds)


class ImageTensorDataset(Dataset):
    """Images held as a uint8 tensor [N, C, H, W]; items are ``(normalized float32 image, int64 label)``.

    A pixel value ``v`` becomes ``(v / scale - mean[c]) / std[c]``.  ``source_indices`` records, for each
    item, its position in the original file/array it came from (used to check that splits are disjoint).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 255.0,
        source_indices: np.ndarray | None = None,
    ) -> None:
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels).to(torch.int64)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        channels = self.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} entries")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = float(scale)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._mul = 1.0 / (std_t * self.scale)
        self._add = -mean_t / std_t
        if source_indices is None:
            source_indices = np.arange(len(self.labels))
        self.source_indices = np.asarray(source_indices)

    @property
    def targets(self) -> torch.Tensor:
        """All labels (int64 [N]), like torchvision's ``targets``."""
        return self.labels

    @property
    def fill_value(self) -> torch.Tensor:
        """The normalized value of a black (zero) pixel per channel, shape [C, 1, 1] (used for padding)."""
        return self._add.clone()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalize uint8 images [..., C, H, W] to float32."""
        return raw.to(torch.float32) * self._mul + self._add

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return self.normalize(self.images[index]), self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """Batched fetch used by DataLoader (one vectorized normalization per batch)."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = self.normalize(self.images[idx])
        y = self.labels[idx]
        return list(zip(x.unbind(0), y.unbind(0)))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as ``(float32 [N, C, H, W], int64 [N])``."""
        return self.normalize(self.images), self.labels

    def select(self, indices: np.ndarray) -> ImageTensorDataset:
        """A new dataset with the given rows (same normalization)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        src = self.source_indices[idx.numpy()]
        return ImageTensorDataset(self.images[idx], self.labels[idx], self.mean, self.std, self.scale, src)


class AugmentedDataset(Dataset):
    """Training-time augmentation around an :class:`ImageTensorDataset`.

    Random crop back to the original size after padding every side by ``padding`` pixels (filled with
    the normalized value of a black pixel), and a random horizontal flip with probability 0.5 when
    ``hflip``.  Randomness comes from torch's global generator, so ``torch.manual_seed`` and DataLoader
    worker seeding make it reproducible.
    """

    def __init__(self, base: ImageTensorDataset, padding: int = 4, hflip: bool = False) -> None:
        if padding < 0:
            raise ValueError("padding must be >= 0")
        self.base = base
        self.padding = int(padding)
        self.hflip = bool(hflip)

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the wrapped dataset."""
        return self.base.labels

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the wrapped dataset."""
        return self.base.labels

    @property
    def source_indices(self) -> np.ndarray:
        """Source indices of the wrapped dataset."""
        return self.base.source_indices

    def __len__(self) -> int:
        return len(self.base)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch of normalized images [B, C, H, W]."""
        b, c, h, w = x.shape
        p = self.padding
        if p > 0:
            padded = self.base.fill_value.expand(c, h + 2 * p, w + 2 * p).repeat(b, 1, 1, 1)
            padded[:, :, p : p + h, p : p + w] = x
            offsets = torch.randint(0, 2 * p + 1, (b, 2)).tolist()
            x = torch.stack([padded[k, :, i : i + h, j : j + w] for k, (i, j) in enumerate(offsets)])
        if self.hflip:
            flip = torch.rand(b) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def __getitem__(self, index: int) -> Sample:
        x, y = self.base[index]
        return self._augment(x.unsqueeze(0))[0], y

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """Batched fetch used by DataLoader."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = self._augment(self.base.normalize(self.base.images[idx]))
        return list(zip(x.unbind(0), self.base.labels[idx].unbind(0)))
