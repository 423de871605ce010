"""Goodness and the local losses on hand-computed tensors, and one training step each.

Run: pytest tests/test_goodness.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arms.goodness import class_goodness, ff_loss, goodness, grouped_loss
from arms.model import ConvBlock, GroupedArm
from common.overlay import apply_overlay, class_patterns, wrong_labels


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("h", "expected"),
    [
        # (B, D): (1 + 4) / 2 and (9 + 16) / 2.
        ([[1.0, 2.0], [3.0, 4.0]], [2.5, 12.5]),
        # (1, 1, 2, 2): (0 + 4 + 4 + 0) / 4, because squaring drops the sign.
        ([[[[0.0, -2.0], [2.0, 0.0]]]], [2.0]),
        # (2, 2, 1, 1): all-zero and all-one samples.
        ([[[[0.0]], [[0.0]]], [[[1.0]], [[1.0]]]], [0.0, 1.0]),
    ],
)
def test_goodness_values(h, expected):
    torch.testing.assert_close(goodness(torch.tensor(h)), torch.tensor(expected))


@pytest.mark.parametrize(
    ("g_pos", "g_neg", "threshold", "expected"),
    [
        ([2.0], [2.0], 2.0, 2 * math.log(2.0)),
        ([3.0], [1.0], 2.0, 2 * softplus(-1.0)),
        ([1.0], [3.0], 2.0, 2 * softplus(1.0)),
        (
            [1.0, 3.0],
            [0.0, 4.0],
            2.0,
            (softplus(1.0) + softplus(-2.0) + softplus(-1.0) + softplus(2.0)) / 2,
        ),
        ([0.5], [0.5], 0.0, softplus(-0.5) + softplus(0.5)),
    ],
)
def test_ff_loss_values(g_pos, g_neg, threshold, expected):
    loss = ff_loss(torch.tensor(g_pos), torch.tensor(g_neg), threshold)

    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ff_loss_rewards_separation():
    close = ff_loss(torch.tensor([2.1]), torch.tensor([1.9]), 2.0)
    apart = ff_loss(torch.tensor([4.0]), torch.tensor([0.0]), 2.0)

    assert apart < close


@pytest.mark.parametrize(
    ("num_classes", "expected"),
    [
        # Channels 0-1 contain 0..3 (mean 1.5) and channels 2-3 contain 4..7 (mean 5.5).
        (2, [[1.5, 5.5]]),
        # One channel per class: the mean of each channel's two values.
        (4, [[0.5, 2.5, 4.5, 6.5]]),
        # A single group spans every channel.
        (1, [[3.5]]),
    ],
)
def test_class_goodness_values(num_classes, expected):
    h = torch.arange(8.0).reshape(1, 4, 1, 2)  # (B, C*k, H, W)

    torch.testing.assert_close(class_goodness(h, num_classes), torch.tensor(expected))


def test_class_goodness_uneven_groups():
    with pytest.raises(ValueError, match="5 channels"):
        class_goodness(torch.ones(1, 5, 2, 2), num_classes=2)


@pytest.mark.parametrize(
    ("g", "labels", "scale", "expected"),
    [
        ([[0.0, 0.0]], [0], 15.0, math.log(2.0)),
        ([[1.0, 0.0]], [0], 2.0, softplus(-2.0)),
        ([[1.0, 0.0]], [1], 2.0, softplus(2.0)),
        ([[1.0, 0.0], [0.0, 0.5]], [0, 1], 2.0, (softplus(-2.0) + softplus(-1.0)) / 2),
        ([[0.0, 0.0, 0.0]], [2], 1.0, math.log(3.0)),
    ],
)
def test_grouped_loss_values(g, labels, scale, expected):
    loss = grouped_loss(torch.tensor(g), torch.tensor(labels), scale)

    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_ff_step_separates_goodness(seed, strength):
    torch.manual_seed(seed)
    block = ConvBlock(3, 16, batch_norm=False)  # an OverlayArm block
    optimizer = torch.optim.SGD(block.parameters(), lr=0.01)

    # One image with its true label's pattern and with a wrong label's, layer-normed
    # as OverlayArm normalizes the input of every block after the first.
    image = torch.rand(1, 3, 8, 8)
    label = torch.tensor([3])
    wrong = wrong_labels(label, 10, torch.Generator().manual_seed(seed))
    patterns = class_patterns(10, 8)
    x_pos = apply_overlay(image, label, patterns, strength)
    x_neg = apply_overlay(image, wrong, patterns, strength)
    x_pos = F.layer_norm(x_pos, x_pos.shape[1:])
    x_neg = F.layer_norm(x_neg, x_neg.shape[1:])

    with torch.no_grad():
        g_pos_before = goodness(block(x_pos)).item()
        g_neg_before = goodness(block(x_neg)).item()
    # A threshold midway between the two gives both loss terms the same weight. Far
    # below it, both terms push goodness up (far above, both push it down).
    threshold = (g_pos_before + g_neg_before) / 2

    loss = ff_loss(goodness(block(x_pos)), goodness(block(x_neg)), threshold)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        g_pos_after = goodness(block(x_pos)).item()
        g_neg_after = goodness(block(x_neg)).item()
    assert g_pos_after > g_pos_before
    assert g_neg_after < g_neg_before


def true_and_other_goodness(
    arm: GroupedArm, images: torch.Tensor, labels: torch.Tensor
) -> list[tuple[float, float]]:
    """Mean goodness of the true class and of the other classes, per block.

    Runs in training mode, so BatchNorm uses batch statistics as train_step does.
    """
    arm.train()
    per_block = []
    with torch.no_grad():
        x = arm.normalize(images)
        for block in arm.blocks:
            x = block(x)
            g = class_goodness(x, arm.num_classes)  # (B, C)
            true = g[torch.arange(len(labels)), labels]
            others = (g.sum(1) - true) / (arm.num_classes - 1)
            per_block.append((true.mean().item(), others.mean().item()))
    return per_block


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_step_separates_goodness(seed):
    torch.manual_seed(seed)
    arm = GroupedArm(
        in_channels=3,
        num_classes=10,
        resolution=8,
        widths=[20, 40],
        bottleneck=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        goodness_scale=15.0,
    )
    arm.configure_optimizer(lr=2e-3, weight_decay=0.0, total_steps=10)
    images = torch.rand(16, 3, 8, 8)
    labels = torch.arange(16) % 10

    before = true_and_other_goodness(arm, images, labels)
    arm.train_step(images, labels, autocast_dtype=None)
    after = true_and_other_goodness(arm, images, labels)

    for block, ((true_before, other_before), (true_after, other_after)) in enumerate(
        zip(before, after, strict=True)
    ):
        assert true_after > true_before, f"block {block}: true-class goodness fell"
        assert other_after < other_before, f"block {block}: other-class goodness rose"
