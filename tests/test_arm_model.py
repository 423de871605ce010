"""Arm input sizes, block widths and output shapes for 10 and 100 classes.

Run: pytest tests/test_arm_model.py
"""

from __future__ import annotations

import pytest
import torch

from arms.model import GroupedArm, OverlayArm, block_widths, build_arm, default_depth
from common.config import ConfigError, RunConfig
from common.datasets import DATASET_INFO


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [(32, (32, 16, 8, 4)), (28, (28, 14, 7, 4))],
)
def test_arm_resolution_multiscale(image_size, expected):
    config = RunConfig(arms=8, arm_scales="1,2,4,8")

    resolutions = tuple(
        config.arm_resolution(arm_id, image_size) for arm_id in range(8)
    )

    assert resolutions[:4] == expected
    assert resolutions[4:] == expected  # arm i takes entry i % 4


@pytest.mark.parametrize(
    ("image_size", "expected"), [(32, [32, 32, 16, 16]), (28, [28, 28, 14, 14])]
)
def test_arm_resolution_default_pairs(image_size, expected):
    config = RunConfig()

    resolutions = [config.arm_resolution(arm_id, image_size) for arm_id in range(4)]

    assert resolutions == expected


@pytest.mark.parametrize("scales", ["", "0", "1,,2", "1.5", "a", "1,65", "-1"])
def test_invalid_arm_scales_rejected(scales):
    with pytest.raises(ConfigError, match="invalid arm scales"):
        RunConfig(arm_scales=scales)


@pytest.mark.parametrize("image_size", [32, 28])
def test_arm_resolution_single_scale(image_size):
    config = RunConfig(arms=4, multiscale=False)

    resolutions = [config.arm_resolution(arm_id, image_size) for arm_id in range(4)]

    assert resolutions == [image_size] * 4


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [(32, 4), (28, 3), (16, 3), (14, 2), (8, 2), (7, 1), (4, 1)],
)
def test_default_depth(resolution, expected):
    assert default_depth(resolution) == expected


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("width", [8, 48, 64])
def test_block_widths_class_multiples(num_classes, width):
    widths = block_widths(width, depth=4, num_classes=num_classes)

    assert len(widths) == 4
    for i, channels in enumerate(widths):
        assert channels % num_classes == 0, f"block {i}: {channels} channels"
        assert channels >= width * 2**i, f"block {i}: {channels} channels"
        assert channels < width * 2**i + num_classes, f"block {i}: {channels} channels"


@pytest.mark.parametrize(
    ("arm_type", "arm_class"), [("grouped", GroupedArm), ("overlay", OverlayArm)]
)
@pytest.mark.parametrize(("arm_id", "resolution"), [(0, 32), (1, 16), (2, 8), (3, 4)])
def test_build_arm_cifar100_shapes(arm_type, arm_class, arm_id, resolution):
    torch.manual_seed(0)
    config = RunConfig(
        dataset="cifar100",
        arm_type=arm_type,
        width=8,
        bottleneck=16,
        arm_scales="1,2,4,8",
    )
    arm = build_arm(config, arm_id, DATASET_INFO["cifar100"])
    images = torch.rand(2, 3, resolution, resolution)

    features, logits = arm.infer(images)

    assert isinstance(arm, arm_class)
    assert arm.resolution == resolution
    assert len(arm.blocks) == default_depth(resolution)
    assert features.shape == (2, 16)
    assert logits.shape == (2, 100)
    assert torch.isfinite(features).all()
    assert torch.isfinite(logits).all()
