"""Ablations of OctopusNet over several seeds, as real distributed runs on CIFAR-10.

python -m deploy.experiments A1 A8 --seeds 3 --data-dir ../shared/data
python -m deploy.experiments all --seeds 3 --docs   # every experiment, then the doc
python -m deploy.experiments --docs                # only rebuild docs/results.md

Each variant trains through deploy.training.train: a local Ray cluster, one actor
per arm, ZeroMQ to the brain. A run whose config and seed were already trained
under --output-dir is reused, so the default run serves every experiment that
contains it. Writes <id>.json, <id>.md and <id>.png per experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import ConfigError, RunConfig
from common.datasets import DATASET_INFO, default_data_dir, load_dataset, split_indices
from common.logs import setup_logging
from deploy import brain_variants, results_doc
from deploy.api import load_run
from deploy.cli import non_negative_int, positive_int, script_parser
from deploy.experiment_report import hardware, write_experiment
from deploy.training import git_revision, train

log = logging.getLogger(__name__)

RUN = "run"  # a distributed run with the variant's config
BRAIN = "brain"  # a fresh in-process brain on the default run's arms
LOST_ARMS = "lost_arms"  # the default run scored with arms masked


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict = field(default_factory=dict)
    mode: str = RUN
    group: str = ""


@dataclass(frozen=True)
class Experiment:
    id: str
    title: str
    variants: tuple[Variant, ...]
    notes: tuple[str, ...] = ()


BRAIN_NOTE = (
    "These variants share the arms of each seed's default run. A fresh brain per "
    "variant trains in-process on their outputs with module dropout and the run's "
    "brain passes. Its pass is chosen on validation, and the test split is scored once."
)
EXPERIMENTS = {
    e.id: e
    for e in (
        Experiment(
            "A1",
            "number of arms",
            tuple(Variant(f"{n} arms", {"arms": n}) for n in (2, 4, 8)),
            ("Arm i takes the downscale factor i mod 4 of 1, 1, 2, 2 (32 or 16 px).",),
        ),
        Experiment(
            "A2",
            "bottleneck size",
            tuple(
                Variant(f"{n} values", {"bottleneck": n}) for n in (8, 16, 32, 64, 128)
            ),
        ),
        Experiment(
            "A6",
            "resilience to lost arms",
            (
                Variant("all arms", {"statistic": "all"}, LOST_ARMS),
                Variant("one arm lost, mean", {"statistic": "single_mean"}, LOST_ARMS),
                Variant(
                    "one arm lost, worst", {"statistic": "single_worst"}, LOST_ARMS
                ),
                Variant("two arms lost, mean", {"statistic": "pair_mean"}, LOST_ARMS),
                Variant("two arms lost, worst", {"statistic": "pair_worst"}, LOST_ARMS),
            ),
            (
                "The default run of each seed, its lost arms masked in-process "
                "(the computation of deploy.api evaluate_subsets, which matched the "
                "served answers in deploy.resilience); mean and worst are over the 4 single losses and "
                "the 6 pairs.",
            ),
        ),
        Experiment(
            "A7",
            "brain-to-arm feedback",
            (
                Variant("feedback off", {"feedback": False}),
                Variant("feedback on", {"feedback": True}),
            ),
        ),
        Experiment(
            "A8",
            "nerve ring",
            (
                Variant("nerve ring on", {"nerve_ring": True}, BRAIN),
                Variant("nerve ring off", {"nerve_ring": False}, BRAIN),
            ),
            (BRAIN_NOTE,),
        ),
        Experiment(
            "A9",
            "homogeneous against heterogeneous arms",
            (
                Variant("homogeneous (grouped CNNs)", {"arm_type": "grouped"}),
                Variant(
                    "heterogeneous (CNN, CNN, Transformer, LSTM)",
                    {"arm_type": "heterogeneous"},
                ),
            ),
        ),
        Experiment(
            "A10",
            "coordinator competition",
            (
                Variant("soft", {"competition": "soft"}, BRAIN),
                Variant("top-2", {"competition": "topk", "top_k": 2}, BRAIN),
                Variant("gumbel", {"competition": "gumbel"}, BRAIN),
            ),
            (BRAIN_NOTE,),
        ),
        Experiment(
            "A15b",
            "local logit coordinator against backprop coordinator and ensemble",
            (
                Variant("logit (fully local)", {"brain_mode": "logit"}, BRAIN),
                Variant("attention (backprop)", {"brain_mode": "attention"}, BRAIN),
                Variant("ensemble", {"brain_mode": "ensemble"}, BRAIN),
            ),
            (BRAIN_NOTE,),
        ),
        Experiment(
            "A15b-arms",
            "channel grouping against Fourier label overlay",
            (
                Variant("grouped channels", {"arm_type": "grouped"}),
                Variant("Fourier label overlay", {"arm_type": "overlay"}),
            ),
            ("Distributed runs with the default attention brain.",),
        ),
    )
}
# Config fields that change no result: they stay out of a run's identity.
IDENTITY_EXCLUDED = {"run_name", "output_dir", "data_dir", "git_revision"}


class MissingRunError(LookupError):
    """With --reuse-only, a variant and seed have no finished run to reuse."""


class ExperimentError(ValueError):
    """An experiment cannot run as asked: unknown id, bad option or missing feature."""


def select(ids: list[str]) -> list[Experiment]:
    """Experiments for the ids given (`all` for every one), in the order given."""
    if not ids:
        raise ExperimentError(
            f"no experiment given: name one or more of {', '.join(EXPERIMENTS)}, or all"
        )
    if "all" in ids:
        return list(EXPERIMENTS.values())
    by_lower = {key.lower(): experiment for key, experiment in EXPERIMENTS.items()}
    unknown = [i for i in ids if i.lower() not in by_lower]
    if unknown:
        raise ExperimentError(
            f"unknown experiment {', '.join(unknown)}: choose from "
            f"{', '.join(EXPERIMENTS)} or all"
        )
    unique = dict.fromkeys(i.lower() for i in ids)
    return [by_lower[i] for i in unique]


def variant_config(base: RunConfig, variant: Variant, seed: int) -> RunConfig:
    """Build a variant's run config; raise ExperimentError if RunConfig lacks an option."""
    if variant.mode == LOST_ARMS:
        return dataclasses.replace(base, seed=seed)
    try:
        return dataclasses.replace(base, seed=seed, **variant.overrides)
    except (TypeError, ConfigError) as err:
        raise ExperimentError(
            f"variant {variant.label!r} ({variant.overrides}) is not supported by "
            f"this revision's RunConfig: {err}"
        ) from err


