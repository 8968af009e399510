"""Fashion-MNIST from idx files: tiny synthetic files, plus the real Debian package when installed."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_writers import idx_bytes, write_fashion

from prunequant.data import AugmentedDataset, DataBundle, DatasetError, load_dataset
from prunequant.data.datasets import FASHION_MNIST_DEFAULT_ROOT


def _images_as_set(ds) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in ds.images}


def test_tiny_fashion_shapes_and_normalization(fashion_dir: Path) -> None:
    b = load_dataset("fashion_mnist", root=str(fashion_dir), val_fraction=0.1, seed=0)
    assert isinstance(b, DataBundle)
    assert (b.num_classes, b.in_channels, b.image_size, b.name) == (10, 1, 28, "fashion_mnist")
    assert b.source == str(fashion_dir)
    assert (len(b.train), len(b.val), len(b.test)) == (180, 20, 50)
    x, y = b.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y) < 10
    xs, ys = b.train.tensors()
    assert abs(xs.mean().item()) < 1e-4
    assert abs(xs.std(unbiased=False).item() - 1.0) < 1e-4
    # stratified: 2 of each class in val
    assert np.bincount(b.val.labels.numpy(), minlength=10).tolist() == [2] * 10
    assert len(b.class_names) == 10


def test_val_disjoint_deterministic_and_test_untouched(fashion_dir: Path) -> None:
    arrays = write_fashion(fashion_dir.parent / "again")
    b1 = load_dataset("fashion_mnist", root=str(fashion_dir.parent / "again"), val_fraction=0.25, seed=3)
    b2 = load_dataset("fashion_mnist", root=str(fashion_dir.parent / "again"), val_fraction=0.25, seed=3)
    b3 = load_dataset("fashion_mnist", root=str(fashion_dir.parent / "again"), val_fraction=0.25, seed=4)
    tr, va = set(b1.train.source_indices.tolist()), set(b1.val.source_indices.tolist())
    assert not tr & va and len(tr | va) == 200
    assert not _images_as_set(b1.train) & _images_as_set(b1.val)
    np.testing.assert_array_equal(b1.val.source_indices, b2.val.source_indices)
    assert not np.array_equal(b1.val.source_indices, b3.val.source_indices)
    # labels follow their images; test split is the t10k files, in order
    np.testing.assert_array_equal(
        b1.val.labels.numpy(), arrays["train-labels-idx1-ubyte"][b1.val.source_indices]
    )
    np.testing.assert_array_equal(b1.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert not _images_as_set(b1.test) & (_images_as_set(b1.train) | _images_as_set(b1.val))


def test_subsets_and_zero_val(fashion_dir: Path) -> None:
    b = load_dataset("fashion_mnist", root=str(fashion_dir), train_subset=37, test_subset=11, seed=1)
    assert (len(b.train), len(b.val), len(b.test)) == (37, 20, 11)
    again = load_dataset("fashion_mnist", root=str(fashion_dir), train_subset=37, test_subset=11, seed=1)
    np.testing.assert_array_equal(b.train.source_indices, again.train.source_indices)
    assert not set(b.train.source_indices.tolist()) & set(b.val.source_indices.tolist())
    big = load_dataset("fashion_mnist", root=str(fashion_dir), train_subset=10**6, val_fraction=0.0)
    assert (len(big.train), len(big.val)) == (200, 0)
    for kw in ({"train_subset": 0}, {"test_subset": -3}):
        with pytest.raises(DatasetError, match=next(iter(kw))):
            load_dataset("fashion_mnist", root=str(fashion_dir), **kw)


def test_uncompressed_files_and_parent_root(tmp_path: Path) -> None:
    write_fashion(tmp_path / "fashion-mnist", gz=False)
    b = load_dataset("fashion-mnist", root=str(tmp_path))  # alias + parent folder
    assert b.source == str(tmp_path / "fashion-mnist")
    assert len(b.train) + len(b.val) == 200 and len(b.test) == 50


def test_augment_train_only(fashion_dir: Path) -> None:
    b = load_dataset("fashion_mnist", root=str(fashion_dir), augment=True)
    assert isinstance(b.train, AugmentedDataset) and b.train.hflip and b.train.padding == 2
    assert not isinstance(b.val, AugmentedDataset) and not isinstance(b.test, AugmentedDataset)
    base_x, base_y = b.train.base[5]
    torch.manual_seed(0)
    outs = [b.train[5] for _ in range(8)]
    assert all(x.shape == base_x.shape and x.dtype == torch.float32 and y == base_y for x, y in outs)
    assert any(not torch.equal(x, base_x) for x, _ in outs)
    torch.manual_seed(0)
    assert all(torch.equal(x, o[0]) for (x, _), o in zip((b.train[5] for _ in range(8)), outs))
    loader = torch.utils.data.DataLoader(b.train, batch_size=16, shuffle=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 1, 28, 28) and yb.dtype == torch.int64


def test_missing_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion_mnist", root=str(tmp_path / "nowhere"))
    msg = str(exc.value)
    assert "fashion_mnist" in msg and "nowhere" in msg and "train-images-idx3-ubyte.gz" in msg
    write_fashion(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", root=str(tmp_path / "partial"))


def test_corrupt_and_inconsistent_files(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    write_fashion(folder)
    target = folder / "train-images-idx3-ubyte.gz"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", root=str(folder))
    shutil.rmtree(folder)
    write_fashion(folder)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros(199, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="200 images but .* 199 labels"):
        load_dataset("fashion_mnist", root=str(folder))
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 40)
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz has 3 dimensions"):
        load_dataset("fashion_mnist", root=str(folder))


def test_real_fashion_mnist_from_debian_package() -> None:
    """The dataset-fashion-mnist package's files load completely."""
    if not (FASHION_MNIST_DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_DEFAULT_ROOT} absent)"
        )
    b = load_dataset("fashion_mnist", val_fraction=0.1, seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert np.bincount(b.test.labels.numpy()).tolist() == [1000] * 10
    assert np.bincount(b.val.labels.numpy()).tolist() == [600] * 10
    assert abs(b.mean[0] - 0.2860) < 2e-3 and abs(b.std[0] - 0.3530) < 2e-3
    assert not set(b.train.source_indices.tolist()) & set(b.val.source_indices.tolist())
    x, y = b.test[0]
    assert x.shape == (1, 28, 28) and int(y) == 9  # first t10k image is an ankle boot
