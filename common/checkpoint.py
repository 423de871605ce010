"""Checkpoints: atomic writes, `weights_only=True` loads, and checks that they fit.

A checkpoint is a dict of `state` (tensors, possibly nested in dicts), `kind`
(`arm` or `brain`), `arm_id` and `config` (the run config as a plain dict).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted or belongs to another model."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike, kind: str, arm_id: int | None = None
) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` and check its kind and arm id."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found: train the run first, or check the run directory"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a checkpoint ({err}); "
            "delete it and train again, or restore it from a backup"
        ) from err
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has an unknown format (expected format_version "
            f"{FORMAT_VERSION}); it was not written by this OctopusNet release"
        )
    if payload.get("kind") != kind or (
        arm_id is not None and payload.get("arm_id") != arm_id
    ):
        raise CheckpointError(
            f"checkpoint {path} contains {payload.get('kind')} {payload.get('arm_id')}, "
            f"expected {kind} {arm_id}: the run directory's files are mixed up"
        )
    return payload


# Config keys that identify a run: checkpoints of one run agree on all of them.
RUN_KEYS = (
    "run_name",
    "seed",
    "dataset",
    "arms",
    "arm_type",
    "arm_scales",
    "width",
    "depth",
    "bottleneck",
    "compress",
    "residual_blocks",
    "goodness_layers",
    "feedback",
)


def check_same_run(payload: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Raise CheckpointError unless the checkpoint was saved by the run of `config`."""
    saved = payload.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} carries no run config")
    differences = {
        key: (saved.get(key), config.get(key))
        for key in RUN_KEYS
        if saved.get(key) != config.get(key)
    }
    if differences:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run (saved vs expected: "
            f"{differences}); restore this run's own checkpoint"
        )


def load_state(
    module: torch.nn.Module, state: dict[str, torch.Tensor], path: str
) -> None:
    """Load a module's state, naming the mismatched keys and shapes on failure."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from the run config "
            f"({err}); evaluate it with the config.json it was saved with"
        ) from err