def check_supported(experiment: Experiment, base: RunConfig) -> None:
    for variant in experiment.variants:
        variant_config(base, variant, seed=0)


def run_identity(config: RunConfig) -> str:
    """Name a run by its non-default options, its seed and a hash of its config."""
    values = {k: v for k, v in config.to_dict().items() if k not in IDENTITY_EXCLUDED}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    defaults = RunConfig().to_dict()
    budget = {"train_limit", "val_size", "test_limit", "width", "epochs", "seed"}
    changed = [
        f"{k}-{v}"
        for k, v in sorted(values.items())
        if k not in budget and v != defaults.get(k)
    ]
    return f"{'_'.join(changed) or 'default'}-seed{config.seed}-{digest[:8]}"


class Runner:
    """Trains (or reuses) the runs of every variant and seed, logging progress."""

    def __init__(
        self,
        base: RunConfig,
        seeds: list[int],
        runs_dir: Path,
        planned: int,
        reuse_only: bool = False,
    ):
        self.base = base
        self.reuse_only = reuse_only
        self.seeds = seeds
        self.runs_dir = runs_dir
        self.planned = planned
        self.trained = 0
        self.train_seconds = 0.0
        self.outputs: dict[str, tuple] = {}
        self.reused: set[str] = set()

    def ensure_run(self, config: RunConfig, label: str) -> dict:
        """Results of the distributed run of `config`, trained now unless saved."""
        name = run_identity(config)
        run_dir = self.runs_dir / name
        results_path = run_dir / "results.json"

        if results_path.is_file():
            results = json.loads(results_path.read_text())
            if name not in self.reused:
                log.info("%s seed %d: reusing %s", label, config.seed, run_dir)
                self.reused.add(name)
            return results | {"run_dir": str(run_dir), "reused": True}
        if self.reuse_only:
            raise MissingRunError(
                f"{label} seed {config.seed}: no finished run {run_dir}"
            )
        if run_dir.exists():
            log.warning("removing the unfinished run %s to train it again", run_dir)
            shutil.rmtree(run_dir)

        config = dataclasses.replace(
            config, run_name=name, output_dir=str(self.runs_dir)
        )
        index = self.trained + 1
        log.info(
            "run %d/%d start: %s seed %d (%s)",
            index,
            self.planned,
            label,
            config.seed,
            name,
        )
        started = time.perf_counter()
        results = train(config, run_dir)
        seconds = time.perf_counter() - started

        self.trained += 1
        self.train_seconds += seconds
        remaining = max(0, self.planned - self.trained)
        eta_min = remaining * self.train_seconds / self.trained / 60
        log.info(
            "run %d/%d done in %.0f s: %s seed %d, validation %.4f, test %.4f; "
            "about %.0f min left for %d runs",
            index,
            self.planned,
            seconds,
            label,
            config.seed,
            results["best_val_accuracy"],
            results["test_accuracy"],
            eta_min,
            remaining,
        )
        return results | {"run_dir": str(run_dir), "reused": False}

    def split_outputs(self, run_dir: str):
        """Load the default run's model and its three splits, once per run directory."""
        if run_dir not in self.outputs:
            model = load_run(run_dir)
            config = model.config
            data = load_dataset(config.dataset, self.base.data_dir)
            train_idx, val_idx = split_indices(
                len(data.x_train), config.val_size, config.seed, config.train_limit
            )
            test_count = min(config.test_limit or len(data.x_test), len(data.x_test))
            splits = {
                "train": (data.x_train[train_idx], data.y_train[train_idx]),
                "val": (data.x_train[val_idx], data.y_train[val_idx]),
                "test": (data.x_test[:test_count], data.y_test[:test_count]),
            }
            self.outputs[run_dir] = (model, splits, {})
        return self.outputs[run_dir]

    @staticmethod
    def arm_outputs(model, splits: dict, arm_cache: dict) -> dict:
        """Run the arms once over every split of a run; later calls reuse the outputs."""
        if "outputs" not in arm_cache:
            started = time.perf_counter()
            arm_cache["outputs"] = {
                name: brain_variants.arm_outputs(model, *splits[name])
                for name in ("train", "val", "test")
            }
            log.info(
                "arm outputs of %s computed in %.0f s",
                model.config.run_name,
                time.perf_counter() - started,
            )
        return arm_cache["outputs"]

    def run_variant(self, variant: Variant, seed: int) -> dict:
        config = variant_config(self.base, variant, seed)
        if variant.mode == RUN:
            results = self.ensure_run(config, variant.label)
            return {
                "seed": seed,
                "val_accuracy": results["best_val_accuracy"],
                "test_accuracy": results["test_accuracy"],
                "seconds": results["total_seconds"],
                "run_dir": results["run_dir"],
                "git_revision": results["git_revision"],
            }
        default = dataclasses.replace(self.base, seed=seed)
        base_results = self.ensure_run(default, "default")
        model, splits, arm_cache = self.split_outputs(base_results["run_dir"])
        started = time.perf_counter()
        if variant.mode == LOST_ARMS:
            statistic = variant.overrides["statistic"]
            outputs = self.arm_outputs(model, splits, arm_cache)
            if "lost" not in arm_cache:
                arm_cache["lost"] = {
                    name: brain_variants.lost_arm_accuracy(model, outputs[name])
                    for name in ("val", "test")
                }
            lost = arm_cache["lost"]
            figures = {
                "val_accuracy": lost["val"][statistic],
                "test_accuracy": lost["test"][statistic],
                "test_cases": lost["test"]["cases"],
                "distributed_test_accuracy": base_results["test_accuracy"],
            }
        else:
            outputs = self.arm_outputs(model, splits, arm_cache)
            brain_config = brain_variants.brain_config(
                model.config, dict(variant.overrides)
            )
            # The default brain is a variant of A8, A10 and A15b: train it once.
            key = json.dumps(brain_config.to_dict(), sort_keys=True)
            brains = arm_cache.setdefault("brains", {})
            if key not in brains:
                brains[key] = brain_variants.train_brain(
                    brain_config,
                    model.info.num_classes,
                    outputs["train"],
                    outputs["val"],
                    outputs["test"],
                )
            figures = brains[key]
        log.info(
            "%s seed %d: validation %.4f, test %.4f (%.0f s, arms of %s)",
            variant.label,
            seed,
            figures["val_accuracy"],
            figures["test_accuracy"],
            time.perf_counter() - started,
            base_results["run_dir"],
        )
        return {
            "seed": seed,
            **figures,
            "seconds": time.perf_counter() - started,
            "run_dir": base_results["run_dir"],
            "git_revision": base_results["git_revision"],
        }


