"""The ablation runner: aggregation, tables, records, bad input, and one real experiment."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from deploy import brain_variants, experiments, results_doc
from deploy.brain_variants import ArmOutputs, brain_config, failure_cases, train_brain
from deploy.experiment_report import (
    BUDGET_FIELDS,
    RECORD_FIELDS,
    ExperimentRecordError,
    check_record,
    render_markdown,
    render_table,
    summarize,
    write_experiment,
)

REPO = Path(__file__).resolve().parent.parent


def tiny_record(grouped: bool = False) -> dict:
    def runs(values):
        return [
            {"seed": seed, "val_accuracy": v, "test_accuracy": v - 0.01}
            for seed, v in enumerate(values)
        ]

    return {
        "experiment": "A8",
        "title": "nerve ring",
        "command": "python -m deploy.experiments A8 --seeds 3",
        "git_revision": "0123456789abcdef",
        "hardware": {"cpu_model": "cpu", "cores": 2, "torch": "2.x", "gpu": None},
        "dataset": "cifar10",
        "budget": {
            "epochs": 1,
            "train_size": 100,
            "val_size": 20,
            "test_size": 30,
            "width": 8,
        },
        "seeds": [0, 1, 2],
        "chance": 0.1,
        "notes": ["a note"],
        "variants": [
            {
                "label": "on",
                "group": "g1" if grouped else "",
                "runs": runs([0.5, 0.6, 0.7]),
            },
            {
                "label": "off",
                "group": "g2" if grouped else "",
                "runs": runs([0.4, 0.4, 0.4]),
            },
        ],
    }


# Aggregation and rendering.


def test_summarize_mean_and_sample_spread():
    summary = summarize([0.5, 0.6, 0.7])
    assert summary["mean"] == pytest.approx(0.6)
    assert summary["std"] == pytest.approx(0.1)  # sample (ddof 1) spread
    assert summary["min"] == 0.5
    assert summary["max"] == 0.7
    assert summary["n"] == 3


def test_summarize_one_value_has_no_spread():
    assert summarize([0.42])["std"] == 0.0


def test_summarize_rejects_no_values():
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_table_shows_mean_spread_and_chance():
    table = render_table(tiny_record())
    assert "| on | 60.0 ± 10.0 | 59.0 ± 10.0 | 3 |" in table
    assert "| off | 40.0 ± 0.0 | 39.0 ± 0.0 | 3 |" in table
    assert "Chance is 10.0%" in table
    assert "- a note" in table
    assert "Comparison" not in table


def test_table_adds_group_column():
    table = render_table(tiny_record(grouped=True))
    assert table.startswith("| Comparison | Variant |")
    assert "| g1 | on |" in table


def test_markdown_names_budget_machine_and_command():
    text = render_markdown(tiny_record())
    assert "100 training, 20 validation and 30 test images" in text
    assert "width 8" in text
    assert "2 cores, no GPU, torch 2.x" in text
    assert "`0123456789ab`" in text
    assert "Command: `python -m deploy.experiments A8 --seeds 3`" in text


@pytest.mark.parametrize("missing", ["budget", "hardware", "git_revision", "seeds"])
def test_record_without_field_is_rejected(missing):
    record = tiny_record()
    del record[missing]
    with pytest.raises(ExperimentRecordError, match=missing):
        check_record(record, "A8.json")


def test_record_without_budget_width_is_rejected():
    record = tiny_record()
    del record["budget"]["width"]
    with pytest.raises(ExperimentRecordError, match="budget.width"):
        check_record(record, "A8.json")


def test_write_experiment_files(tmp_path):
    paths = write_experiment(tiny_record(), tmp_path)
    assert [p.name for p in paths] == ["A8.json", "A8.md", "A8.png"]
    saved = json.loads(paths[0].read_text())
    assert saved["variants"][0]["summary"]["val"]["mean"] == pytest.approx(0.6)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The docs step.


def test_doc_block_replaced_reading_kept():
    record = tiny_record()
    old = results_doc.render_block(record, "figures/experiment-A8.png")
    text = f"# Results\n\n## A8: nerve ring\n\n{old}\n\nReading: kept.\n"
    record["variants"][1]["runs"][0]["val_accuracy"] = 0.1
    new = results_doc.render_block(record, "figures/experiment-A8.png")
    updated = results_doc.update_doc(text, {"A8": ("nerve ring", new)})
    assert "| off | 30.0 ± 17.3 |" in updated
    assert "| off | 40.0 ± 0.0 |" not in updated
    assert "Reading: kept." in updated
    assert updated.count("## A8") == 1


def test_doc_new_section_before_closing_section():
    block = results_doc.render_block(tiny_record(), "figures/experiment-A8.png")
    text = "# Results\n\n## Accuracy against training time\n\nOne sentence.\n"
    updated = results_doc.update_doc(text, {"A8": ("nerve ring", block)})
    assert updated.index("## A8: nerve ring") < updated.index("## Accuracy against")
    assert "![A8: nerve ring](figures/experiment-A8.png)" in updated


def test_publish_copies_files_and_builds_doc(tmp_path):
    output = tmp_path / "out"
    write_experiment(tiny_record(), output)
    docs = tmp_path / "docs"
    doc = results_doc.publish(output, docs)
    assert (docs / "results" / "A8.json").is_file()
    assert (docs / "figures" / "experiment-A8.png").is_file()
    assert "| on | 60.0 ± 10.0 |" in doc.read_text()


# Selection and bad input.


def test_select_unknown_id_names_it():
    with pytest.raises(experiments.ExperimentError, match="A99"):
        experiments.select(["A1", "A99"])


def test_select_all_and_case_and_duplicates():
    assert len(experiments.select(["all"])) == len(experiments.EXPERIMENTS)
    chosen = experiments.select(["a8", "A8", "a15B"])
    assert [e.id for e in chosen] == ["A8", "A15b"]


def test_seeds_below_one_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments.parse_args(["A1", "--seeds", "0"])
    assert exit_info.value.code == 2
    assert "--seeds 0" in capsys.readouterr().err


def test_unsupported_option_names_variant():
    variant = experiments.Variant("made up", {"no_such_option": True})
    with pytest.raises(experiments.ExperimentError, match="made up"):
        experiments.variant_config(RunConfig(), variant, seed=0)


def test_run_identity_by_config_and_seed():
    base = RunConfig(train_limit=100)
    same = dataclasses.replace(base, run_name="x", output_dir="elsewhere")
    assert experiments.run_identity(base) == experiments.run_identity(same)
    assert experiments.run_identity(base).startswith("default-seed42-")
    other_seed = dataclasses.replace(base, seed=1)
    assert experiments.run_identity(base) != experiments.run_identity(other_seed)
    eight = dataclasses.replace(base, arms=8)
    assert experiments.run_identity(eight).startswith("arms-8-seed42-")


def test_brain_config_rejects_arm_options():
    with pytest.raises(ValueError, match="arms"):
        brain_config(RunConfig(), {"bottleneck": 32})


def test_failure_cases_of_four_arms():
    cases = failure_cases(4)
    assert cases[0] == ()
    assert len(cases) == 1 + 4 + 6


# The in-process brain really trains.


def synthetic_outputs(n: int, classes: int, seed: int) -> ArmOutputs:
    """Arm outputs whose logits point at the label for 2 of 4 arms, noise elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    logits = torch.randn(n, 4, classes, generator=generator)
    logits[:, :2] += 3 * torch.nn.functional.one_hot(labels, classes)[:, None]
    features = torch.randn(n, 4, 8, generator=generator)
    return ArmOutputs(features, logits, logits.clone(), labels)


