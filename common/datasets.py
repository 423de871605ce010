"""Image datasets as uint8 NumPy arrays, from an offline `.npz` file or torchvision.

Offline format: `<data_dir>/<name>.npz` with `x_train`, `y_train`, `x_test`, `y_test`
(uint8, images as N x H x W or N x H x W x C) and `class_names`. Loading never
unpickles: `allow_pickle` stays False.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DATA_DIR_ENV = "OCTOPUSNET_DATA_DIR"


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, on a [0, 1] scale
    std: tuple[float, ...]
    torchvision_name: str


# Means and standard deviations of the training splits (population std).
DATASET_INFO = {
    "cifar10": DatasetInfo(
        10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10"
    ),
    "cifar100": DatasetInfo(
        100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100"
    ),
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,), "MNIST"),
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), "FashionMNIST"),
}

KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable or malformed. The message names the fix."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (N, H, W, C) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def info(self) -> DatasetInfo:
        return DATASET_INFO[self.name]


def default_data_dir() -> str:
    """Return the data directory named by $OCTOPUSNET_DATA_DIR, else `data`."""
    return os.environ.get(DATA_DIR_ENV, "data")


def load_dataset(
    name: str, data_dir: str | os.PathLike, download: bool = False
) -> Dataset:
    """Load `name` from `<data_dir>/<name>.npz`, or through torchvision with `download`."""
    if name not in DATASET_INFO:
        raise DatasetError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASET_INFO)}"
        )
    path = Path(data_dir) / f"{name}.npz"
    if path.is_file():
        return _load_npz(name, path)
    if download:
        return _download_torchvision(name, Path(data_dir))
    raise DatasetError(
        f"dataset {name!r} not found: tried {path.resolve()}. Point --data-dir (or "
        f"${DATA_DIR_ENV}) at a directory that holds {name}.npz, or pass --download "
        "to fetch it with torchvision (needs a network)"
    )


def _load_npz(name: str, path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in KEYS if key not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path} lacks the keys {missing}: an offline dataset needs "
                    f"{', '.join(KEYS)}"
                )
            arrays = {key: archive[key] for key in KEYS}
    # A truncated or corrupted archive raises BadZipFile (CRC mismatch, no central
    # directory) or zlib.error (compressed member), neither an OSError.
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetError(
            f"cannot read {path}: {err}. Replace the file with an intact copy"
        ) from err
    except MemoryError as err:
        # A corrupted header can declare an array far larger than the file.
        raise DatasetError(
            f"{path} declares an array too large for memory ({err}); the file is "
            "corrupted or not a dataset of this format: replace it with an intact copy"
        ) from err
    return _validated(name, arrays, str(path))


def _download_torchvision(name: str, data_dir: Path) -> Dataset:
    import torchvision

    info = DATASET_INFO[name]
    root = data_dir / "torchvision"
    dataset_cls = getattr(torchvision.datasets, info.torchvision_name)
    log.info("downloading %s with torchvision into %s", name, root)
    try:
        train = dataset_cls(root=str(root), train=True, download=True)
        test = dataset_cls(root=str(root), train=False, download=True)
    except Exception as err:  # torchvision raises URLError, RuntimeError, OSError
        raise DatasetError(
            f"torchvision could not download {name!r} into {root}: {err}. Check the "
            f"network, or place {name}.npz in {data_dir}"
        ) from err
    arrays = {
        "x_train": np.asarray(train.data),
        "y_train": np.asarray(train.targets),
        "x_test": np.asarray(test.data),
        "y_test": np.asarray(test.targets),
        "class_names": np.asarray(train.classes),
    }
    return _validated(name, arrays, str(root))


def _validated(name: str, arrays: dict, source: str) -> Dataset:
    info = DATASET_INFO[name]
    images = {}
    labels = {}
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        y = arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[..., None]
        expected = (info.image_size, info.image_size, info.channels)
        if x.ndim != 4 or x.shape[1:] != expected or x.dtype != np.uint8:
            raise DatasetError(
                f"{source}: x_{split} has shape {x.shape} and dtype {x.dtype}, but "
                f"{name} needs (N, {expected[0]}, {expected[1]}, {expected[2]}) uint8"
            )
        if y.dtype.kind not in "iu":
            raise DatasetError(
                f"{source}: y_{split} has dtype {y.dtype}, but labels must be integers"
            )
        if y.shape != (len(x),):
            raise DatasetError(
                f"{source}: y_{split} has shape {y.shape}, but x_{split} contains {len(x)} images"
            )
        if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
            raise DatasetError(
                f"{source}: y_{split} has labels from {y.min()} to {y.max()}, but "
                f"{name} has classes 0 to {info.num_classes - 1}"
            )
        images[split] = np.ascontiguousarray(x)
        labels[split] = y.astype(np.int64)
    class_names = tuple(str(c) for c in arrays["class_names"].tolist())
    if len(class_names) != info.num_classes:
        raise DatasetError(
            f"{source}: {len(class_names)} class names, but {name} has "
            f"{info.num_classes} classes"
        )
    return Dataset(
        name,
        images["train"],
        labels["train"],
        images["test"],
        labels["test"],
        class_names,
    )


def split_indices(
    n_train: int, val_size: int, seed: int, train_limit: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, validation) indices; the validation split is held out by seed.

    `train_limit` caps the training indices after the split, so a smaller run keeps
    the same validation images.
    """
    if val_size >= n_train:
        raise DatasetError(
            f"validation size {val_size} leaves no training images out of {n_train}: "
            "lower --val-size"
        )
    order = np.random.default_rng(seed).permutation(n_train)
    val = np.sort(order[:val_size])
    train = np.sort(order[val_size:])
    if train_limit:
        train = train[:train_limit]
    return train, val
