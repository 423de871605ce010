"""Figures and a `report.md` for a finished run directory.

python launch.py --report runs/NAME
python -m deploy.report runs/NAME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.datasets import DATASET_INFO  # noqa: E402


class ReportError(RuntimeError):
    """A run directory lacks the files a report needs."""


def read_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """Return (config, per-epoch metrics, results) of a run directory."""
    paths = {
        name: run_dir / name
        for name in ("config.json", "metrics.jsonl", "results.json")
    }
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise ReportError(
            f"cannot report on {run_dir}: missing {missing}. Report on a run that finished"
        )
    try:
        config = json.loads(paths["config.json"].read_text())
        epochs = [
            json.loads(line) for line in paths["metrics.jsonl"].read_text().splitlines()
        ]
        results = json.loads(paths["results.json"].read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"a file in {run_dir} is not valid JSON: {err}") from err
    if not epochs:
        raise ReportError(f"{paths['metrics.jsonl']} has no epochs")
    return config, epochs, results


def plot_arm_training(epochs: list[dict], path: Path) -> None:
    x = [e["epoch"] for e in epochs]
    arms = len(epochs[0]["arms"])
    fig, (ax_loss, ax_sep) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in range(arms):
        ff_loss = [e["arms"][arm]["ff_loss"] for e in epochs]
        gap = [
            e["arms"][arm]["goodness_pos"] - e["arms"][arm]["goodness_neg"]
            for e in epochs
        ]
        ax_loss.plot(x, ff_loss, marker="o", label=f"arm {arm}")
        ax_sep.plot(x, gap, marker="o", label=f"arm {arm}")
    ax_loss.set(title="Local FF loss per arm", xlabel="epoch", ylabel="mean FF loss")
    ax_sep.set(
        title="Goodness separation per arm",
        xlabel="epoch",
        ylabel="goodness of positives - negatives",
    )
    ax_sep.axhline(0, color="grey", lw=0.8)
    for ax in (ax_loss, ax_sep):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_validation(epochs: list[dict], num_classes: int, path: Path) -> None:
    x = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(x, [e["val_accuracy"] for e in epochs], marker="o", lw=2.5, label="brain")
    for arm in range(len(epochs[0]["val_arm_accuracy"])):
        accuracy = [e["val_arm_accuracy"][arm] for e in epochs]
        ax.plot(x, accuracy, marker=".", ls="--", label=f"arm {arm} alone")
    ax.axhline(1 / num_classes, color="grey", ls=":", label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        title="Validation accuracy per epoch",
        xlabel="epoch",
        ylabel="accuracy",
        ylim=(0, 1),
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(
    matrix: np.ndarray,
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    colorbar_label: str,
    path: Path,
) -> None:
    fig, ax = plt.subplots(
        figsize=(max(6, 0.6 * len(col_labels) + 2), 0.45 * len(row_labels) + 2)
    )
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    if matrix.size <= 400:
        for (i, j), value in np.ndenumerate(matrix):
            color = "white" if value < matrix.mean() else "black"
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color
            )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    """Write the figures and `report.md` into `run_dir`; return the report's path."""
    run_dir = Path(run_dir)
    config, epochs, results = read_run(run_dir)
    num_classes = DATASET_INFO[config["dataset"]].num_classes
    class_names = results.get("class_names") or [str(c) for c in range(num_classes)]
    arms = len(epochs[0]["arms"])
    arm_labels = [f"arm {i}" for i in range(arms)]
    figures = []

    plot_arm_training(epochs, run_dir / "arm_training.png")
    figures.append(("Local training of each arm", "arm_training.png"))
    plot_validation(epochs, len(class_names), run_dir / "validation.png")
    figures.append(("Validation accuracy", "validation.png"))
    if "test_arm_class_accuracy" in results:
        plot_heatmap(
            np.array(results["test_arm_class_accuracy"]),
            arm_labels,
            class_names,
            "Test accuracy of each arm alone, per class",
            "accuracy",
            run_dir / "arm_class_accuracy.png",
        )
        figures.append(("What each arm is good at", "arm_class_accuracy.png"))
    if "test_class_attention" in results:
        plot_heatmap(
            np.array(results["test_class_attention"]).T,
            arm_labels,
            class_names,
            "Coordinator attention on each arm, per true class (test)",
            "mean attention",
            run_dir / "class_attention.png",
        )
        figures.append(("Where the coordinator looks", "class_attention.png"))
    if (run_dir / "resilience.png").is_file():
        figures.append(("Accuracy when arms fail", "resilience.png"))

    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"- dataset {config['dataset']}, {arms} arms ({config['arm_type']}), "
        f"{len(epochs)} epoch{'s' if len(epochs) > 1 else ''}, seed {config['seed']}",
        f"- git revision `{config.get('git_revision') or 'unknown'}`",
        f"- best epoch {results['best_epoch']} by validation accuracy "
        f"{results['best_val_accuracy']:.4f}",
        f"- test accuracy {results['test_accuracy']:.4f} on {results['test_samples']} images "
        "(scored once, with the best epoch)",
        "- each arm alone on the test split: "
        + ", ".join(
            f"arm {i} {a:.4f}" for i, a in enumerate(results["test_arm_accuracy"])
        ),
        f"- epoch times (s): {', '.join(f'{s:.0f}' for s in results['epoch_seconds'])}",
        "",
    ]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write figures and report.md for a run."
    )
    parser.add_argument("run_dir")
    args = parser.parse_args()
    print(write_report(args.run_dir))


if __name__ == "__main__":
    main()