def brain_run(brain_mode: str, classes: int) -> dict:
    config = RunConfig(
        dataset="cifar100" if classes == 100 else "cifar10",
        bottleneck=8,
        brain_mode=brain_mode,
        batch_size=64,
        brain_passes=4,
        seed=0,
    )
    sizes = ((2000, 0), (300, 1), (300, 2))
    train, val, test = (synthetic_outputs(n, classes, s) for n, s in sizes)
    return train_brain(config, classes, train, val, test)


def test_fresh_attention_brain_learns():
    result = brain_run("attention", 10)
    assert result["passes"] == 4
    assert result["chosen_pass"] >= 1
    # Chance is 0.1, and an untrained brain stays near it.
    assert result["test_accuracy"] > 0.5


def test_fresh_logit_brain_on_100_classes():
    result = brain_run("logit", 100)
    assert result["passes"] == 4
    # Chance is 0.01; two of the four arms point at the label.
    assert result["test_accuracy"] > 0.3


def test_ensemble_brain_not_trained():
    config = RunConfig(bottleneck=8, brain_mode="ensemble", seed=0)
    outputs = synthetic_outputs(200, 10, 0)
    result = train_brain(config, 10, outputs, outputs, outputs)
    assert result["passes"] == 0
    assert result["test_accuracy"] > 0.5


# One real experiment: a distributed run on real CIFAR-10, then fresh brains.


