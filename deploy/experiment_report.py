"""Aggregate ablation runs over seeds, and write an experiment's JSON, table and plot.

The ablation runner (deploy/experiments.py) calls these, and so does its `--docs` step,
which rebuilds the tables section of docs/results.md from the JSON files alone.
"""

from __future__ import annotations

import json
import os
import platform
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# Every experiment JSON carries these keys; `--docs` rejects a file without them.
RECORD_FIELDS = (
    "experiment",
    "title",
    "command",
    "git_revision",
    "hardware",
    "budget",
    "seeds",
    "chance",
    "notes",
    "variants",
)
BUDGET_FIELDS = ("epochs", "train_size", "val_size", "test_size", "width")
SPLITS = (("val", "Validation"), ("test", "Test"))


class ExperimentRecordError(ValueError):
    """An experiment JSON file lacks a field or has one of the wrong type."""


def summarize(values: list[float]) -> dict:
    """Compute the mean, sample standard deviation (0 for one value), min, max and count."""
    if not values:
        raise ValueError("no values to summarize: every variant needs at least one run")
    array = np.asarray(values, dtype=float)
    spread = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {
        "mean": float(array.mean()),
        "std": spread,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(array),
    }


def summarize_variant(runs: list[dict]) -> dict:
    """Summarize the validation and test accuracy of one variant's runs."""
    return {
        split: summarize([run[f"{split}_accuracy"] for run in runs])
        for split, _ in SPLITS
    }


def hardware() -> dict:
    """Describe this machine: CPU model, core count, torch version and GPU."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def check_record(record: dict, source: str) -> None:
    """Raise ExperimentRecordError unless `record` has every field a table needs."""
    missing = [name for name in RECORD_FIELDS if name not in record]
    missing += [
        f"budget.{name}"
        for name in BUDGET_FIELDS
        if name not in record.get("budget", {})
    ]
    if missing:
        raise ExperimentRecordError(
            f"{source} lacks {missing}: write it again with deploy.experiments"
        )
    if not isinstance(record["variants"], list) or not record["variants"]:
        raise ExperimentRecordError(f"{source} has no variants to tabulate")
    for variant in record["variants"]:
        if not variant.get("runs"):
            raise ExperimentRecordError(
                f"{source}: variant {variant.get('label')!r} has no runs"
            )


def _percent(summary: dict) -> str:
    if summary["n"] == 1:
        return f"{summary['mean'] * 100:.1f}"  # one seed has no spread
    return f"{summary['mean'] * 100:.1f} ± {summary['std'] * 100:.1f}"


def short_revision(revision: str) -> str:
    """Shorten a commit id to 12 digits, keeping a `-dirty` mark."""
    return revision[:12] + ("-dirty" if revision.endswith("-dirty") else "")


def budget_line(record: dict) -> str:
    budget, hw = record["budget"], record["hardware"]
    # Reused runs may come from an earlier revision than the one that wrote the record.
    run_revisions = sorted(
        {
            short_revision(run["git_revision"])
            for variant in record["variants"]
            for run in variant["runs"]
            if run.get("git_revision")
        }
        - {short_revision(record["git_revision"])}
    )
    trained_at = (
        f" (runs trained at `{'`, `'.join(run_revisions)}`)" if run_revisions else ""
    )
    gpu = hw["gpu"] or "no GPU"
    return (
        f"Budget: {budget['epochs']} epoch{'s' if budget['epochs'] > 1 else ''}, {budget['train_size']:,} training, "
        f"{budget['val_size']:,} validation and {budget['test_size']:,} test images "
        f"of {record.get('dataset', 'cifar10')}, width {budget['width']}; seeds "
        f"{', '.join(map(str, record['seeds']))}. Machine: {hw['cpu_model']}, "
        f"{hw['cores']} cores, {gpu}, torch {hw['torch']}. Revision "
        f"`{short_revision(record['git_revision'])}`{trained_at}."
    )


def render_table(record: dict) -> str:
    """Render an experiment's Markdown table: mean ± spread over seeds, in percent."""
    grouped = any(variant.get("group") for variant in record["variants"])
    header = ["Comparison"] if grouped else []
    header += ["Variant", "Validation accuracy (%)", "Test accuracy (%)", "Seeds"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for variant in record["variants"]:
        summary = summarize_variant(variant["runs"])
        cells = [variant.get("group", "")] if grouped else []
        cells += [
            variant["label"],
            _percent(summary["val"]),
            _percent(summary["test"]),
            str(summary["test"]["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "Mean ± sample standard deviation over seeds. Each run's model is the one "
        "chosen on the validation split, scored on the test split once. Chance is "
        f"{record['chance'] * 100:.1f}%.",
        *record["notes"],
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def render_markdown(record: dict) -> str:
    """Render the experiment's stand-alone Markdown: title, table, budget and command."""
    return (
        f"## {record['experiment']}: {record['title']}\n\n"
        f"{render_table(record)}\n"
        f"{budget_line(record)}\n\n"
        f"Command: `{record['command']}`\n"
    )


def plot(record: dict, path: Path) -> None:
    """Plot validation and test accuracy as bars, the seed spread as error bars."""
    variants = record["variants"]
    labels = [
        f"{v['group']}: {v['label']}" if v.get("group") else v["label"]
        for v in variants
    ]
    positions = np.arange(len(variants))
    width = 0.38

    fig, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(variants) + 3), 4.2))
    for offset, (split, name) in zip((-width / 2, width / 2), SPLITS, strict=True):
        summaries = [summarize_variant(v["runs"])[split] for v in variants]
        axis.bar(
            positions + offset,
            [s["mean"] * 100 for s in summaries],
            width,
            yerr=[s["std"] * 100 for s in summaries],
            capsize=4,
            label=name,
        )
    axis.axhline(record["chance"] * 100, color="grey", linestyle="--", label="chance")

    axis.set_xticks(positions, labels, rotation=20 if len(variants) > 4 else 0)
    axis.set_ylabel("accuracy (%)")
    seeds = len(record["seeds"])
    seed_word = "seed" if seeds == 1 else "seeds"
    title = f"{record['experiment']}: {record['title']} ({seeds} {seed_word})"
    axis.set_title(textwrap.fill(title, 60), fontsize=10)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_experiment(record: dict, output_dir: Path) -> list[Path]:
    """Write `<id>.json`, `<id>.md` and `<id>.png` into `output_dir`; return the paths."""
    check_record(record, f"experiment {record.get('experiment')}")
    for variant in record["variants"]:
        variant["summary"] = summarize_variant(variant["runs"])
    output_dir.mkdir(parents=True, exist_ok=True)
    name = record["experiment"]
    paths = [output_dir / f"{name}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    paths[1].write_text(render_markdown(record))
    plot(record, paths[2])
    return paths
