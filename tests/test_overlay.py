"""Fourier label overlay: distinct class patterns, wrong labels and the blend.

Run: pytest tests/test_overlay.py
"""

from __future__ import annotations

import pytest
import torch

from common.overlay import apply_overlay, class_patterns, neutral_overlay, wrong_labels

# Patterns span [0, 1], so a root-mean-square (RMS) difference of 0.1 is a tenth of
# the range. At label strength 0.5 two labels then differ by 0.05 RMS in the input.
MIN_PATTERN_DISTANCE = 0.1

# Every (classes, side length) an arm receives: 32 px datasets have 10 or 100
# classes, 28 px datasets have 10, and arms use 1, 1/2, 1/4 and 1/8 of the image side.
ARM_INPUTS = [
    (10, 32),
    (10, 16),
    (10, 8),
    (10, 4),
    (10, 28),
    (10, 14),
    (10, 7),
    (100, 32),
    (100, 16),
    (100, 8),
    (100, 4),
]


@pytest.mark.parametrize(("num_classes", "size"), [(2, 4), (10, 32), (100, 32)])
def test_class_patterns_shape_and_range(num_classes, size):
    patterns = class_patterns(num_classes, size)

    assert patterns.shape == (num_classes, size, size)
    assert patterns.min() >= 0.0
    assert patterns.max() <= 1.0


@pytest.mark.parametrize(("num_classes", "size"), ARM_INPUTS)
def test_class_patterns_distinct(num_classes, size):
    patterns = class_patterns(num_classes, size).flatten(1)

    distance = torch.cdist(patterns, patterns) / size  # RMS difference per pixel
    distance.fill_diagonal_(float("inf"))
    first, second = divmod(distance.argmin().item(), num_classes)
    assert distance.min() >= MIN_PATTERN_DISTANCE, (
        f"classes {first} and {second} differ by only {distance.min():.4f} RMS"
    )


def test_class_patterns_one_class():
    with pytest.raises(ValueError, match="need at least 2"):
        class_patterns(1, 32)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_wrong_labels_cover_other_classes(num_classes):
    draws = 2000  # per true label, so a class is missed with chance < 1e-6 at 100
    labels = torch.arange(num_classes).repeat(draws)
    generator = torch.Generator().manual_seed(0)

    wrong = wrong_labels(labels, num_classes, generator)

    assert wrong.shape == labels.shape
    assert not (wrong == labels).any()
    assert wrong.min() >= 0
    assert wrong.max() < num_classes
    for label in range(num_classes):
        drawn = set(wrong[labels == label].tolist())
        assert drawn == set(range(num_classes)) - {label}, f"true label {label}"


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_apply_overlay_blend(channels, strength):
    torch.manual_seed(0)
    images = torch.rand(4, channels, 8, 8)
    labels = torch.tensor([0, 3, 9, 3])
    patterns = class_patterns(10, 8)

    blended = apply_overlay(images, labels, patterns, strength)

    assert blended.shape == images.shape
    assert blended.dtype == images.dtype
    for i, label in enumerate(labels.tolist()):
        for channel in range(channels):
            expected = images[i, channel] * (1 - strength) + patterns[label] * strength
            torch.testing.assert_close(blended[i, channel], expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_neutral_overlay_blend(channels):
    torch.manual_seed(0)
    images = torch.rand(4, channels, 8, 8)
    patterns = class_patterns(10, 8)
    strength = 0.4

    blended = neutral_overlay(images, patterns, strength)

    assert blended.shape == images.shape
    expected = images * (1 - strength) + patterns.mean(0) * strength
    torch.testing.assert_close(blended, expected)