def planned_runs(
    experiments: list[Experiment], base: RunConfig, seeds, runs_dir
) -> int:
    """Distributed runs still to train (configs shared by experiments count once)."""
    names = set()
    for experiment in experiments:
        for variant in experiment.variants:
            for seed in seeds:
                config = (
                    variant_config(base, variant, seed)
                    if variant.mode == RUN
                    else dataclasses.replace(base, seed=seed)
                )
                names.add(run_identity(config))
    return sum(not (runs_dir / name / "results.json").is_file() for name in names)


def budget(base: RunConfig) -> dict:
    data = load_dataset(base.dataset, base.data_dir)
    train_idx, val_idx = split_indices(
        len(data.x_train), base.val_size, base.seed, base.train_limit
    )
    return {
        "epochs": base.epochs,
        "train_size": len(train_idx),
        "val_size": len(val_idx),
        "test_size": min(base.test_limit or len(data.x_test), len(data.x_test)),
        "width": base.width,
        "batch_size": base.batch_size,
    }


def run_experiment(experiment: Experiment, runner: Runner, context: dict) -> dict:
    variants, notes = [], list(experiment.notes)
    for variant in experiment.variants:
        runs, missing = [], []
        for seed in runner.seeds:
            try:
                runs.append(runner.run_variant(variant, seed))
            except MissingRunError as err:
                log.warning("left out: %s", err)
                missing.append(seed)
        if missing:
            notes.append(
                f"{variant.label}: seeds {', '.join(map(str, missing))} have no "
                "finished run (left out with --reuse-only)."
            )
        if not runs:
            continue
        variants.append(
            {
                "label": variant.label,
                "group": variant.group,
                "mode": variant.mode,
                "overrides": variant.overrides,
                "runs": runs,
            }
        )
    return {
        "experiment": experiment.id,
        "title": experiment.title,
        **context,
        "notes": notes,
        "variants": variants,
    }


