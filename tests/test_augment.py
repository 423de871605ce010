"""Image batches to tensors, random crop and flip, and resizing to an arm's resolution.

Run: pytest tests/test_augment.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arms.augment import random_crop_flip, resize, to_tensor


def test_to_tensor_layout_and_scale():
    images = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    images[1, 2, 3, 0] = 255

    x = to_tensor(images)

    assert x.shape == (2, 3, 4, 5)
    assert x.dtype == torch.float32
    assert x[1, 0, 2, 3] == 1.0
    assert x.sum() == 1.0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("size", "resolution"), [(32, 32), (32, 16), (32, 8), (32, 4), (28, 14), (28, 7)]
)
def test_resize_shape(channels, size, resolution):
    x = torch.rand(2, channels, size, size)

    resized = resize(x, resolution)

    assert resized.shape == (2, channels, resolution, resolution)
    assert resized.dtype == x.dtype


def test_resize_native_size_unchanged():
    x = torch.rand(2, 3, 32, 32)

    assert resize(x, 32) is x


def test_resize_keeps_constant_image():
    x = torch.full((1, 3, 32, 32), 0.25)

    torch.testing.assert_close(resize(x, 7), torch.full((1, 3, 7, 7), 0.25))


@pytest.mark.parametrize(
    ("channels", "size", "pad"), [(3, 32, 4), (1, 28, 2), (3, 8, 1)]
)
def test_random_crop_flip_shape(channels, size, pad):
    x = torch.rand(5, channels, size, size)

    out = random_crop_flip(x, pad, torch.Generator().manual_seed(0))

    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_random_crop_flip_seeded():
    x = torch.rand(5, 3, 8, 8)

    first = random_crop_flip(x, 2, torch.Generator().manual_seed(3))
    second = random_crop_flip(x, 2, torch.Generator().manual_seed(3))

    assert torch.equal(first, second)


def test_random_crop_flip_without_padding():
    # With no padding each output is its input, or its input mirrored left to right.
    x = torch.rand(16, 3, 8, 8)

    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))

    same = [torch.equal(out[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    for i in range(len(x)):
        assert same[i] or mirrored[i], f"image {i}"
    assert any(same)
    assert any(mirrored)
