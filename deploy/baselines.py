"""Train two backprop baselines on a run's data and score them with parts failed.

python -m deploy.baselines runs/NAME --threads 1

Each model is chosen on the validation split, then the test split is scored once:
normally, and with every single and every pair of blocks (`plain_cnn`) or branches
(`multiscale`) failed. Writes RUN_DIR/baselines.json, with checkpoints in
RUN_DIR/baselines/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arms.actor import epoch_order
from arms.augment import random_crop_flip, to_tensor
from common.config import DEVICES, ConfigError, RunConfig
from common.datasets import Dataset, DatasetError, load_dataset, split_indices
from common.logs import setup_logging
from deploy.baseline_models import (
    Failure,
    MultiscaleNet,
    arm_parameters,
    build_multiscale_net,
    build_plain_cnn,
    case_name,
)
from deploy.training import check_sizes, git_revision

log = logging.getLogger(__name__)

# Name -> (description, builder taking a RunConfig and a DatasetInfo).
MODELS = {
    "plain_cnn": (
        "Backprop CNN of 4 conv blocks. A failure zeroes a block's output.",
        build_plain_cnn,
    ),
    "multiscale": (
        "Backprop multiscale net, one branch per arm resolution, trained with module "
        "dropout. A failure masks a branch out of the mean of the branch vectors.",
        build_multiscale_net,
    ),
}


def select_device(requested: str) -> torch.device:
    """Return cuda when requested or available (`auto`), else cpu.

    NOTE: only the cpu path has been run. Every tensor is moved to the model's device,
    but no test covers a CUDA machine yet.
    """
    if requested not in DEVICES:
        raise ConfigError(f"invalid device {requested!r}: choose one of {DEVICES}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but torch sees no CUDA device: pass "
            "--device cpu"
        )
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def score(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cases: list[Failure],
    batch_size: int,
) -> dict[Failure, float]:
    """Return the accuracy on (x, y) of each failure case (`()`: the normal case)."""
    device = next(model.parameters()).device
    model.eval()
    correct = dict.fromkeys(cases, 0)
    for start in range(0, len(x), batch_size):
        images = to_device(to_tensor(x[start : start + batch_size]), device)
        labels = torch.from_numpy(y[start : start + batch_size]).to(device)
        for failed, logits in model.logits_with_failures(images, cases).items():
            correct[failed] += (logits.argmax(1) == labels).sum().item()
    return {failed: count / len(x) for failed, count in correct.items()}


def train_model(
    name: str,
    model: torch.nn.Module,
    config: RunConfig,
    data: Dataset,
    splits: tuple[np.ndarray, np.ndarray],
    checkpoint: Path,
    show_progress: bool,
) -> dict:
    """Train `model`, save its best validation epoch to `checkpoint` and reload it.

    Returns the best epoch, its validation accuracy, the seconds spent training and
    validating, and a record per epoch.
    """
    device = next(model.parameters()).device
    train_idx, val_idx = splits
    generator = torch.Generator().manual_seed(config.seed)
    steps = len(train_idx) // config.batch_size  # the last partial batch is dropped
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps
    )
    best = {"best_epoch": 0, "val_accuracy": -1.0}
    history = []
    started = time.perf_counter()

    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        order = epoch_order(train_idx, config.seed, epoch)
        model.train()
        total_loss = 0.0
        bar = tqdm(
            range(steps),
            desc=f"{name} epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not show_progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step in bar:
            batch = np.sort(
                order[step * config.batch_size : (step + 1) * config.batch_size]
            )
            images = to_tensor(data.x_train[batch])
            if config.augment:
                images = random_crop_flip(
                    images, pad=max(1, images.shape[-1] // 8), generator=generator
                )
            labels = torch.from_numpy(data.y_train[batch]).to(device)
            # The multiscale net applies module dropout itself in training mode.
            loss = F.cross_entropy(model(to_device(images, device)), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{name} epoch {epoch} step {step + 1}: the loss is "
                    f"{loss.item()}, so training diverged. Lower lr ({config.lr}) in "
                    "config.json"
                )

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        images_per_s = steps * config.batch_size / (time.perf_counter() - epoch_start)

        x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
        val_accuracy = score(model, x_val, y_val, [()], config.batch_size)[()]
        improved = val_accuracy > best["val_accuracy"]
        if improved:
            best = {"best_epoch": epoch, "val_accuracy": val_accuracy}
            torch.save(model.state_dict(), checkpoint)
        record = {
            "epoch": epoch,
            "loss": total_loss / max(1, steps),
            "val_accuracy": val_accuracy,
            "seconds": time.perf_counter() - epoch_start,
        }
        history.append(record)
        log.info(
            "%s epoch %d/%d: loss %.3f, validation accuracy %.4f%s, %.0f img/s, %.1f s",
            name,
            epoch,
            config.epochs,
            record["loss"],
            val_accuracy,
            " [best]" if improved else "",
            images_per_s,
            record["seconds"],
        )

    model.load_state_dict(
        torch.load(checkpoint, map_location=device, weights_only=True)
    )
    return {**best, "train_seconds": time.perf_counter() - started, "history": history}


def score_test_split(
    model: torch.nn.Module, x_test: np.ndarray, y_test: np.ndarray, batch_size: int
) -> dict:
    """Score `model` once on the test split, normally and with each failure case."""
    cases = model.failure_cases()
    started = time.perf_counter()
    accuracy = score(model, x_test, y_test, [(), *cases], batch_size)
    results = {
        "test_accuracy": accuracy[()],
        "failure_test_accuracy": {case_name(c): accuracy[c] for c in cases},
    }
    for size, kind in ((1, "single"), (2, "pair")):
        failed = min(
            (c for c in cases if len(c) == size), key=accuracy.get, default=None
        )
        results[f"worst_{kind}"] = (
            None
            if failed is None
            else {"case": case_name(failed), "accuracy": accuracy[failed]}
        )
    results["test_seconds"] = time.perf_counter() - started
    return results


def train_baselines(
    config: RunConfig,
    run_dir: Path,
    epochs: int,
    threads: int = 0,
    module_dropout: float = 0.5,
    show_progress: bool = False,
) -> dict:
    """Train, select and score both baselines, and write RUN_DIR/baselines.json.

    `threads` sets torch's intra-op threads for the call (0: every core), and
    `module_dropout` is the probability that a multiscale training sample loses
    branches.
    """
    config = dataclasses.replace(config, epochs=epochs)
    if threads < 0:
        raise ConfigError(f"invalid threads {threads}: pass 1 or more (0: every core)")
    if not 0.0 <= module_dropout <= 1.0:
        raise ConfigError(
            f"invalid module dropout {module_dropout}: it must be between 0 and 1"
        )
    device = select_device(config.device)
    data = load_dataset(config.dataset, config.data_dir, config.download)
    check_sizes(config, data)
    splits = split_indices(
        len(data.x_train), config.val_size, config.seed, config.train_limit
    )
    test_count = min(config.test_limit or len(data.x_test), len(data.x_test))
    checkpoints = Path(run_dir) / "baselines"
    checkpoints.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    threads_used = threads or os.cpu_count() or 1
    torch.set_num_threads(threads_used)
    log.info(
        "baselines on %s: %d train, %d validation, %d test images, epochs %d, %s, "
        "%d threads",
        config.dataset,
        len(splits[0]),
        len(splits[1]),
        test_count,
        config.epochs,
        device,
        threads_used,
    )
    models = {}
    try:
        for name, (description, build) in MODELS.items():
            torch.manual_seed(config.seed)
            model = build(config, data.info).to(device)
            model = model.to(memory_format=torch.channels_last)
            entry = {
                "name": name,
                "description": description,
                "failure_unit": model.failure_unit,
                "parameters": sum(p.numel() for p in model.parameters()),
                "epochs": config.epochs,
            }
            if isinstance(model, MultiscaleNet):
                model.module_dropout = module_dropout
                entry["module_dropout"] = module_dropout
            checkpoint = checkpoints / f"{name}.pt"
            entry |= train_model(
                name, model, config, data, splits, checkpoint, show_progress
            )
            entry |= score_test_split(
                model,
                data.x_test[:test_count],
                data.y_test[:test_count],
                config.batch_size,
            )
            models[name] = entry
            log.info("%s: %s", name, format_summary(entry))
    finally:
        torch.set_num_threads(previous_threads)

    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads_used,
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        hardware["cuda_device"] = torch.cuda.get_device_name(device)

    results = {
        "models": models,
        "arm_parameters": arm_parameters(config, data.info),
        "test_samples": test_count,
        "config": config.to_dict(),
        "git_revision": git_revision(),
        "hardware": hardware,
    }
    path = Path(run_dir) / "baselines.json"
    if path.exists():
        log.warning("replacing the earlier results in %s", path)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_summary(model: dict) -> str:
    """Format a model's size, best epoch, test accuracy and worst cases as one line."""
    parts = [
        f"{model['parameters']:,} parameters",
        f"best epoch {model['best_epoch']}",
        f"test accuracy {model['test_accuracy']:.4f}",
    ]
    for kind in ("single", "pair"):
        worst = model[f"worst_{kind}"]
        if worst is not None:
            parts.append(f"worst {kind} {worst['case']} {worst['accuracy']:.4f}")
    parts.append(f"trained in {model['train_seconds']:.0f} s")
    return ", ".join(parts)


