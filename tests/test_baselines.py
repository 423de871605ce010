"""Backprop baselines: failure logic on tiny tensors, then a real 1-epoch CIFAR-10 run.

Run: pytest tests/test_baselines.py
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch

from common.config import RunConfig
from common.datasets import DATASET_INFO
from deploy.baseline_models import (
    MultiscaleNet,
    PlainCNN,
    arm_parameters,
    build_multiscale_net,
    build_plain_cnn,
    case_name,
    failure_cases,
    sample_live,
)
from deploy.baselines import MODELS, main, train_baselines

CIFAR = DATASET_INFO["cifar10"]


def tiny_plain() -> PlainCNN:
    torch.manual_seed(0)
    return PlainCNN(3, 10, 4, CIFAR.mean, CIFAR.std).eval()


def tiny_multiscale() -> MultiscaleNet:
    torch.manual_seed(0)
    widths = [[4, 8, 8, 8], [4, 8, 8], [4, 8], [4]]
    return MultiscaleNet(3, 10, [32, 16, 8, 4], widths, 8, CIFAR.mean, CIFAR.std)


def live_subsets(branches: int) -> list[tuple[int, ...]]:
    """Every non-empty set of live branches."""
    return [
        subset
        for size in range(1, branches + 1)
        for subset in itertools.combinations(range(branches), size)
    ]


def test_plain_cnn_zeroing_none_keeps_output():
    model = tiny_plain()
    images = torch.rand(4, 3, 32, 32)

    assert torch.equal(model(images, zeroed=()), model(images))
    assert torch.equal(model(images, zeroed=set()), model(images))


@pytest.mark.parametrize("zeroed", [{0}, {1}, {2}, {3}, {0, 2}, {1, 3}])
def test_plain_cnn_zeroed_block_changes_output(zeroed):
    model = tiny_plain()
    images = torch.rand(4, 3, 32, 32)

    assert not torch.allclose(model(images, zeroed=zeroed), model(images))


def test_plain_cnn_rejects_unknown_block():
    with pytest.raises(ValueError, match=r"invalid zeroed blocks \[4\]"):
        tiny_plain()(torch.rand(1, 3, 32, 32), zeroed={4})


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("live_ids", live_subsets(4), ids=str)
def test_multiscale_masked_branches_have_no_influence(live_ids, training):
    model = tiny_multiscale().train(training)
    inputs = model.branch_inputs(torch.rand(6, 3, 32, 32))
    live = torch.tensor([i in live_ids for i in range(4)])
    perturbed = [
        x if i in live_ids else torch.randn_like(x) * 100 for i, x in enumerate(inputs)
    ]

    expected = model.fuse(model.encode(inputs), live)
    actual = model.fuse(model.encode(perturbed), live)

    assert torch.equal(actual, expected)


def test_multiscale_live_branch_influences_output():
    model = tiny_multiscale().eval()
    inputs = model.branch_inputs(torch.rand(6, 3, 32, 32))
    live = torch.tensor([True, False, True, False])
    perturbed = [inputs[0] + torch.randn_like(inputs[0]), *inputs[1:]]

    expected = model.fuse(model.encode(inputs), live)
    actual = model.fuse(model.encode(perturbed), live)

    assert not torch.allclose(actual, expected)


def test_multiscale_masked_nan_vector_ignored():
    model = tiny_multiscale().eval()
    features = torch.randn(3, 4, 8)
    live = torch.tensor([[True, True, False, True]] * 3)
    poisoned = features.clone()
    poisoned[:, 2] = float("nan")

    assert torch.equal(model.fuse(poisoned, live), model.fuse(features, live))


def test_multiscale_fuses_mean_of_live_vectors():
    model = tiny_multiscale().eval()
    features = torch.randn(3, 4, 8)
    live = torch.tensor([True, True, False, True])

    expected = model.classifier(features[:, [0, 1, 3]].mean(dim=1))
    actual = model.fuse(features, live)

    torch.testing.assert_close(actual, expected)


def test_multiscale_all_live_equals_plain_mean():
    model = tiny_multiscale().eval()
    features = torch.randn(3, 4, 8)

    expected = model.fuse(features, None)
    actual = model.fuse(features, torch.ones(3, 4, dtype=torch.bool))

    torch.testing.assert_close(actual, expected)


def test_multiscale_training_applies_module_dropout():
    model = tiny_multiscale().train()
    images = torch.rand(64, 3, 32, 32)
    all_live = torch.ones(4, dtype=torch.bool)

    torch.manual_seed(1)
    dropped = model(images)
    model.module_dropout = 0.0
    kept = model(images)

    assert not torch.allclose(dropped, model(images, all_live))
    assert torch.equal(kept, model(images, all_live))


def test_multiscale_eval_keeps_every_branch():
    model = tiny_multiscale().eval()
    images = torch.rand(8, 3, 32, 32)

    assert torch.equal(model(images), model(images, torch.ones(4, dtype=torch.bool)))


@pytest.mark.parametrize("model_factory", [tiny_plain, tiny_multiscale])
def test_logits_with_failures_match_forward(model_factory):
    model = model_factory().eval()
    images = torch.rand(5, 3, 32, 32)
    cases = [(), *model.failure_cases()]

    logits = model.logits_with_failures(images, cases)

    assert list(logits) == cases
    for failed in cases:
        if isinstance(model, PlainCNN):
            expected = model(images, zeroed=failed)
        else:
            expected = model(images, torch.tensor([i not in failed for i in range(4)]))
        torch.testing.assert_close(logits[failed], expected, msg=f"case {failed}")


def test_multiscale_rejects_no_live_branch():
    model = tiny_multiscale().eval()
    live = torch.tensor([[True, False, False, False], [False] * 4])

    with pytest.raises(ValueError, match="1 samples have no live branch"):
        model.fuse(torch.randn(2, 4, 8), live)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("branches", [2, 4, 5])
def test_module_dropout_rates(p, branches):
    samples = 20_000
    generator = torch.Generator().manual_seed(0)

    live = sample_live(samples, branches, p, generator=generator)
    removed = (~live).sum(dim=1)
    dropped = removed > 0

    assert live.shape == (samples, branches)
    assert live.any(dim=1).all(), "a sample lost every branch"
    assert abs(dropped.float().mean().item() - p) < 0.015
    if p > 0:
        # The number removed is uniform over 1..N-1, and every branch is masked
        # equally often.
        counts = torch.bincount(removed[dropped], minlength=branches)
        shares = counts[1:].float() / dropped.sum()
        assert counts[0] == 0
        torch.testing.assert_close(
            shares, torch.full_like(shares, 1 / (branches - 1)), atol=0.02, rtol=0
        )
        hit = (~live).float().sum(dim=0) / (~live).sum()
        torch.testing.assert_close(
            hit, torch.full_like(hit, 1 / branches), atol=0.02, rtol=0
        )


def test_module_dropout_single_branch_stays_live():
    live = sample_live(100, 1, 0.5, generator=torch.Generator().manual_seed(0))

    assert live.all()


def test_module_dropout_rejects_bad_probability():
    with pytest.raises(ValueError, match="invalid module dropout 1.5"):
        sample_live(4, 4, 1.5)


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_parameter_counts_match_arms(dataset):
    config = RunConfig(dataset=dataset)
    info = DATASET_INFO[dataset]
    target = arm_parameters(config, info)

    for model in (build_plain_cnn(config, info), build_multiscale_net(config, info)):
        count = sum(p.numel() for p in model.parameters())
        assert 0.8 * target < count < 1.25 * target, (
            f"{type(model).__name__}: {count} parameters, arms {target}"
        )


def test_multiscale_branches_follow_arm_resolutions():
    model = build_multiscale_net(RunConfig(arm_scales="1,2,4,8"), CIFAR)

    assert model.resolutions == [32, 16, 8, 4]
    assert [len(branch.blocks) for branch in model.branches] == [4, 3, 2, 1]


def test_failure_cases_singles_and_pairs():
    cases = failure_cases(4, keep_one=False)

    assert cases[:4] == [(0,), (1,), (2,), (3,)]
    assert len(cases) == 10
    assert failure_cases(2, keep_one=True) == [(0,), (1,)]
    assert case_name((0, 2)) == "0+2"


@pytest.fixture
def restore_logging():
    """Undo the stderr handler that `main` installs, since capsys closes that stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_config(run_dir, **values) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(RunConfig(**values).to_dict()))


