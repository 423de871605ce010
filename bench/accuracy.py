"""Train a configuration's arms for a wall-clock budget; record accuracy against time.

python bench/accuracy.py --budget-minutes 100 --arms 1 --arm-type residual \
    --arm-scales 1 --width 60 --data-dir ../shared/data --output runs/accuracy-residual

Takes every option of `launch.py` (the same RunConfig). The arms train one after
another in this process, each with its own local objective, on the same splits and
augmentation as the arm actors. Nothing passes between arms. A short timing of each
arm's training steps sets the number of epochs that fit the budget, so the cosine
schedules end when the budget does. After each epoch the validation split is scored:
the prediction is the mean over arms of the softmax of each arm's goodness, averaged
over its last K layers, with K from 1 to the arm's layer count. The epoch and K with
the best validation accuracy are kept, and the test split is scored once, at the end.
Writes accuracy.json, accuracy.png and the chosen arms' weights (best.pt) in --output.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from arms.augment import random_crop_flip, resize, to_tensor  # noqa: E402
from arms.model import LocalArm, build_arm, combine_layers  # noqa: E402
from common.config import ConfigError, RunConfig  # noqa: E402
from common.datasets import DatasetError, load_dataset, split_indices  # noqa: E402
from deploy.cli import positive_float, positive_int  # noqa: E402
from deploy.experiment_report import hardware as machine_hardware  # noqa: E402
from launch import build_config, build_parser  # noqa: E402

# The original's best CIFAR-10 figures (single runs, 30 to 100 epochs) and the target.
REFERENCE_LINES = {
    "original, average of arms' logits (53.59%)": 0.5359,
    "original, channel grouping + stride convs (68.65%)": 0.6865,
    "target (70%)": 0.70,
}
# Share of the budget planned for training and validation; the rest absorbs drift.
PLANNED_SHARE = 0.92
MAX_EPOCHS = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(description=__doc__.split("\n\n")[0], saved_runs=False)
    bench = parser.add_argument_group("budget")
    bench.add_argument(
        "--budget-minutes",
        type=positive_float,
        required=True,
        help="wall-clock minutes for training and validation",
    )
    bench.add_argument(
        "--threads",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="torch threads of this process",
    )
    bench.add_argument(
        "--output",
        default=None,
        help="directory for accuracy.json, accuracy.png and best.pt "
        "(None: OUTPUT_DIR/accuracy-<time stamp>)",
    )
    return parser.parse_args(argv)


def hardware(threads: int, device: torch.device) -> dict:
    """Describe this machine and this run's threads and device."""
    machine = machine_hardware()
    return {
        "cpu": machine["cpu_model"],
        "cores": machine["cores"],
        "threads": threads,
        "torch": machine["torch"],
        "device": str(device),
        "gpu": machine["gpu"] if device.type == "cuda" else None,
    }


