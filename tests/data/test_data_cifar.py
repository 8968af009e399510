"""CIFAR-10/100 from the "python version" pickle folders, written tiny in the real layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_writers import write_cifar10, write_cifar100

from prunequant.data import AugmentedDataset, DatasetError, load_dataset


@pytest.mark.parametrize("py2", [False, True])
def test_cifar10_loads_from_folder_or_parent(tmp_path: Path, py2: bool) -> None:
    folder, x, y = write_cifar10(tmp_path, py2=py2)
    for root in (folder, tmp_path):
        b = load_dataset("cifar10", root=str(root), val_fraction=0.2, seed=0)
        assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
        assert b.source == str(folder)
        assert (len(b.train), len(b.val), len(b.test)) == (80, 20, 30)
        assert b.class_names[0] == "airplane" and b.class_names[-1] == "truck"
        xi, yi = b.train[0]
        assert xi.shape == (3, 32, 32) and xi.dtype == torch.float32 and yi.dtype == torch.int64
        # row-major channel-first layout: stored images match the flat rows
        k = int(b.train.source_indices[0])
        np.testing.assert_array_equal(b.train.images[0].numpy().reshape(-1), x[k])
        assert int(yi) == y[k]
        xs, _ = b.train.tensors()
        per_channel_mean = xs.mean(dim=(0, 2, 3))
        per_channel_std = xs.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
        assert torch.allclose(per_channel_mean, torch.zeros(3), atol=1e-4)
        assert torch.allclose(per_channel_std, torch.ones(3), atol=1e-4)
        assert not set(b.train.source_indices.tolist()) & set(b.val.source_indices.tolist())


def test_cifar100_fine_labels_and_augment(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    b = load_dataset("cifar100", root=str(tmp_path), augment=True, train_subset=50, test_subset=20)
    assert (b.num_classes, b.in_channels, b.image_size, len(b.class_names)) == (100, 3, 32, 100)
    assert (len(b.train), len(b.val), len(b.test)) == (50, 30, 20)
    assert isinstance(b.train, AugmentedDataset) and b.train.hflip and b.train.padding == 4
    assert b.val.labels.max() < 100 and b.test.labels.dtype == torch.int64
    loader = torch.utils.data.DataLoader(b.train, batch_size=8)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)


def test_missing_cifar_explains_where_to_get_it(tmp_path: Path) -> None:
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        with pytest.raises(DatasetError) as exc:
            load_dataset(name, root=str(tmp_path))
        msg = str(exc.value)
        assert name in msg and str(tmp_path) in msg and folder in msg
        assert "python version from the CIFAR website" in msg
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not really")
    with pytest.raises(DatasetError, match="extract it first"):
        load_dataset("cifar10", root=str(tmp_path))


def test_malicious_cifar_batch_is_refused(tmp_path: Path) -> None:
    folder, _, _ = write_cifar10(tmp_path)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match="data_batch_3: refusing to load"):
        load_dataset("cifar10", root=str(folder))
    assert not marker.exists()


def test_wrong_cifar_content(tmp_path: Path) -> None:
    folder, _, _ = write_cifar10(tmp_path)
    bad = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch: b'data' must be a uint8 array \[N, 3072\]"):
        load_dataset("cifar10", root=str(folder))
    (folder / "test_batch").write_bytes(pickle.dumps({b"fine_labels": [1]}, protocol=2))
    with pytest.raises(DatasetError, match="expected a dict with keys"):
        load_dataset("cifar10", root=str(folder))
