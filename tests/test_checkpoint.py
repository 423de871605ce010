"""Checkpoints: save and load round trip, and CheckpointError for every bad file.

Run: pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    check_same_run,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
from common.config import RunConfig


class Opaque:
    """A class that a weights_only load must reject."""


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def arm_payload(arm_id: int = 2) -> dict:
    return {
        "state": {"model": tiny_model().state_dict(), "step": torch.tensor(7)},
        "kind": "arm",
        "arm_id": arm_id,
        "config": RunConfig(arms=4).to_dict(),
    }


def test_round_trip(tmp_path):
    path = tmp_path / "arms" / "arm2.pt"  # the parent directory does not exist yet
    payload = arm_payload()

    save_checkpoint(path, payload)
    loaded = load_checkpoint(path, kind="arm", arm_id=2)

    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["kind"] == "arm"
    assert loaded["arm_id"] == 2
    assert loaded["config"] == payload["config"]
    assert loaded["state"]["step"] == 7
    for name, value in payload["state"]["model"].items():
        assert torch.equal(loaded["state"]["model"][name], value), name


def test_round_trip_into_model(tmp_path):
    path = tmp_path / "arm2.pt"
    save_checkpoint(path, arm_payload())
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # other random weights

    load_state(model, load_checkpoint(path, "arm", 2)["state"]["model"], str(path))

    for name, value in tiny_model().state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_any_arm_id(tmp_path):
    # The brain's checkpoint has no arm id to check: arm_id=None skips the check.
    path = tmp_path / "brain.pt"
    save_checkpoint(path, {"state": {}, "kind": "brain", "arm_id": None, "config": {}})

    assert load_checkpoint(path, kind="brain")["kind"] == "brain"


def test_save_leaves_no_temporary_file(tmp_path):
    save_checkpoint(tmp_path / "arm2.pt", arm_payload())
    save_checkpoint(tmp_path / "arm2.pt", arm_payload())  # overwrite

    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm2.pt"]


def test_missing_file(tmp_path):
    path = tmp_path / "arm0.pt"

    with pytest.raises(CheckpointError, match="not found") as err:
        load_checkpoint(path, kind="arm", arm_id=0)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "arm2.pt"
    save_checkpoint(path, arm_payload())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, kind="arm", arm_id=2)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a checkpoint", bytes(range(256)) * 8],
    ids=["empty", "text", "bytes"],
)
def test_garbage_file(tmp_path, data):
    path = tmp_path / "arm2.pt"
    path.write_bytes(data)

    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, kind="arm", arm_id=2)


def test_pickled_object_rejected(tmp_path):
    path = tmp_path / "arm2.pt"
    torch.save(
        {"format_version": FORMAT_VERSION, "kind": "arm", "extra": Opaque()}, path
    )

    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, kind="arm")


@pytest.mark.parametrize(
    "payload",
    [
        {"kind": "arm", "arm_id": 2},  # no format_version
        {"format_version": FORMAT_VERSION + 1, "kind": "arm", "arm_id": 2},
        [1, 2, 3],
    ],
    ids=["unversioned", "newer", "list"],
)
def test_unknown_format(tmp_path, payload):
    path = tmp_path / "arm2.pt"
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="unknown format"):
        load_checkpoint(path, kind="arm", arm_id=2)


@pytest.mark.parametrize(
    ("kind", "arm_id"), [("brain", None), ("brain", 2), ("arm", 3)]
)
def test_wrong_kind_or_arm(tmp_path, kind, arm_id):
    path = tmp_path / "arm2.pt"
    save_checkpoint(path, arm_payload(arm_id=2))

    with pytest.raises(CheckpointError, match="expected"):
        load_checkpoint(path, kind=kind, arm_id=arm_id)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)),  # other shapes
        nn.Sequential(nn.Linear(4, 3)),  # unexpected keys in the state
        nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)),  # missing
    ],
    ids=["shapes", "unexpected", "missing"],
)
def test_load_state_mismatch(model):
    with pytest.raises(CheckpointError, match="does not fit") as err:
        load_state(model, tiny_model().state_dict(), "runs/x/arm2.pt")
    assert "runs/x/arm2.pt" in str(err.value)


def test_same_run_checkpoint_accepted():
    config = RunConfig(run_name="a").to_dict()
    check_same_run({"config": dict(config)}, config, "arm-0-best.pt")


@pytest.mark.parametrize(
    ("key", "value"), [("run_name", "b"), ("seed", 7), ("width", 64)]
)
def test_other_run_checkpoint_rejected(key, value):
    config = RunConfig(run_name="a").to_dict()
    with pytest.raises(CheckpointError, match=f"another run.*'{key}'"):
        check_same_run({"config": {**config, key: value}}, config, "arm-0-best.pt")


def test_checkpoint_without_config_rejected():
    with pytest.raises(CheckpointError, match="no run config"):
        check_same_run({}, RunConfig().to_dict(), "brain-best.pt")
