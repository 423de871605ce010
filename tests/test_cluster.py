"""End-to-end runs of launch.py on a real local Ray cluster with real ZeroMQ sockets.

Each test starts `launch.py` as a user would, on real CIFAR-10 images, and checks
what it prints, what it writes, and that no Ray or arm process is left behind.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_launch

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.cluster


def leftover_processes(stderr: str) -> list[str]:
    """Processes of the Ray cluster and actors that a launch.py run reported."""
    sessions = re.findall(r"Ray session (\S+)", stderr)
    pids = {int(pid) for pid in re.findall(r"(?:brain|arm-\d+)=(\d+)", stderr)}
    out = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True
    ).stdout
    left = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if int(pid) in pids or any(session in args for session in sessions):
            left.append(line.strip()[:200])
    return left


def wait_for_no_leftovers(stderr: str, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    left = leftover_processes(stderr)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftover_processes(stderr)
    return left


def test_training_run_exits_cleanly(trained_run):
    result, _ = trained_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert "test accuracy" in result.stdout
    assert "validation accuracy" in result.stdout


def test_training_beats_chance(trained_run):
    _, run_dir = trained_run
    results = json.loads((run_dir / "results.json").read_text())
    # Chance is 0.10 on 1,000 test images (std 0.0095): 0.2 is far above it.
    assert results["test_samples"] == 1000
    assert results["test_accuracy"] > 0.2
    assert results["best_val_accuracy"] > 0.2


def test_run_directory_written(trained_run):
    _, run_dir = trained_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arms"] == 4
    assert config["git_revision"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    epoch = json.loads(lines[0])
    assert len(epoch["arms"]) == 4
    for arm in epoch["arms"]:
        assert arm["images_per_s"] > 0
        assert "ff_loss" in arm
        assert "goodness_pos" in arm
        assert "goodness_neg" in arm
    assert 0.0 <= epoch["val_accuracy"] <= 1.0
    for name in ["brain-best.pt", "brain-last.pt"] + [
        f"arm-{i}-best.pt" for i in range(4)
    ]:
        assert (run_dir / "checkpoints" / name).is_file(), name
    assert (run_dir / "run.log").stat().st_size > 0


def test_no_ray_process_left(trained_run):
    result, _ = trained_run
    assert "Ray session" in result.stderr
    assert len(re.findall(r"(?:brain|arm-\d+)=\d+", result.stderr)) == 5
    assert wait_for_no_leftovers(result.stderr) == []


def test_eval_reproduces_test_accuracy(trained_run, data_dir):
    _, run_dir = trained_run
    result = run_launch(["--eval", str(run_dir), "--data-dir", str(data_dir)])
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    evaluated = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert evaluated["test_accuracy"] == pytest.approx(
        results["test_accuracy"], abs=1e-9
    )
    assert "Ray session" in result.stderr
    assert wait_for_no_leftovers(result.stderr) == []


def test_eval_rejects_corrupted_checkpoint(trained_run, data_dir, tmp_path):
    _, run_dir = trained_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoints" / "arm-2-best.pt").write_bytes(b"not a checkpoint")
    result = run_launch(["--eval", str(broken), "--data-dir", str(data_dir)])
    assert result.returncode == 2
    assert "arm-2-best.pt" in result.stderr
    assert "corrupted" in result.stderr
    assert "Ray session" in result.stderr
    assert wait_for_no_leftovers(result.stderr) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--arms", "0"], "number of arms (--arms)"),
        (["--gpus", "4"], "--gpus 4 asks for more GPUs"),
        (
            ["--data-dir", "/nonexistent-octopusnet"],
            "/nonexistent-octopusnet/cifar10.npz",
        ),
        (["--competition", "topk", "--top-k", "9"], "invalid top-k 9"),
        (["--train-limit", "100"], "100 training images make no batch of 128"),
        (["--device", "cuda"], "--device cuda needs GPUs"),
    ],
)
def test_bad_input_rejected(args, expected, tmp_path, data_dir):
    base = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path)]
    result = run_launch([*base, *args], timeout_s=120)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Ray session" not in result.stderr  # rejected before Ray starts


def test_unknown_dataset_rejected(tmp_path):
    result = run_launch(
        ["--dataset", "imagenet", "--output-dir", str(tmp_path)], timeout_s=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'imagenet'" in result.stderr


def test_brain_port_in_use_rejected(tmp_path, data_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_launch(
            [
                "--data-dir",
                str(data_dir),
                "--output-dir",
                str(tmp_path),
                "--train-limit",
                "256",
                "--brain-port",
                str(port),
            ],
            timeout_s=300,
        )
    assert result.returncode == 2
    assert f"tcp://127.0.0.1:{port}" in result.stderr
    assert "--brain-port" in result.stderr
    assert "Ray session" in result.stderr
    assert wait_for_no_leftovers(result.stderr) == []


def test_report_figures_written(trained_run):
    _, run_dir = trained_run
    result = run_launch(["--report", str(run_dir)], timeout_s=120)
    assert result.returncode == 0, result.stderr[-4000:]
    report = (run_dir / "report.md").read_text()
    for figure in [
        "arm_training.png",
        "validation.png",
        "arm_class_accuracy.png",
        "class_attention.png",
    ]:
        path = run_dir / figure
        assert path.stat().st_size > 10_000, figure
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"({figure})" in report
    assert "git revision" in report
    assert "test accuracy" in report


def test_dashboard_port_in_use_rejected(tmp_path, data_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_launch(
            [
                "--data-dir",
                str(data_dir),
                "--output-dir",
                str(tmp_path),
                "--dashboard-port",
                str(port),
            ],
            timeout_s=120,
        )
    assert result.returncode == 2
    assert f"dashboard port {port}" in result.stderr
    assert "Ray session" not in result.stderr  # rejected before Ray starts


def test_eval_rejects_other_runs_checkpoints(trained_run, data_dir, tmp_path):
    _, run_dir = trained_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "run_name": "renamed"}))
    result = run_launch(["--eval", str(other), "--data-dir", str(data_dir)])
    assert result.returncode == 2
    assert "belongs to another run" in result.stderr
    assert "Ray session" in result.stderr
    assert wait_for_no_leftovers(result.stderr) == []
