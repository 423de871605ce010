"""Rebuild the tables of docs/results.md from the experiment JSON files.

python -m deploy.experiments --docs --output-dir runs/experiments

Copies each finished experiment's JSON to docs/results/, renders its Markdown table
beside it and draws its plot into docs/figures/. Then, for every JSON
in docs/results/, it rewrites the generated block of that experiment's section in
docs/results.md. Text outside the blocks (the intro and each section's reading) is
kept as written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from deploy.experiment_report import (
    budget_line,
    check_record,
    plot,
    render_markdown,
    render_table,
)

REPO = Path(__file__).resolve().parent.parent
CLOSING_SECTION = "## Accuracy against training time"
EXPERIMENT_FILE = re.compile(r"A\d+[A-Za-z0-9-]*\.json")


def block_markers(experiment: str) -> tuple[str, str]:
    return (
        f"<!-- generated {experiment}: deploy.experiments --docs rewrites this block -->",
        f"<!-- end of generated {experiment} -->",
    )


def render_block(record: dict, figure: str) -> str:
    """Render the generated part of a section: table, plot, budget and command."""
    begin, end = block_markers(record["experiment"])
    return (
        f"{begin}\n{render_table(record)}\n"
        f"![{record['experiment']}: {record['title']}]({figure})\n\n"
        f"{budget_line(record)}\n\n"
        f"Command: `{record['command']}`\n{end}"
    )


def _experiment_order(name: str) -> tuple[int, str]:
    """Sort A2 before A10: by the number after the letter, then the suffix."""
    match = re.match(r"[A-Za-z]*(\d+)(.*)", name)
    return (int(match.group(1)), match.group(2)) if match else (10**6, name)


def update_doc(text: str, blocks: dict[str, tuple[str, str]]) -> str:
    """Replace each experiment's generated block in `text`, adding missing sections.

    `blocks` maps an experiment id to (section title, block). A new section goes
    before the first experiment section with a later id, else before the closing
    section (or at the end), with a placeholder for its reading.
    """
    for experiment, (title, block) in sorted(
        blocks.items(), key=lambda item: _experiment_order(item[0])
    ):
        begin, end = block_markers(experiment)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        match = pattern.search(text)
        if match:
            text = text[: match.start()] + block + text[match.end() :]
            continue
        section = (
            f"## {experiment}: {title}\n\n{block}\n\nReading: not written yet.\n\n"
        )
        later = [
            heading
            for heading in re.finditer(r"^## (A\d\S*): ", text, re.MULTILINE)
            if _experiment_order(heading.group(1)) > _experiment_order(experiment)
        ]
        if later:
            at = later[0].start()
            text = text[:at] + section + text[at:]
        elif CLOSING_SECTION in text:
            text = text.replace(CLOSING_SECTION, section + CLOSING_SECTION, 1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
    return text


def experiment_files(directory: Path) -> list[Path]:
    """List the experiment JSON files of `directory`, skipping other benchmarks' JSON."""
    if not directory.is_dir():
        return []
    return [
        path
        for path in sorted(directory.glob("*.json"))
        if EXPERIMENT_FILE.fullmatch(path.name)
    ]


def publish(output_dir: Path, docs_dir: Path = REPO / "docs") -> Path:
    """Copy the finished experiments into `docs_dir` and rebuild results.md."""
    results_dir = docs_dir / "results"
    figures_dir = docs_dir / "figures"
    results_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)

    for source in experiment_files(output_dir):
        shutil.copyfile(source, results_dir / source.name)

    blocks = {}
    for path in experiment_files(results_dir):
        record = json.loads(path.read_text())
        check_record(record, str(path))
        path.with_suffix(".md").write_text(render_markdown(record))
        plot(record, figures_dir / f"experiment-{record['experiment']}.png")
        figure = f"figures/experiment-{record['experiment']}.png"
        blocks[record["experiment"]] = (record["title"], render_block(record, figure))
    if not blocks:
        raise FileNotFoundError(
            f"no experiment JSON in {output_dir} or {results_dir}: run "
            "python -m deploy.experiments IDS first"
        )

    doc = docs_dir / "results.md"
    text = doc.read_text() if doc.is_file() else "# Ablation results\n"
    doc.write_text(update_doc(text, blocks))
    return doc
