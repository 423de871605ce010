"""Offline datasets: loading and checking a small .npz, and the validation split.

Each test writes its own tiny archive in the offline format into tmp_path.
Run: pytest tests/test_datasets.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.datasets import DATASET_INFO, DatasetError, load_dataset, split_indices


def dataset_arrays(name: str = "cifar10", n_train: int = 20, n_test: int = 6) -> dict:
    """Arrays of the offline format for `name`, with random images and labels."""
    info = DATASET_INFO[name]
    rng = np.random.default_rng(0)
    shape = (info.image_size, info.image_size, info.channels)
    if info.channels == 1:
        shape = shape[:2]  # grayscale archives store (N, H, W)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": rng.integers(0, info.num_classes, n_train),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": rng.integers(0, info.num_classes, n_test),
        "class_names": np.array([f"class{i}" for i in range(info.num_classes)]),
    }


def write_npz(directory: Path, name: str, arrays: dict) -> Path:
    path = directory / f"{name}.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_load_npz(tmp_path, name):
    arrays = dataset_arrays(name)
    write_npz(tmp_path, name, arrays)
    info = DATASET_INFO[name]

    dataset = load_dataset(name, tmp_path)

    image_shape = (info.image_size, info.image_size, info.channels)
    assert dataset.x_train.shape == (20, *image_shape)
    assert dataset.x_test.shape == (6, *image_shape)
    assert dataset.x_train.dtype == np.uint8
    assert dataset.y_train.dtype == np.int64
    assert np.array_equal(
        dataset.x_train.reshape(20, -1), arrays["x_train"].reshape(20, -1)
    )
    assert np.array_equal(dataset.y_test, arrays["y_test"])
    assert dataset.class_names == tuple(f"class{i}" for i in range(info.num_classes))
    assert dataset.info == info


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", tmp_path)

    assert str((tmp_path / "cifar10.npz").resolve()) in str(err.value)
    assert "--download" in str(err.value)


def test_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("x_train", np.zeros((20, 32, 32, 3), dtype=np.float32), "x_train has shape"),
        ("x_test", np.zeros((6, 32, 32, 3), dtype=np.int64), "x_test has shape"),
        ("x_train", np.zeros((20, 28, 28, 3), dtype=np.uint8), "x_train has shape"),
        ("x_train", np.zeros((20, 32, 32, 1), dtype=np.uint8), "x_train has shape"),
        ("x_train", np.zeros((20, 3, 32, 32), dtype=np.uint8), "x_train has shape"),
        ("x_train", np.zeros((20, 32, 32), dtype=np.uint8), "x_train has shape"),
        ("x_train", np.zeros((20, 32 * 32 * 3), dtype=np.uint8), "x_train has shape"),
        ("y_train", np.zeros(19, dtype=np.int64), "y_train has shape"),
        ("y_test", np.zeros((6, 1), dtype=np.int64), "y_test has shape"),
        ("y_train", np.full(20, 10), "labels from 10 to 10"),
        ("y_test", np.array([0, 1, 2, -1, 3, 4]), "labels from -1 to 4"),
        ("class_names", np.array(["a", "b"]), "2 class names"),
    ],
)
def test_malformed_arrays(tmp_path, key, value, match):
    arrays = dataset_arrays()
    arrays[key] = value
    write_npz(tmp_path, "cifar10", arrays)

    with pytest.raises(DatasetError, match=match):
        load_dataset("cifar10", tmp_path)


def test_missing_key(tmp_path):
    arrays = dataset_arrays()
    del arrays["y_test"]
    write_npz(tmp_path, "cifar10", arrays)

    with pytest.raises(DatasetError, match="lacks the keys \\['y_test'\\]"):
        load_dataset("cifar10", tmp_path)


def test_pickled_array_rejected(tmp_path):
    arrays = dataset_arrays()
    arrays["class_names"] = np.array([f"class{i}" for i in range(10)], dtype=object)
    write_npz(tmp_path, "cifar10", arrays)

    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("cifar10", tmp_path)


def corrupted(data: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return data[: len(data) // 2]
    if damage == "flipped":  # inside the first member: its CRC or inflate check fails
        return data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:]
    if damage == "garbage":
        return bytes(range(256)) * 4
    return b""


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty"])
def test_corrupted_npz(tmp_path, damage, compressed):
    path = tmp_path / "cifar10.npz"
    save = np.savez_compressed if compressed else np.savez
    save(path, **dataset_arrays(n_train=200))
    path.write_bytes(corrupted(path.read_bytes(), damage))

    with pytest.raises(DatasetError, match="cannot read") as err:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(err.value)


def test_split_disjoint():
    train, val = split_indices(100, val_size=20, seed=0)

    assert len(val) == 20
    assert len(train) == 80
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(range(100))
    assert np.array_equal(train, np.sort(train))
    assert np.array_equal(val, np.sort(val))


def test_split_seeded():
    train_a, val_a = split_indices(100, val_size=20, seed=7)
    train_b, val_b = split_indices(100, val_size=20, seed=7)
    _, val_other = split_indices(100, val_size=20, seed=8)

    assert np.array_equal(train_a, train_b)
    assert np.array_equal(val_a, val_b)
    assert not np.array_equal(val_a, val_other)


@pytest.mark.parametrize("train_limit", [1, 10, 79, 80, 500])
def test_split_train_limit(train_limit):
    full_train, full_val = split_indices(100, val_size=20, seed=3)

    train, val = split_indices(100, val_size=20, seed=3, train_limit=train_limit)

    assert np.array_equal(val, full_val)
    assert len(train) == min(train_limit, 80)
    assert set(train) <= set(full_train)


def test_split_zero_validation():
    train, val = split_indices(10, val_size=0, seed=0)

    assert len(val) == 0
    assert np.array_equal(train, np.arange(10))


@pytest.mark.parametrize("val_size", [10, 11])
def test_split_no_training_left(val_size):
    with pytest.raises(DatasetError, match=f"validation size {val_size}"):
        split_indices(10, val_size=val_size, seed=0)
