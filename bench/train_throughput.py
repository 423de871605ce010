"""Measure local training throughput per arm and the wall time of one full epoch.

    python bench/train_throughput.py --data-dir ../shared/data
    python bench/train_throughput.py --data-dir ../shared/data --skip-epoch

Part 1 times `train_step` of every arm in this process, on real CIFAR-10 batches
prepared as the arm actor prepares them, with the thread count an arm actor gets.
Part 2 runs `launch.py --epochs 1` (local phase, brain phase, validation, test)
and reads its results. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from arms.augment import random_crop_flip, resize, to_tensor  # noqa: E402
from arms.model import build_arm  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.datasets import DATASET_INFO, load_dataset  # noqa: E402

CONFIGS = {
    "default (grouped, width 48)": {},
    "original widths (overlay FF, 64/128/256)": {
        "arm_scales": "1,2,4,8",
        "arm_type": "overlay",
        "width": 64,
        "depth": 3,
    },
}


def time_arm(
    config: RunConfig,
    arm_id: int,
    x_train: np.ndarray,
    y_train: np.ndarray,
    steps: int,
    warmup: int,
) -> dict:
    info = DATASET_INFO[config.dataset]
    arm = build_arm(config, arm_id, info)
    arm.configure_optimizer(config.lr, config.weight_decay, steps + warmup)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(arm_id)
    elapsed = 0.0
    for step in range(warmup + steps):
        batch = np.sort(rng.choice(len(x_train), config.batch_size, replace=False))
        start = time.perf_counter()
        x = random_crop_flip(to_tensor(x_train[batch]), 4, generator)
        x = resize(x, arm.resolution).contiguous(memory_format=torch.channels_last)
        arm.train_step(x, torch.from_numpy(y_train[batch]), None)
        if step >= warmup:
            elapsed += time.perf_counter() - start
    return {
        "arm_id": arm_id,
        "resolution": arm.resolution,
        "widths": [b.conv.out_channels for b in arm.blocks],
        "parameters": sum(p.numel() for p in arm.parameters()),
        "images_per_s": steps * config.batch_size / elapsed,
    }


def full_epoch(data_dir: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            str(REPO / "launch.py"),
            "--arms",
            "4",
            "--gpus",
            "0",
            "--dataset",
            "cifar10",
            "--epochs",
            "1",
            "--data-dir",
            data_dir,
            "--output-dir",
            out,
            "--run-name",
            "bench",
            *extra,
        ]
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = json.loads((Path(out) / "bench" / "results.json").read_text())
        metrics = json.loads(
            (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()[0]
        )
    return {
        "command": " ".join(["python", "launch.py", *command[2:]]),
        "process_wall_s": wall,
        "epoch_s": results["epoch_seconds"][0],
        "local_phase_s": metrics["local_seconds"],
        "arm_images_per_s": [a["images_per_s"] for a in metrics["arms"]],
        "val_accuracy": results["best_val_accuracy"],
        "test_accuracy": results["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("OCTOPUSNET_DATA_DIR", "data")
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (an arm actor gets CPUs / arms, at least 1)",
    )
    parser.add_argument("--skip-epoch", action="store_true", help="only part 1")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_dataset("cifar10", args.data_dir)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "arms": {},
    }
    for name, overrides in CONFIGS.items():
        config = RunConfig(**overrides)
        report["arms"][name] = [
            time_arm(
                config, arm_id, data.x_train, data.y_train, args.steps, args.warmup
            )
            for arm_id in range(config.arms)
        ]
    if not args.skip_epoch:
        report["full_epoch_default"] = full_epoch(args.data_dir, [])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