def test_cli_missing_run_dir(tmp_path, capsys, restore_logging):
    assert main([str(tmp_path / "absent")]) == 2
    assert "absent not found" in capsys.readouterr().err


def test_cli_invalid_config_json(tmp_path, capsys, restore_logging):
    (tmp_path / "config.json").write_text("{not json")

    assert main([str(tmp_path)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_cli_unknown_config_key(tmp_path, capsys, restore_logging):
    (tmp_path / "config.json").write_text(json.dumps({"epoch": 3}))

    assert main([str(tmp_path)]) == 2
    assert "unknown config keys ['epoch']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "invalid epochs 0"),
        (["--threads", "-1"], "invalid threads -1"),
        (["--train-limit", "-5"], "invalid train limit -5"),
        (["--module-dropout", "2"], "invalid module dropout 2.0"),
    ],
)
def test_cli_invalid_flags(tmp_path, capsys, restore_logging, flags, message):
    write_config(tmp_path, data_dir=str(tmp_path))

    assert main([str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_dataset(tmp_path, capsys, restore_logging):
    write_config(tmp_path, data_dir=str(tmp_path / "nowhere"))

    assert main([str(tmp_path)]) == 2
    assert "cifar10.npz" in capsys.readouterr().err


def test_train_baselines_real_cifar10(tmp_path, data_dir):
    config = RunConfig(
        dataset="cifar10",
        data_dir=str(data_dir),
        val_size=1000,
        train_limit=2000,
        test_limit=500,
        device="cpu",
    )

    results = train_baselines(config, tmp_path, epochs=1, threads=1)

    assert json.loads((tmp_path / "baselines.json").read_text()) == results
    assert results["test_samples"] == 500
    assert results["config"]["train_limit"] == 2000
    assert results["git_revision"]
    assert results["hardware"]["device"] == "cpu"
    assert set(results["models"]) == {"plain_cnn", "multiscale"}
    expected_cases = {"0", "1", "2", "3", "0+1", "0+2", "0+3", "1+2", "1+3", "2+3"}
    for name, model in results["models"].items():
        assert model["name"] == name
        assert model["epochs"] == 1
        assert model["best_epoch"] == 1
        assert model["test_accuracy"] > 0.1, f"{name} is no better than chance"
        assert 0.0 <= model["val_accuracy"] <= 1.0
        assert set(model["failure_test_accuracy"]) == expected_cases
        singles = {
            k: v for k, v in model["failure_test_accuracy"].items() if "+" not in k
        }
        assert model["worst_single"]["accuracy"] == min(singles.values())
        assert model["worst_pair"]["case"] in expected_cases - set(singles)
        assert model["train_seconds"] > 0
        state = torch.load(tmp_path / "baselines" / f"{name}.pt", weights_only=True)
        MODELS[name][1](config, CIFAR).load_state_dict(state)  # strict: keys and shapes
