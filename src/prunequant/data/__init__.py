"""Datasets for prunequant: in-memory, normalized train/val/test splits.

``load_dataset(name, ...)`` returns a :class:`DataBundle`; problems raise :class:`DatasetError`.
"""

from .datasets import DATASET_NAMES, DataBundle, load_dataset
from .errors import DatasetError
from .tensors import AugmentedDataset, ImageTensorDataset

__all__ = [
    "DATASET_NAMES",
    "AugmentedDataset",
    "DataBundle",
    "DatasetError",
    "ImageTensorDataset",
    "load_dataset",
]
