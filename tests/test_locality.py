"""Locality of learning: no gradient crosses between arms or from the brain into an arm.

The tests also check the converse, that each trainable part does learn from its own
loss. Run: pytest tests/test_locality.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arms.augment import resize
from arms.model import LocalArm, build_arm
from brain.model import Brain, build_brain
from common.config import ARM_TYPES, RunConfig
from common.datasets import DATASET_INFO

INFO = DATASET_INFO["cifar10"]
BATCH = 8


def tiny_config(arm_type: str) -> RunConfig:
    # Four arms take 32, 16, 8 and 4 px input, so they have 4, 3, 2 and 1 blocks.
    return RunConfig(arm_type=arm_type, arms=4, width=8, bottleneck=16, heads=4)


def build_arms(config: RunConfig, weight_decay: float = 0.0) -> list[LocalArm]:
    torch.manual_seed(0)
    arms = [build_arm(config, arm_id, INFO) for arm_id in range(config.arms)]
    for arm in arms:
        arm.configure_optimizer(lr=1e-2, weight_decay=weight_decay, total_steps=100)
    return arms


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, 32, 32, generator=generator)
    labels = torch.randint(0, INFO.num_classes, (BATCH,), generator=generator)
    return images, labels


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_brain_loss_skips_arms(arm_type):
    config = tiny_config(arm_type)
    arms = build_arms(config)
    brain = build_brain(config, INFO.num_classes)
    images, labels = batch()

    outputs = [arm.infer(resize(images, arm.resolution)) for arm in arms]
    features = torch.stack([arm_features for arm_features, _ in outputs], 1)
    logits = torch.stack([arm_logits for _, arm_logits in outputs], 1)
    live = torch.ones(BATCH, config.arms, dtype=torch.bool)
    brain_logits, _ = brain(features, logits, live)
    F.cross_entropy(brain_logits, labels).backward()

    assert not features.requires_grad
    assert not logits.requires_grad
    assert brain.classifier[0].weight.grad is not None  # the backward pass did run
    for arm_id, arm in enumerate(arms):
        for name, parameter in arm.named_parameters():
            assert parameter.grad is None, f"arm {arm_id} {name} has a gradient"


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_train_step_skips_other_arm(arm_type):
    trained, other = build_arms(tiny_config(arm_type))[:2]
    images, labels = batch()
    trained_before = snapshot(trained)
    other_before = snapshot(other)

    trained.train_step(resize(images, trained.resolution), labels, autocast_dtype=None)

    for name, value in snapshot(other).items():
        assert torch.equal(value, other_before[name]), f"other arm {name} changed"
    for name, parameter in other.named_parameters():
        assert parameter.grad is None, f"other arm {name} has a gradient"
    changed = [
        name
        for name, value in snapshot(trained).items()
        if not torch.equal(value, trained_before[name])
    ]
    assert changed, "the trained arm did not change"


@pytest.mark.parametrize("arm_type", ARM_TYPES)
@pytest.mark.parametrize("arm_id", [0, 1, 2, 3])
def test_arm_parts_learn(arm_type, arm_id):
    # Without weight decay a parameter changes only if its gradient is non-zero.
    arm = build_arms(tiny_config(arm_type), weight_decay=0.0)[arm_id]
    before = {name: p.detach().clone() for name, p in arm.named_parameters()}

    for step in range(3):
        images, labels = batch(seed=step)
        arm.train_step(resize(images, arm.resolution), labels, autocast_dtype=None)

    names = set(before)
    assert any(name.startswith("blocks.") for name in names)
    assert {"projection.weight", "projection.bias", "head.weight", "head.bias"} <= names
    for name, parameter in arm.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} did not change"


BRAIN_PARTS = ("inputs.", "nerve_ring.", "coordinator.query.", "classifier.")


def test_brain_parts_cover_parameters():
    brain = Brain(arms=3, dim=8, num_classes=4, heads=2)

    for name, _ in brain.named_parameters():
        assert name.startswith(BRAIN_PARTS), f"{name} belongs to no checked part"


@pytest.mark.parametrize("part", BRAIN_PARTS)
def test_brain_parts_learn(part):
    torch.manual_seed(0)
    brain = Brain(arms=3, dim=8, num_classes=4, heads=2, competition="soft")
    optimizer = torch.optim.Adam(brain.parameters(), lr=1e-2)
    checked = {
        name: p.detach().clone()
        for name, p in brain.named_parameters()
        if name.startswith(part)
    }
    live = torch.ones(BATCH, 3, dtype=torch.bool)

    brain.train()
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        features = torch.randn(BATCH, 3, 8, generator=generator)
        logits = torch.randn(BATCH, 3, 4, generator=generator)
        labels = torch.randint(0, 4, (BATCH,), generator=generator)
        brain_logits, _ = brain(features, logits, live)
        loss = F.cross_entropy(brain_logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert checked, f"the brain has no parameters under {part!r}"
    for name, parameter in brain.named_parameters():
        if name in checked:
            assert not torch.equal(parameter, checked[name]), f"{name} did not change"
