"""The residual arm, learned stride-2 compression and per-layer optimizers.

Run: pytest tests/test_residual_arm.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arms.augment import resize, to_tensor
from arms.model import ConvBlock, build_arm, combine_layers
from arms.optim import LayerOptimizers
from arms.residual import ResidualArm
from common.config import ConfigError, RunConfig
from common.datasets import DATASET_INFO, load_dataset, split_indices

INFO = DATASET_INFO["cifar10"]


def residual_arm(**overrides) -> ResidualArm:
    torch.manual_seed(0)
    values = dict(arm_type="residual", width=10, bottleneck=16, arm_scales="1")
    values.update(overrides)
    arm = build_arm(RunConfig(**values), 0, INFO)
    arm.configure_optimizer(lr=1e-2, weight_decay=0.0, total_steps=10)
    return arm


@pytest.mark.parametrize("residual_blocks", [0, 1, 2])
def test_layers_follow_each_halving(residual_blocks):
    arm = residual_arm(residual_blocks=residual_blocks)

    # 32 px: four halving layers, each followed by the residual layers.
    assert len(arm.blocks) == 4 * (1 + residual_blocks)
    expected = ([False] + [True] * residual_blocks) * 4
    assert arm.is_residual == expected


def test_each_loss_reaches_only_its_own_layer():
    arm = residual_arm()
    images = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])

    losses, _, _ = arm.block_losses(images, labels)

    for index, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, list(arm.blocks.parameters()), retain_graph=True, allow_unused=True
        )
        owners = [i for i, block in enumerate(arm.blocks) for _ in block.parameters()]
        for owner, grad in zip(owners, grads, strict=True):
            reached = grad is not None and grad.abs().sum() > 0
            assert reached == (owner == index), (
                f"loss of layer {index} reaches layer {owner}: {reached}"
            )


def test_residual_layer_adds_its_input():
    arm = residual_arm()
    first_residual = arm.is_residual.index(True)
    layer = arm.blocks[first_residual]
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.norm.bias.zero_()
    arm.eval()
    captured = {}
    layer.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0], h=out))
    nxt = arm.blocks[first_residual + 1]
    nxt.register_forward_hook(lambda m, inp, out: captured.update(next_in=inp[0]))

    arm.encode(torch.rand(2, 3, 32, 32))

    # A zeroed residual layer adds nothing, so the next layer takes its input,
    # normalised per class group once more.
    assert torch.count_nonzero(captured["h"]) == 0
    expected = F.group_norm(captured["x"], INFO.num_classes)
    assert torch.allclose(captured["next_in"], expected, atol=1e-5)


def test_layer_inputs_normalised_per_class_group():
    arm = residual_arm()
    arm.eval()
    inputs = []
    for block in arm.blocks[1:]:
        block.register_forward_hook(lambda m, inp, out: inputs.append(inp[0]))

    arm.encode(torch.rand(3, 3, 32, 32))

    for x in inputs:
        groups = x.reshape(3, INFO.num_classes, -1)
        assert torch.allclose(groups.mean(2), torch.zeros(3, 10), atol=1e-4)


def test_stride_compression_keeps_class_groups_apart():
    block = ConvBlock(10, 20, batch_norm=True, compress="stride", groups=10)
    block.eval()
    compress = block.compress
    x = torch.rand(1, 20, 8, 8)
    changed = x.clone()
    changed[:, :2] += 1.0  # the first class group's two channels

    delta = (compress(changed) - compress(x)).abs().sum(dim=(0, 2, 3))

    assert compress[0].stride == (2, 2)
    assert delta[:2].sum() > 0
    assert torch.count_nonzero(delta[2:]) == 0
    assert block(torch.rand(1, 10, 8, 8)).shape == (1, 20, 4, 4)


@pytest.mark.parametrize("arm_type", ["grouped", "residual"])
def test_stride_compression_is_trained(arm_type):
    arm = residual_arm(arm_type=arm_type, compress="stride")
    before = {n: p.detach().clone() for n, p in arm.named_parameters()}

    arm.train_step(torch.rand(8, 3, 32, 32), torch.arange(8), autocast_dtype=None)

    compress = [n for n in before if ".compress." in n]
    assert compress, "no learned compression"
    for name, parameter in arm.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} did not change"


def test_one_optimizer_per_layer():
    arm = residual_arm()

    optimizers = arm.optimizer.optimizers
    assert len(optimizers) == len(arm.blocks) + 1  # and the readout
    owned = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in arm.parameters())


def test_optimizer_state_round_trip_and_mismatch():
    arm = residual_arm()
    arm.train_step(torch.rand(4, 3, 32, 32), torch.arange(4), autocast_dtype=None)
    state = arm.optimizer.state_dict()
    other = residual_arm()

    other.optimizer.load_state_dict(state)

    assert other.optimizer.optimizers[0].state_dict()["state"].keys() == (
        arm.optimizer.optimizers[0].state_dict()["state"].keys()
    )
    smaller = LayerOptimizers([arm.blocks[0]], 1e-3, 0.0, 10)
    with pytest.raises(ValueError, match="another arm layout"):
        smaller.load_state_dict(state)


def test_combine_layers_last_one_is_log_softmax():
    scores = torch.randn(3, 5, 10)

    assert torch.allclose(combine_layers(scores, 1), F.log_softmax(scores[-1], -1))
    both = (F.log_softmax(scores[-1], -1) + F.log_softmax(scores[-2], -1)) / 2
    assert torch.allclose(combine_layers(scores, 2), both)


@pytest.mark.parametrize("compress", ["pool", "stride"])
@pytest.mark.parametrize(("arm_id", "resolution"), [(0, 32), (1, 16), (3, 4)])
def test_cifar100_shapes(compress, arm_id, resolution):
    config = RunConfig(
        dataset="cifar100",
        arm_type="residual",
        width=8,
        bottleneck=16,
        arm_scales="1,2,4,8",
        compress=compress,
        goodness_layers=3,
    )
    arm = build_arm(config, arm_id, DATASET_INFO["cifar100"])
    arm.configure_optimizer(1e-3, 0.0, 10)
    images = torch.rand(2, 3, resolution, resolution)

    arm.train_step(images, torch.tensor([0, 99]), autocast_dtype=None)
    features, logits = arm.infer(images)

    assert all(block.conv.out_channels % 100 == 0 for block in arm.blocks)
    assert features.shape == (2, 16)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("option", "value"),
    [("compress", "avgpool"), ("residual_blocks", 9), ("goodness_layers", 0)],
)
def test_invalid_options_rejected(option, value):
    with pytest.raises(ConfigError, match="invalid"):
        RunConfig(**{option: value})


def test_residual_arm_learns_real_images(data_dir):
    torch.manual_seed(0)
    data = load_dataset("cifar10", data_dir)
    train_idx, val_idx = split_indices(len(data.x_train), 500, seed=0, train_limit=3000)
    arm = residual_arm(width=20, arm_scales="2")  # 16 px keeps the test fast
    arm.configure_optimizer(lr=2e-3, weight_decay=5e-4, total_steps=2 * 46)

    for _ in range(2):
        for start in range(0, len(train_idx) - 63, 64):
            batch = train_idx[start : start + 64]
            images = resize(to_tensor(data.x_train[batch]), arm.resolution)
            labels = torch.from_numpy(data.y_train[batch].astype(np.int64))
            arm.train_step(images, labels, autocast_dtype=None)
    _, logits = arm.infer(resize(to_tensor(data.x_train[val_idx]), arm.resolution))
    accuracy = (logits.argmax(1).numpy() == data.y_train[val_idx]).mean()

    assert accuracy > 0.2, f"held-out accuracy {accuracy:.3f} is near chance (0.1)"