def read_config(run_dir: Path) -> RunConfig:
    """Return the RunConfig saved in `run_dir`/config.json."""
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} not found: pass a directory that contains a "
            "config.json, such as one written by launch.py"
        )
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: write the run's options there as JSON, e.g. "
            "json.dumps(RunConfig(...).to_dict())"
        )
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): restore it") from err
    return RunConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a plain CNN and a multiscale net with backprop on a run's "
        "data, and score them with blocks or branches failed.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run directory")
    parser.add_argument(
        "--epochs", type=int, help="training epochs (default: the run's epochs)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: every core)"
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        help="torch device, where auto picks cuda when available (default: the run's)",
    )
    parser.add_argument("--data-dir", help="directory with <dataset>.npz")
    parser.add_argument(
        "--train-limit", type=int, help="use only this many training images (0: all)"
    )
    parser.add_argument(
        "--test-limit", type=int, help="score only this many test images (0: all)"
    )
    parser.add_argument(
        "--module-dropout",
        type=float,
        default=0.5,
        help="probability that a multiscale training sample loses 1 to N-1 branches",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        config = read_config(args.run_dir)
        overrides = {
            "device": args.device,
            "train_limit": args.train_limit,
            "test_limit": args.test_limit,
            "data_dir": args.data_dir and str(Path(args.data_dir).resolve()),
        }
        config = dataclasses.replace(
            config, **{k: v for k, v in overrides.items() if v is not None}
        )
        results = train_baselines(
            config,
            args.run_dir,
            args.epochs if args.epochs is not None else config.epochs,
            threads=args.threads,
            module_dropout=args.module_dropout,
            show_progress=not args.quiet and sys.stderr.isatty(),
        )
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before baselines.json was written", file=sys.stderr)
        return 130

    for model in results["models"].values():
        print(f"{model['name']}: {format_summary(model)}")
    print(f"results in {(args.run_dir / 'baselines.json').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
