"""RunConfig: ConfigError names each invalid value, and dicts round-trip.

Run: pytest tests/test_config.py
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.config import ConfigError, RunConfig


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"arms": 0}, "number of arms (--arms) 0"),
        ({"arms": 65}, "number of arms (--arms) 65"),
        ({"dataset": "imagenet"}, "dataset 'imagenet'"),
        ({"arm_type": "dense"}, "arm type 'dense'"),
        ({"competition": "vote"}, "competition 'vote'"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"precision": "fp8"}, "precision 'fp8'"),
        ({"competition": "topk", "top_k": 0}, "top-k 0"),
        ({"competition": "topk", "arms": 4, "top_k": 5}, "top-k 5"),
        (
            {"bottleneck": 66, "heads": 4},
            "bottleneck 66 is not divisible by the 4 attention heads",
        ),
        ({"brain_host": "0.0.0.0"}, "brain host '0.0.0.0'"),
        ({"brain_host": "192.168.1.20"}, "brain host '192.168.1.20'"),
        ({"epochs": 0}, "epochs 0"),
        ({"batch_size": 1}, "batch size 1"),
        ({"lr": 0.0}, "learning rate 0.0"),
        ({"dropout": 1.0}, "dropout 1.0"),
        ({"brain_port": 70000}, "brain port 70000"),
        ({"stream_timeout_s": 0.5}, "stream timeout 0.5"),
    ],
)
def test_invalid_value_named(values, named):
    with pytest.raises(ConfigError) as err:
        RunConfig(**values)

    assert named in str(err.value)


@pytest.mark.parametrize(
    "values",
    [
        {"arms": 1},
        {"arms": 64},
        {"competition": "topk", "arms": 4, "top_k": 4},
        {"competition": "topk", "arms": 4, "top_k": 1},
        {"bottleneck": 66, "heads": 4, "nerve_ring": False},
        {"brain_host": "localhost"},
        {"brain_host": "0.0.0.0", "address": "head-node:6379"},
    ],
)
def test_valid_edge_values(values):
    config = RunConfig(**values)

    for name, value in values.items():
        assert getattr(config, name) == value


def test_from_dict_unknown_keys():
    values = {**RunConfig().to_dict(), "armz": 3, "learning_rate": 0.1}

    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(values)

    assert "'armz'" in str(err.value)
    assert "'learning_rate'" in str(err.value)


def test_from_dict_checks_values():
    with pytest.raises(ConfigError, match="'imagenet'"):
        RunConfig.from_dict({"dataset": "imagenet"})


def test_dict_round_trip():
    config = RunConfig(
        dataset="cifar100",
        arms=3,
        arm_type="overlay",
        competition="topk",
        top_k=3,
        multiscale=False,
        lr=1e-3,
        git_revision="abc1234",
    )

    restored = RunConfig.from_dict(config.to_dict())

    assert restored == config
    # git_revision is left out of ==, so it is compared on its own.
    assert restored.git_revision == "abc1234"


def test_json_round_trip():
    # config.json stores the run's config, and actors rebuild it from the dict.
    config = RunConfig(dataset="mnist", width=32, gumbel_tau=0.25, git_revision="f00")

    restored = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))

    assert restored == config
    assert restored.git_revision == "f00"


def test_config_frozen():
    config = RunConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.arms = 2


@pytest.mark.parametrize("field", ["lr", "brain_lr", "goodness_scale", "threshold"])
def test_config_rejects_nan(field):
    with pytest.raises(ConfigError, match="finite"):
        RunConfig(**{field: float("nan")})


@pytest.mark.parametrize("cpus", [0.5, 1.5])
def test_config_rejects_fractional_cpus(cpus):
    with pytest.raises(ConfigError, match="whole number of CPUs"):
        RunConfig(cpus=cpus)


@pytest.mark.parametrize(
    "values",
    [[1], {"lr": None}, {"arms": "4"}, {"epochs": 2.5}, {"nerve_ring": 1}],
)
def test_from_dict_rejects_wrong_types(values):
    with pytest.raises(ConfigError):
        RunConfig.from_dict(values)


def test_constructor_rejects_float_arms():
    with pytest.raises(ConfigError, match="arms=2.5"):
        RunConfig(arms=2.5)


def test_feedback_with_several_goodness_layers_rejected():
    with pytest.raises(ConfigError, match="--goodness-layers 1 with --feedback"):
        RunConfig(feedback=True, goodness_layers=2)
