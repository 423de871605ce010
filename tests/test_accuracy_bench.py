"""bench/accuracy.py: a budgeted run on real CIFAR-10 writes its curve, choice and plot.

Run: pytest tests/test_accuracy_bench.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_bench(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "accuracy.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_budgeted_run_writes_curve_and_plot(data_dir, tmp_path):
    output = tmp_path / "accuracy"
    result = run_bench(
        [
            "--budget-minutes",
            "0.5",
            "--arms",
            "2",
            "--arm-type",
            "residual",
            "--arm-scales",
            "2",
            "--width",
            "10",
            "--train-limit",
            "1500",
            "--val-size",
            "300",
            "--test-limit",
            "500",
            "--threads",
            "1",
            "--data-dir",
            str(data_dir),
            "--output",
            str(output),
        ]
    )

    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((output / "accuracy.json").read_text())
    assert (output / "accuracy.png").stat().st_size > 10_000
    assert (output / "best.pt").is_file()
    curve = record["curve"]
    assert 1 <= len(curve) <= record["planned_epochs"]
    times = [point["elapsed_s"] for point in curve]
    assert times == sorted(times)
    best = record["best"]
    assert best["val_accuracy"] == max(point["val_accuracy"] for point in curve)
    # Chance is 0.10 on 500 test images (std 0.013).
    assert record["test_accuracy"] > 0.15
    assert record["test_images"] == 500
    assert record["val_images"] == 300
    assert record["hardware"]["threads"] == 1
    assert record["config"]["arm_type"] == "residual"
    assert record["git_revision"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--budget-minutes", "0"], "must be greater than 0"),
        (["--budget-minutes", "nan"], "budget-minutes"),
        (["--budget-minutes", "1", "--threads", "0"], "threads"),
        (["--budget-minutes", "1", "--compress", "avg"], "invalid choice"),
        (["--budget-minutes", "1", "--eval", "runs/x"], "unrecognized arguments"),
    ],
)
def test_bad_options_rejected(args, expected):
    result = run_bench(args)

    assert result.returncode == 2
    assert expected in result.stderr
