"""Shared fixtures: the real datasets' directory. Torch runs on one CPU thread."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# As deploy/__init__.py does, before any test module imports Ray: the tests that
# join the service's cluster by address need token authentication turned on.
os.environ.setdefault("RAY_AUTH_MODE", "token")

# The unit tests use tiny tensors that gain nothing from intra-op threads, and one
# thread keeps them from slowing a training run that shares the machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Directory with the real cifar10.npz: $OCTOPUSNET_DATA_DIR, else ../shared/data."""
    candidates = [
        os.environ.get("OCTOPUSNET_DATA_DIR"),
        REPO.parent / "shared" / "data",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cifar10.npz").is_file():
            return Path(candidate)
    pytest.fail(
        "cifar10.npz not found in $OCTOPUSNET_DATA_DIR or ../shared/data: set "
        "OCTOPUSNET_DATA_DIR to the directory holding the real datasets"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_launch(args: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run launch.py with a free dashboard port, so a user's own cluster is no obstacle."""
    own_port = "--report" in args or "--dashboard-port" in args
    port = [] if own_port else ["--dashboard-port", str(free_port())]
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args, *port],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """One short distributed training run on 3,000 real CIFAR-10 images."""
    out = tmp_path_factory.mktemp("runs")
    args = [
        "--arms",
        "4",
        "--gpus",
        "0",
        "--dataset",
        "cifar10",
        "--epochs",
        "2",
        "--train-limit",
        "3000",
        "--val-size",
        "500",
        "--test-limit",
        "1000",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        "--run-name",
        "short",
    ]
    result = run_launch(args)
    return result, out / "short"