@pytest.mark.cluster
def test_nerve_ring_experiment_end_to_end(tmp_path, data_dir):
    output = tmp_path / "experiments"
    command = [
        sys.executable,
        "-m",
        "deploy.experiments",
        "A8",
        "--seeds",
        "1",
        "--train-limit",
        "2000",
        "--val-size",
        "500",
        "--test-limit",
        "500",
        "--width",
        "16",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(output),
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "run 1/1 done" in result.stderr

    record = json.loads((output / "A8.json").read_text())
    for name in RECORD_FIELDS:
        assert name in record
    for name in BUDGET_FIELDS:
        assert name in record["budget"]
    assert record["budget"]["train_size"] == 2000
    assert record["budget"]["test_size"] == 500
    assert record["seeds"] == [0]
    assert record["hardware"]["cores"] >= 1
    assert record["git_revision"]
    assert [v["label"] for v in record["variants"]] == [
        "nerve ring on",
        "nerve ring off",
    ]

    for variant in record["variants"]:
        (run,) = variant["runs"]
        assert 0.0 <= run["val_accuracy"] <= 1.0
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert Path(run["run_dir"], "results.json").is_file()
    # Chance is 0.10; 500 images give a standard deviation of 0.013 around it, and
    # 2,000 training images for one epoch give about 0.2.
    (ring_on,) = record["variants"][0]["runs"]
    assert ring_on["test_accuracy"] > 0.14
    assert ring_on["val_accuracy"] > 0.14

    markdown = (output / "A8.md").read_text()
    assert "| nerve ring on |" in markdown
    assert "Chance is 10.0%" in markdown
    assert (output / "A8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_brain_options_leave_arms_alone():
    """Every brain-only option is a RunConfig field the arm actor does not read."""
    arm_source = (REPO / "arms" / "actor.py").read_text() + (
        REPO / "arms" / "model.py"
    ).read_text()
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for option in brain_variants.BRAIN_OPTIONS:
        assert option in fields
        # brain_mode is read by the arms only to pick which logits they stream.
        if option != "brain_mode":
            assert f"config.{option}" not in arm_source, option


def test_lost_arm_accuracy_matches_evaluate_subsets():
    """The masked scores from cached outputs equal the API's evaluate_subsets."""
    from arms.model import build_arm
    from brain.model import build_brain
    from common.datasets import DATASET_INFO
    from deploy.api import OctopusModel

    torch.manual_seed(0)
    config = RunConfig(width=4, bottleneck=8, seed=0)
    info = DATASET_INFO["cifar10"]
    arms = [build_arm(config, arm_id, info).eval() for arm_id in range(config.arms)]
    model = OctopusModel(config, arms, build_brain(config, info.num_classes))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 32, 32, 3), generator=generator)
    images = images.to(torch.uint8).numpy()
    labels = torch.randint(0, 10, (40,), generator=generator).numpy()

    lost = brain_variants.lost_arm_accuracy(
        model, brain_variants.arm_outputs(model, images, labels)
    )
    cases = failure_cases(config.arms)
    subsets = [[a for a in range(config.arms) if a not in dead] for dead in cases]
    expected = model.evaluate_subsets(images, labels, subsets)
    assert list(lost["cases"].values()) == pytest.approx(expected)
    assert lost["all"] == pytest.approx(expected[0])
    assert lost["single_worst"] == pytest.approx(min(expected[1:5]))
    assert lost["pair_worst"] == pytest.approx(min(expected[5:]))


def test_doc_new_section_keeps_id_order():
    record = tiny_record()
    a8 = results_doc.render_block(record, "figures/experiment-A8.png")
    text = results_doc.update_doc("# Results\n", {"A8": ("nerve ring", a8)})
    record["experiment"] = "A2"
    a2 = results_doc.render_block(record, "figures/experiment-A2.png")
    updated = results_doc.update_doc(text, {"A2": ("bottleneck", a2)})
    assert updated.index("## A2: bottleneck") < updated.index("## A8: nerve ring")


def test_publish_skips_other_benchmarks_json(tmp_path):
    output = tmp_path / "out"
    write_experiment(tiny_record(), output)
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "results" / "accuracy-residual-w60.json").write_text('{"runs": []}')
    doc = results_doc.publish(output, docs)
    assert "## A8: nerve ring" in doc.read_text()
    assert "accuracy-residual" not in doc.read_text()


def test_one_seed_row_shows_no_spread():
    record = tiny_record()
    record["variants"][1]["runs"] = record["variants"][1]["runs"][:1]
    assert "| off | 40.0 | 39.0 | 1 |" in render_table(record)


def test_reuse_only_leaves_out_missing_runs(tmp_path):
    base = RunConfig(train_limit=100)
    runner = experiments.Runner(base, [0, 1], tmp_path, planned=0, reuse_only=True)
    experiment = experiments.EXPERIMENTS["A1"]
    with pytest.raises(experiments.MissingRunError, match="2 arms seed 0"):
        runner.run_variant(experiment.variants[0], 0)
    record = experiments.run_experiment(experiment, runner, {})
    assert record["variants"] == []
    assert any("2 arms: seeds 0, 1 have no finished run" in n for n in record["notes"])