def parse_args(argv: list[str] | None):
    parser = script_parser(__doc__)
    parser.add_argument(
        "experiments", nargs="*", help=f"ids: {', '.join(EXPERIMENTS)}, or all"
    )

    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/experiments"))
    parser.add_argument(
        "--data-dir",
        default="",
        help="directory with cifar10.npz (default: $OCTOPUSNET_DATA_DIR or data)",
    )

    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument(
        "--train-limit",
        type=non_negative_int,
        default=10000,
        help="training images (0: all)",
    )
    parser.add_argument(
        "--val-size", type=positive_int, default=2000, help="validation images"
    )
    parser.add_argument(
        "--test-limit",
        type=non_negative_int,
        default=0,
        help="test images (0: all 10,000)",
    )
    parser.add_argument(
        "--width", type=positive_int, default=24, help="channels of the first block"
    )
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="train nothing: tabulate the runs already finished under --output-dir "
        "and name the variants and seeds that have none",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="copy the JSON, Markdown and PNG of every finished experiment in "
        "--output-dir to docs/ and rebuild the tables of docs/results.md",
    )

    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1 seed")
    if not args.experiments and not args.docs:
        parser.error(
            f"name one or more experiments ({', '.join(EXPERIMENTS)}, or all), or --docs"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # On a 2-core machine shared with other jobs, two intra-op threads made the
    # in-process brains several times slower than one (85 s against over 360 s).
    torch.set_num_threads(1)
    if args.experiments:
        try:
            experiments = select(args.experiments)
            base = RunConfig(
                dataset="cifar10",
                data_dir=str(Path(args.data_dir or default_data_dir()).resolve()),
                epochs=args.epochs,
                train_limit=args.train_limit,
                val_size=args.val_size,
                test_limit=args.test_limit,
                width=args.width,
                git_revision=git_revision(),
            )
            if "all" in args.experiments:
                experiments = _drop_unsupported(experiments, base)
            for experiment in experiments:
                check_supported(experiment, base)
        except (ExperimentError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        run_all(experiments, base, args, argv)
    if args.docs:
        written = results_doc.publish(args.output_dir)
        print(f"rebuilt {written}")
    return 0


def _drop_unsupported(experiments: list[Experiment], base: RunConfig) -> list:
    kept = []
    for experiment in experiments:
        try:
            check_supported(experiment, base)
            kept.append(experiment)
        except ExperimentError as err:
            log.warning("skipping %s: %s", experiment.id, err)
    return kept


def run_all(experiments: list[Experiment], base: RunConfig, args, argv) -> None:
    seeds = list(range(args.seeds))
    runs_dir = args.output_dir / "runs"
    planned = planned_runs(experiments, base, seeds, runs_dir)
    log.info(
        "%d experiments (%s), seeds %s: %d distributed runs to train",
        len(experiments),
        " ".join(e.id for e in experiments),
        seeds,
        planned,
    )
    runner = Runner(base, seeds, runs_dir, planned, args.reuse_only)
    words = sys.argv[1:] if argv is None else argv
    context = {
        "command": "python -m deploy.experiments " + shlex.join(words),
        "git_revision": base.git_revision,
        "hardware": hardware(),
        "dataset": base.dataset,
        "budget": budget(base),
        "seeds": seeds,
        "chance": 1 / DATASET_INFO[base.dataset].num_classes,
    }
    for experiment in experiments:
        started = time.perf_counter()
        record = run_experiment(experiment, runner, context)
        record["seconds"] = time.perf_counter() - started
        if not record["variants"]:
            log.warning("%s has no finished runs: nothing written", experiment.id)
            continue
        paths = write_experiment(record, args.output_dir)
        log.info("%s written: %s", experiment.id, ", ".join(map(str, paths)))


if __name__ == "__main__":
    sys.exit(main())
