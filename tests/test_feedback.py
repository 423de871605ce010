"""Feedback from the brain to the arms: per-image, trained, and local.

Unit tests on tiny CPU tensors, a brain behind its real ZeroMQ socket, and one real
distributed run with --feedback. Run: pytest tests/test_feedback.py
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zmq
from conftest import run_launch

from arms.augment import resize
from arms.feedback import feedback_rows
from arms.model import LocalArm, build_arm
from brain.actor import BrainActor
from brain.model import build_brain
from common import wire
from common.checkpoint import load_checkpoint
from common.config import ARM_TYPES, RunConfig
from common.datasets import DATASET_INFO
from deploy.api import OctopusModel

BATCH = 8
TOKEN = "run-secret"


def tiny_config(arm_type: str = "grouped", dataset: str = "cifar10", **kwargs):
    # Four arms take 32, 16, 8 and 4 px input, so they have 4, 3, 2 and 1 blocks.
    return RunConfig(
        dataset=dataset,
        arm_type=arm_type,
        arms=4,
        width=8,
        bottleneck=16,
        heads=4,
        **kwargs,
    )


def build_arms(config: RunConfig) -> list[LocalArm]:
    torch.manual_seed(0)
    info = DATASET_INFO[config.dataset]
    arms = [build_arm(config, arm_id, info) for arm_id in range(config.arms)]
    for arm in arms:
        # No weight decay: a parameter then changes only if its gradient is non-zero.
        arm.configure_optimizer(lr=1e-2, weight_decay=0.0, total_steps=100)
    return arms


def batch(seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, 32, 32, generator=generator)
    labels = torch.randint(0, classes, (BATCH,), generator=generator)
    return images, labels


def random_probs(seed: int, classes: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(BATCH, classes, generator=generator), 1)


def train_gains(arms: list[LocalArm], classes: int = 10, steps: int = 3) -> None:
    """A few feedback steps, so every gain differs from 1."""
    for step in range(steps):
        images, labels = batch(seed=step, classes=classes)
        probs = random_probs(step, classes)
        for arm in arms:
            arm.train_feedback_step(resize(images, arm.resolution), labels, probs, None)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def two_pass_model(arm_type: str, dataset: str = "cifar10") -> OctopusModel:
    config = tiny_config(arm_type, dataset, feedback=True)
    arms = build_arms(config)
    classes = DATASET_INFO[dataset].num_classes
    train_gains(arms, classes)
    torch.manual_seed(1)
    brain = build_brain(config, classes)
    feedback_brain = build_brain(config, classes)
    return OctopusModel(config, arms, brain, feedback_brain)


def uint8_images(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_prediction_ignores_batch_mates(arm_type):
    model = two_pass_model(arm_type)
    images = uint8_images(7)
    first = images[[0, 1, 2, 3]]
    second = images[[0, 4, 5, 6]]

    in_first = model.predict_logits(first)[0]
    in_second = model.predict_logits(second)[0]
    alone = model.predict_logits(images[:1])[0]

    assert torch.allclose(in_first, in_second, atol=1e-5)
    assert torch.allclose(in_first, alone, atol=1e-5)


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_batch_mean_feedback_detected(arm_type):
    # The same comparison catches feedback shared across a batch: with the
    # batch's mean probabilities, image 0's pass-2 features depend on its mates.
    arm = two_pass_model(arm_type).arms[0]
    images, _ = batch(seed=5)
    mates = torch.cat([images[:1], torch.rand(BATCH - 1, 3, 32, 32)])
    probs = random_probs(5)
    shared = probs.mean(0, keepdim=True).expand_as(probs)
    shared_mates = random_probs(6).mean(0, keepdim=True).expand_as(probs)

    own, _ = arm.infer_feedback(images, shared)
    other, _ = arm.infer_feedback(mates, shared_mates)

    assert not torch.allclose(own[0], other[0], atol=1e-5)


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_gain_changes_pass_two(arm_type):
    arm = two_pass_model(arm_type).arms[0]
    images, _ = batch(seed=7)

    features, logits = arm.infer(images)
    features_fb, logits_fb = arm.infer_feedback(images, random_probs(7))

    assert not torch.allclose(features, features_fb, atol=1e-4)
    assert not torch.allclose(logits, logits_fb, atol=1e-4)


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_feedback_step_trains_only_gain(arm_type):
    arm = build_arms(tiny_config(arm_type, feedback=True))[0]
    before = snapshot(arm)

    train_gains([arm])

    after = snapshot(arm)
    assert {"feedback.weight", "feedback.bias"} <= set(before)
    for name, value in after.items():
        if name.startswith("feedback."):
            assert not torch.equal(value, before[name]), f"{name} did not change"
        else:
            # Blocks, BatchNorm statistics, projection and head stay as pass 1 had them.
            assert torch.equal(value, before[name]), f"{name} changed"


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_gain_learns_from_arm_loss_only(arm_type):
    config = tiny_config(arm_type, feedback=True)
    arm = build_arms(config)[0]
    brain = build_brain(config, 10)
    images, labels = batch()
    features, logits = arm.infer(images)
    live = torch.ones(BATCH, config.arms, dtype=torch.bool)
    stacked_features = features[:, None].expand(-1, config.arms, -1)
    stacked_logits = logits[:, None].expand(-1, config.arms, -1)
    brain_logits, _ = brain(stacked_features, stacked_logits, live)
    probs = torch.softmax(brain_logits, 1)  # still attached to the brain's graph

    arm.train_feedback_step(images, labels, probs, None)

    assert probs.requires_grad
    for name, parameter in brain.named_parameters():
        assert parameter.grad is None, f"brain {name} has a gradient"
    for name, parameter in arm.named_parameters():
        if name.startswith("feedback."):
            assert parameter.grad is not None, f"{name} has no gradient"
        else:
            assert parameter.grad is None, f"arm {name} has a gradient"


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_pass_two_brain_loss_skips_arms(arm_type):
    config = tiny_config(arm_type, feedback=True)
    arms = build_arms(config)
    train_gains(arms)
    for arm in arms:
        arm.zero_grad(set_to_none=True)  # the gains' own training left gradients
    feedback_brain = build_brain(config, 10)
    images, labels = batch()
    probs = random_probs(0)

    outputs = [
        arm.infer_feedback(resize(images, arm.resolution), probs) for arm in arms
    ]
    features = torch.stack([arm_features for arm_features, _ in outputs], 1)
    logits = torch.stack([arm_logits for _, arm_logits in outputs], 1)
    live = torch.ones(BATCH, config.arms, dtype=torch.bool)
    brain_logits, _ = feedback_brain(features, logits, live)
    F.cross_entropy(brain_logits, labels).backward()

    assert not features.requires_grad
    assert not logits.requires_grad
    assert any(p.grad is not None for p in feedback_brain.parameters())
    for arm_id, arm in enumerate(arms):
        for name, parameter in arm.named_parameters():
            assert parameter.grad is None, f"arm {arm_id} {name} has a gradient"


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_hundred_class_shapes(arm_type):
    model = two_pass_model(arm_type, dataset="cifar100")
    arm = model.arms[0]
    images, labels = batch(classes=100)

    features, logits = arm.infer_feedback(images, random_probs(0, classes=100))
    metrics = arm.train_feedback_step(
        images, labels, random_probs(1, classes=100), None
    )
    brain_logits = model.predict_logits(uint8_images(3))

    last_output, _ = arm.encode(images)
    assert arm.feedback.weight.shape == (last_output.shape[1], 100)
    assert features.shape == (BATCH, 16)
    assert logits.shape == (BATCH, 100)
    assert brain_logits.shape == (3, 100)
    assert np.isfinite(metrics["feedback_head_loss"])


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_feedback_off_builds_same_arms(arm_type):
    plain = build_arms(tiny_config(arm_type))
    with_gain = build_arms(tiny_config(arm_type, feedback=True))

    for arm, twin in zip(plain, with_gain, strict=True):
        assert arm.feedback is None
        assert not any(name.startswith("feedback.") for name in arm.state_dict())
        twin_state = twin.state_dict()
        for name, value in arm.state_dict().items():
            assert torch.equal(value, twin_state[name]), f"{name} differs"


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_feedback_off_trains_same(arm_type):
    plain = build_arms(tiny_config(arm_type))[1]
    twin = build_arms(tiny_config(arm_type, feedback=True))[1]

    for step in range(3):
        images, labels = batch(seed=step)
        plain.train_step(resize(images, plain.resolution), labels, None)
        twin.train_step(resize(images, twin.resolution), labels, None)

    twin_state = twin.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, twin_state[name]), f"{name} differs"
    assert torch.equal(
        twin_state["feedback.weight"], torch.zeros_like(twin.feedback.weight)
    )


@pytest.mark.parametrize("arm_type", ARM_TYPES)
def test_untrained_gain_keeps_pass_one(arm_type):
    arm = build_arms(tiny_config(arm_type, feedback=True))[0]
    images, _ = batch()

    features, logits = arm.infer(images)
    features_fb, logits_fb = arm.infer_feedback(images, random_probs(0))

    assert torch.allclose(features, features_fb, atol=1e-6)
    assert torch.allclose(logits, logits_fb, atol=1e-5)


def test_feedback_off_predicts_as_before():
    config = tiny_config()
    arms = build_arms(config)
    torch.manual_seed(1)
    brain = build_brain(config, 10).eval()
    model = OctopusModel(config, arms, brain)
    images = uint8_images(5)

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    outputs = [arm.infer(resize(x, arm.resolution)) for arm in arms]
    features = torch.stack([f for f, _ in outputs], 1)
    logits = torch.stack([lg for _, lg in outputs], 1)
    expected, _ = brain(features, logits, torch.ones(5, 4, dtype=torch.bool))

    assert torch.allclose(model.predict_logits(images), expected, atol=1e-6)


def test_model_rejects_missing_pass_two_brain():
    config = tiny_config(feedback=True)
    brain = build_brain(config, 10)

    with pytest.raises(ValueError, match="feedback_brain is missing"):
        OctopusModel(config, build_arms(config), brain)


def test_feedback_rows_by_index():
    indices = np.array([40, 10, 30, 20], dtype=np.int64)
    probs = np.arange(8, dtype=np.float32).reshape(4, 2)

    rows = feedback_rows(indices, probs, np.array([20, 40]))

    assert rows.tolist() == [[6.0, 7.0], [0.0, 1.0]]
    with pytest.raises(KeyError, match="image 25"):
        feedback_rows(indices, probs, np.array([10, 25]))
    with pytest.raises(KeyError, match="empty"):
        feedback_rows(indices[:0], probs[:0], np.array([10]))


# The brain actor in this process (no Ray) behind its real ZeroMQ socket.

ROWS = 8
CLASSES = 10


@pytest.fixture
def brain(tmp_path):
    config = RunConfig(
        arms=2, bottleneck=8, heads=4, stream_timeout_s=2.0, feedback=True
    )
    labels = {"y_train": np.arange(100) % CLASSES, "y_test": np.arange(50) % CLASSES}
    actor = BrainActor(config.to_dict(), CLASSES, labels, str(tmp_path), TOKEN)
    yield actor
    actor.close()


@pytest.fixture
def push(brain):
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(brain.endpoint())
    yield socket
    socket.close()
    context.term()


def send_stream(push, stream_id: str, batches: int = 3, seed: int = 0) -> None:
    for arm_id in (0, 1):
        for batch_id in range(batches):
            rng = np.random.default_rng(seed * 1000 + arm_id * 100 + batch_id)
            indices = np.arange(batch_id * ROWS, (batch_id + 1) * ROWS, dtype=np.int64)
            push.send(
                wire.encode(
                    wire.ARM_OUTPUT,
                    token=TOKEN,
                    arm_id=arm_id,
                    stream_id=stream_id,
                    batch_id=batch_id,
                    indices=indices,
                    features=rng.standard_normal((ROWS, 8)).astype(np.float32),
                    logits=rng.standard_normal((ROWS, CLASSES)).astype(np.float32),
                )
            )
        push.send(
            wire.encode(
                wire.END_OF_STREAM,
                token=TOKEN,
                arm_id=arm_id,
                stream_id=stream_id,
                batches=batches,
            )
        )


def test_brain_returns_pass_one_probabilities(brain, push):
    send_stream(push, "train:1")

    result = brain.train_stream("train:1", [0, 1], epoch=1)

    feedback = result["feedback"]
    assert sorted(feedback["indices"].tolist()) == list(range(3 * ROWS))
    assert feedback["probs"].shape == (3 * ROWS, CLASSES)
    assert np.allclose(feedback["probs"].sum(1), 1.0, atol=1e-5)


def test_pass_two_brain_trains_alone(brain, push):
    send_stream(push, "train:1")
    brain.train_stream("train:1", [0, 1], epoch=1)
    pass_one = snapshot(brain.model)

    send_stream(push, "train:1:pass2", seed=1)
    result = brain.train_stream("train:1:pass2", [0, 1], epoch=1, feedback_pass=True)

    assert "feedback" not in result
    assert result["feedback_brain_samples"] == 3 * ROWS
    for name, value in snapshot(brain.model).items():
        assert torch.equal(value, pass_one[name]), f"pass-1 brain {name} changed"
    second = dict(brain.feedback_model.named_parameters())
    for name, value in brain.model.named_parameters():
        # It started as a copy of the pass-1 brain, so a difference is training.
        assert not torch.equal(second[name], value), (
            f"pass-2 brain {name} did not change"
        )


def train_pass_one(config: RunConfig, run_dir) -> dict[str, torch.Tensor]:
    """Train a brain built from `config` on one stream; return its pass-1 state."""
    labels = {"y_train": np.arange(100) % CLASSES, "y_test": np.arange(50) % CLASSES}
    actor = BrainActor(config.to_dict(), CLASSES, labels, str(run_dir), TOKEN)
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(actor.endpoint())
    try:
        send_stream(socket, "train:1")
        actor.train_stream("train:1", [0, 1], epoch=1)
        return snapshot(actor.model)
    finally:
        socket.close()
        context.term()
        actor.close()


def test_pass_one_brain_unchanged_by_feedback(tmp_path):
    # Dropout draws from torch's global generator, which each actor seeds.
    config = RunConfig(arms=2, bottleneck=8, heads=4, stream_timeout_s=2.0)
    with_feedback = dataclasses.replace(config, feedback=True)

    plain = train_pass_one(config, tmp_path / "plain")
    first = train_pass_one(with_feedback, tmp_path / "feedback")

    for name, value in first.items():
        assert torch.equal(value, plain[name]), f"pass-1 brain {name} differs"


def test_brain_checkpoint_holds_both_brains(brain, push):
    send_stream(push, "train:1")
    brain.train_stream("train:1", [0, 1], epoch=1)
    send_stream(push, "train:1:pass2", seed=1)
    brain.train_stream("train:1:pass2", [0, 1], epoch=1, feedback_pass=True)

    payload = load_checkpoint(brain.save("last"), "brain")

    for name, value in brain.model.state_dict().items():
        assert torch.equal(payload["state"]["model"][name], value), name
    for name, value in brain.feedback_model.state_dict().items():
        assert torch.equal(payload["state"]["feedback_model"][name], value), name


# One real distributed run.


@pytest.fixture(scope="module")
def feedback_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("feedback-runs")
    args = [
        "--arms",
        "4",
        "--gpus",
        "0",
        "--epochs",
        "1",
        "--train-limit",
        "1000",
        "--val-size",
        "300",
        "--test-limit",
        "500",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        "--run-name",
        "feedback",
        "--quiet",
        "--feedback",
    ]
    result = run_launch(args)
    return result, out / "feedback"


@pytest.mark.cluster
def test_feedback_run_beats_chance(feedback_run):
    result, run_dir = feedback_run
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    # Chance is 0.10 on 500 test images (std 0.013): 0.15 is nearly 4 std above it.
    assert results["test_samples"] == 500
    assert results["test_accuracy"] > 0.15
    assert results["best_val_accuracy"] > 0.15
    assert 0.0 <= results["test_pass1_accuracy"] <= 1.0


@pytest.mark.cluster
def test_feedback_run_trains_every_part(feedback_run):
    result, run_dir = feedback_run
    assert result.returncode == 0, result.stderr[-4000:]
    epoch = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert len(epoch["arms_feedback"]) == 4
    assert epoch["feedback_brain_samples"] == 1000
    checkpoints = run_dir / "checkpoints"
    for arm_id in range(4):
        payload = load_checkpoint(checkpoints / f"arm-{arm_id}-best.pt", "arm", arm_id)
        gain = payload["state"]["model"]["feedback.weight"]
        assert gain.abs().sum() > 0, f"arm {arm_id}'s gain stayed at zero"
    state = load_checkpoint(checkpoints / "brain-best.pt", "brain")["state"]
    changed = [
        name
        for name, value in state["feedback_model"].items()
        if not torch.equal(value, state["model"][name])
    ]
    assert changed, "the pass-2 brain equals the pass-1 brain"


@pytest.mark.cluster
def test_feedback_eval_reproduces_test_accuracy(feedback_run, data_dir):
    _, run_dir = feedback_run
    result = run_launch(["--eval", str(run_dir), "--data-dir", str(data_dir)])
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    evaluated = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert evaluated["test_accuracy"] == pytest.approx(
        results["test_accuracy"], abs=1e-9
    )
    assert evaluated["test_pass1_accuracy"] == pytest.approx(
        results["test_pass1_accuracy"], abs=1e-9
    )


@pytest.mark.cluster
def test_load_run_matches_feedback_run(feedback_run, data_dir):
    from common.datasets import load_dataset
    from deploy.api import load_run

    _, run_dir = feedback_run
    results = json.loads((run_dir / "results.json").read_text())
    data = load_dataset("cifar10", str(data_dir))
    model = load_run(run_dir)

    accuracy = model.evaluate(data.x_test[:500], data.y_test[:500])

    assert accuracy == pytest.approx(results["test_accuracy"], abs=0.005)


@pytest.mark.parametrize("module", ["deploy.serve", "deploy.resilience"])
def test_service_rejects_feedback_run(module, tmp_path, capsys):
    import importlib

    config = tiny_config(feedback=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

    status = importlib.import_module(module).main([str(tmp_path)])

    assert status == 2
    error = capsys.readouterr().err
    assert "--feedback" in error
    assert f"launch.py --eval {tmp_path}" in error