class Trainer:
    """The arms of one configuration, trained in this process on one dataset."""

    def __init__(self, config: RunConfig, data, device: torch.device):
        self.config = config
        self.device = device
        self.info = data.info
        self.data = data
        self.train_idx, self.val_idx = split_indices(
            len(data.x_train), config.val_size, config.seed, config.train_limit
        )
        self.test_count = config.test_limit or len(data.x_test)
        self.arms: list[LocalArm] = []
        self.generators = []
        for arm_id in range(config.arms):
            torch.manual_seed(config.seed * 1000 + arm_id)
            self.arms.append(build_arm(config, arm_id, self.info).to(device))
            self.generators.append(
                torch.Generator().manual_seed(config.seed * 1000 + arm_id)
            )
        self.steps_per_epoch = len(self.train_idx) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{len(self.train_idx)} training images make no batch of "
                f"{config.batch_size}: lower --batch-size or raise --train-limit"
            )
        self.autocast = torch.bfloat16 if config.precision == "bf16" else None

    def _batch(self, arm_id: int, indices: np.ndarray, augment: bool) -> torch.Tensor:
        x = to_tensor(self.data.x_train[indices])
        if augment:
            x = random_crop_flip(
                x, pad=max(1, x.shape[-1] // 8), generator=self.generators[arm_id]
            )
        x = resize(x, self.arms[arm_id].resolution)
        return x.to(self.device).contiguous(memory_format=torch.channels_last)

    def time_steps(self, steps: int = 8) -> float:
        """Return the seconds per training epoch of all arms, timed on copies of them."""
        total = 0.0
        batch = self.train_idx[: self.config.batch_size]
        labels = torch.from_numpy(self.data.y_train[batch]).to(self.device)
        for arm_id, arm in enumerate(self.arms):
            trial = copy.deepcopy(arm)
            trial.configure_optimizer(self.config.lr, self.config.weight_decay, steps)
            trial.train_step(self._batch(arm_id, batch, True), labels, self.autocast)
            start = time.perf_counter()
            for _ in range(steps):
                images = self._batch(arm_id, batch, self.config.augment)
                trial.train_step(images, labels, self.autocast)
            total += (time.perf_counter() - start) / steps * self.steps_per_epoch
        return total

    def train_epoch(self, epoch: int, bar: tqdm) -> None:
        for arm_id, arm in enumerate(self.arms):
            order = self.train_idx[
                np.random.default_rng([self.config.seed + arm_id, epoch]).permutation(
                    len(self.train_idx)
                )
            ]
            for step in range(self.steps_per_epoch):
                batch = np.sort(
                    order[
                        step * self.config.batch_size : (step + 1)
                        * self.config.batch_size
                    ]
                )
                images = self._batch(arm_id, batch, self.config.augment)
                labels = torch.from_numpy(self.data.y_train[batch]).to(self.device)
                metrics = arm.train_step(images, labels, self.autocast)
                bar.update(1)
                bar.set_postfix(arm=arm_id, loss=f"{metrics['ff_loss']:.3f}")

    @torch.no_grad()
    def layer_probabilities(self, images: np.ndarray) -> list[torch.Tensor]:
        """Return per arm the class probabilities from its last K = 1..L layers: (L, N, C)."""
        per_arm = []
        for arm in self.arms:
            arm.eval()
            chunks = []
            for start in range(0, len(images), 500):
                x = resize(to_tensor(images[start : start + 500]), arm.resolution)
                x = x.to(self.device).contiguous(memory_format=torch.channels_last)
                if hasattr(arm, "layer_goodness"):
                    _, scores = arm.layer_goodness(x)
                    layers = scores.shape[0]
                    chunks.append(
                        torch.stack(
                            [
                                combine_layers(scores, k).softmax(-1)
                                for k in range(1, layers + 1)
                            ]
                        )
                    )
                else:  # overlay arms: their own logits only
                    _, logits = arm.infer(x)
                    chunks.append(logits.softmax(-1)[None])
            per_arm.append(torch.cat(chunks, 1).float().cpu())
        return per_arm

    def accuracies(
        self, images: np.ndarray, labels: np.ndarray, only_k: int = 0
    ) -> dict[int, float]:
        """Return the accuracy of the arms' mean probabilities for every K, or `only_k`.

        An arm with fewer than K layers uses all of its layers.
        """
        per_arm = self.layer_probabilities(images)
        max_layers = max(p.shape[0] for p in per_arm)
        target = torch.from_numpy(labels.astype(np.int64))
        result = {}
        for k in [only_k] if only_k else range(1, max_layers + 1):
            mean = sum(p[min(k, p.shape[0]) - 1] for p in per_arm) / len(per_arm)
            result[k] = (mean.argmax(1) == target).float().mean().item()
        return result


def plot(record: dict, path: Path) -> None:
    curve = record["curve"]
    minutes = [point["elapsed_s"] / 60 for point in curve]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        minutes,
        [100 * point["val_accuracy"] for point in curve],
        marker="o",
        label="validation (best K per epoch)",
    )

    best = record["best"]
    ax.scatter(
        [best["elapsed_s"] / 60],
        [100 * record["test_accuracy"]],
        marker="*",
        s=180,
        color="black",
        zorder=5,
        label=f"test, scored once: {100 * record['test_accuracy']:.2f}%",
    )
    for (label, value), style in zip(
        REFERENCE_LINES.items(), ["dotted", "dashed", "solid"], strict=True
    ):
        ax.axhline(100 * value, color="grey", linestyle=style, linewidth=1, label=label)

    ax.set_xlabel("training time (minutes, validation included)")
    ax.set_ylabel("accuracy (%)")
    cfg = record["config"]
    ax.set_title(
        f"{cfg['dataset']}: {cfg['arms']} {cfg['arm_type']} arm(s), "
        f"width {cfg['width']}, {record['epochs_run']} epoch(s) in "
        f"{record['budget_minutes']:g} min budget",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = build_config(args)
    device = torch.device(
        "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    if config.device == "cuda" and device.type != "cuda":
        raise ConfigError(
            "--device cuda was requested but no CUDA device is visible: pass --device "
            "cpu or run on a machine with a GPU"
        )
    if config.feedback:
        raise ConfigError(
            "--feedback needs the brain, which this benchmark does not train: "
            "measure feedback runs with launch.py"
        )
    if config.val_size < 1:
        raise ConfigError(
            f"invalid validation size {config.val_size}: the benchmark chooses the "
            "epoch and K on validation, so pass --val-size 1 or more"
        )
    data = load_dataset(config.dataset, config.data_dir, config.download)
    trainer = Trainer(config, data, device)
    output = Path(
        args.output or Path(config.output_dir) / time.strftime("accuracy-%Y%m%d-%H%M%S")
    )
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / "accuracy.json").touch()
    except OSError as err:
        raise ConfigError(
            f"cannot write to output directory {output}: {err}. Pass a writable "
            "--output"
        ) from err
    budget_s = args.budget_minutes * 60

    epoch_s = trainer.time_steps()
    val_images = data.x_train[trainer.val_idx]
    val_labels = data.y_train[trainer.val_idx]
    start = time.perf_counter()
    trainer.accuracies(val_images[:500], val_labels[:500])
    eval_s = (time.perf_counter() - start) * len(val_images) / 500
    planned = PLANNED_SHARE * budget_s / (epoch_s + eval_s)
    epochs = max(1, math.floor(min(planned, MAX_EPOCHS)))
    if planned < 1:
        print(
            f"warning: one epoch takes about {(epoch_s + eval_s) / 60:.1f} minutes, "
            f"more than the {args.budget_minutes:g}-minute budget; running one",
            flush=True,
        )
    print(
        f"planned {epochs} epoch(s): {epoch_s:.0f} s of training and {eval_s:.0f} s of "
        f"validation per epoch in a {args.budget_minutes:g}-minute budget",
        flush=True,
    )
    for arm in trainer.arms:
        arm.configure_optimizer(
            config.lr, config.weight_decay, epochs * trainer.steps_per_epoch
        )

    curve, best, best_state = [], None, None
    start = time.perf_counter()
    bar = tqdm(
        total=epochs * trainer.steps_per_epoch * config.arms,
        unit="step",
        disable=args.quiet or not sys.stderr.isatty(),
    )
    for epoch in range(1, epochs + 1):
        elapsed = time.perf_counter() - start
        if curve and elapsed + (elapsed / len(curve)) > budget_s:
            print(
                f"stopped before epoch {epoch}: it would end past the budget",
                flush=True,
            )
            break
        trainer.train_epoch(epoch, bar)
        train_done = time.perf_counter() - start
        by_k = trainer.accuracies(val_images, val_labels)
        k = max(by_k, key=by_k.get)
        point = {
            "epoch": epoch,
            "elapsed_s": time.perf_counter() - start,
            "train_s": train_done,
            "val_accuracy": by_k[k],
            "best_k": k,
            "val_by_k": by_k,
        }
        curve.append(point)
        print(
            f"epoch {epoch}/{epochs}: validation {100 * by_k[k]:.2f}% (K={k}), "
            f"{point['elapsed_s'] / 60:.1f} min",
            flush=True,
        )
        if best is None or by_k[k] > best["val_accuracy"]:
            best = point
            best_state = [copy.deepcopy(arm.state_dict()) for arm in trainer.arms]
    bar.close()

    for arm, state in zip(trainer.arms, best_state, strict=True):
        arm.load_state_dict(state)
    test_images = data.x_test[: trainer.test_count]
    test_labels = data.y_test[: trainer.test_count]
    test_accuracy = trainer.accuracies(test_images, test_labels, only_k=best["best_k"])[
        best["best_k"]
    ]
    torch.save(
        {"config": config.to_dict(), "best_k": best["best_k"], "arms": best_state},
        output / "best.pt",
    )
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config.to_dict(),
        "budget_minutes": args.budget_minutes,
        "planned_epochs": epochs,
        "epochs_run": len(curve),
        "epoch_estimate_s": epoch_s,
        "train_images": len(trainer.train_idx),
        "val_images": len(trainer.val_idx),
        "test_images": len(test_images),
        "hardware": hardware(args.threads, device),
        "git_revision": config.git_revision,
        "curve": curve,
        "best": best,
        "test_accuracy": test_accuracy,
        "wall_s": time.perf_counter() - start,
    }
    (output / "accuracy.json").write_text(json.dumps(record, indent=2))
    plot(record, output / "accuracy.png")
    print(
        f"best epoch {best['epoch']} (K={best['best_k']}): validation "
        f"{100 * best['val_accuracy']:.2f}%, test {100 * record['test_accuracy']:.2f}% "
        f"on {len(test_images)} images; wrote {output}",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
