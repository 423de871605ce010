"""Resilience report: test accuracy with every single arm and every pair really killed.

python -m deploy.resilience RUN_DIR

Serves the run, kills the arm actors of each case for real (ray.kill, no restart),
streams the test set through the service, then starts them again. The same cases
are scored in-process with the arms masked; the two must agree within 0.5 points.
Two backprop baselines (deploy/baselines.py) are trained on the same data and
failed the same way. Writes resilience.json, resilience.md and resilience.png.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.datasets import DATASET_INFO  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from deploy import faults  # noqa: E402
from deploy.api import load_run  # noqa: E402
from deploy.cli import non_negative_int, positive_float, script_parser  # noqa: E402
from deploy.client import ServiceClient  # noqa: E402
from deploy.load import load_test_split, run_load  # noqa: E402
from deploy.serve import Service, check_servable, read_run_config  # noqa: E402
from deploy.training import git_revision  # noqa: E402

log = logging.getLogger(__name__)

AGREEMENT_POINTS = 0.5
REQUEST_IMAGES = 100
# Resilience is about which arms answer, not speed: a long deadline keeps slow but
# live arms in every answer, while dead ones are still left out at once.
DEADLINE_S = 10.0

# Reported by the original project (../shared/REFERENCE.md), CIFAR-10, single runs.
ORIGINAL = [
    ("Original: backprop CNN, one block zeroed", 0.9096, 0.1000, None),
    ("Original: FF, no module dropout", 0.5020, 0.1389, 0.1001),
    ("Original: FF + module dropout 0.25", 0.5250, 0.4172, None),
    ("Original: channel grouping + module dropout 0.5", 0.6434, 0.6112, 0.5287),
    ("Original: channel grouping + stride convs, dropout 0.7", 0.6865, 0.6703, 0.5603),
]


BASELINE_NAMES = {
    "plain_cnn": "Backprop plain CNN, blocks zeroed",
    "multiscale": "Backprop multiscale net + module dropout, branches masked",
}


def failure_cases(arms: int) -> list[tuple[int, ...]]:
    """No failure, every single arm, every pair."""
    singles = [(a,) for a in range(arms)]
    pairs = list(itertools.combinations(range(arms), 2)) if arms > 2 else []
    return [(), *singles, *pairs]


def case_name(dead: tuple[int, ...]) -> str:
    return "none" if not dead else "+".join(map(str, dead))


def stream_test_set(service: Service, images, labels, expected_arms: list[int]) -> dict:
    """Send every test image once; return accuracy and answers whose arms differ."""
    client = ServiceClient(
        service.cluster.service["client_endpoint"],
        service.cluster.service["token"],
        retry_s=DEADLINE_S * 3,
    )
    requests = -(-len(images) // REQUEST_IMAGES)
    with client:
        records = run_load(
            client,
            images,
            labels,
            rate=1000.0,
            batch_size=REQUEST_IMAGES,
            requests=requests,
            max_in_flight=4,
        )
    answered = [r for r in records if not r["error"]]
    mismatched = [r for r in answered if r["arm_ids"] != expected_arms]
    images_scored = sum(r["images"] for r in answered)
    return {
        "accuracy": sum(r["correct"] for r in answered) / max(1, images_scored),
        "requests": len(records),
        "answered": len(answered),
        "lost_or_refused": len(records) - len(answered),
        "arm_mismatches": len(mismatched),
        "images": images_scored,
    }


def kill_and_measure(service: Service, dead: tuple[int, ...], images, labels) -> dict:
    arms = service.config.arms
    for arm_id in dead:
        faults.kill(f"arm-{arm_id}", "ray", service.run_dir, restart=False)
    live = [a for a in range(arms) if a not in dead]
    killed_s = time.monotonic()
    while sorted(service.stats()["live_arms"]) != live:
        if time.monotonic() - killed_s > 30:
            raise faults.FaultError(f"the brain still counts arms {dead} as live")
        time.sleep(0.02)
    left_out_ms = (time.monotonic() - killed_s) * 1000
    result = stream_test_set(service, images, labels, live)
    for arm_id in dead:
        _restart_arm(service, arm_id)
    service.wait_live(arms, timeout_s=180)
    return result | {"left_out_ms": left_out_ms}


def _restart_arm(service: Service, arm_id: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            service.cluster.create_service_arm(arm_id)
            return
        except ValueError:  # the killed actor's name is not released yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def in_process(run_dir: Path, images, labels, cases) -> dict[str, float]:
    model = load_run(run_dir)
    arms = len(model.arms)
    subsets = [[a for a in range(arms) if a not in dead] for dead in cases]
    accuracies = model.evaluate_subsets(images, labels, subsets)
    return {case_name(dead): acc for dead, acc in zip(cases, accuracies, strict=True)}


def summarize_model(name: str, accuracy: dict[str, float]) -> dict:
    singles = {k: v for k, v in accuracy.items() if k != "none" and "+" not in k}
    pairs = {k: v for k, v in accuracy.items() if "+" in k}
    worst_single = min(singles.items(), key=lambda kv: kv[1]) if singles else None
    worst_pair = min(pairs.items(), key=lambda kv: kv[1]) if pairs else None
    normal = accuracy["none"]
    return {
        "model": name,
        "normal": normal,
        "worst_single": worst_single,
        "worst_pair": worst_pair,
        "single_loss_points": (normal - worst_single[1]) * 100
        if worst_single
        else None,
        "pair_loss_points": (normal - worst_pair[1]) * 100 if worst_pair else None,
        "cases": accuracy,
    }


def write_markdown(report: dict, path: Path) -> None:
    def pct(value):
        return "-" if value is None else f"{value * 100:.2f}%"

    def worst(pair):
        return "-" if pair is None else f"{pct(pair[1])} (lost {pair[0]})"

    lines = [
        "# Resilience",
        "",
        f"Run `{report['run_dir']}`, git {report['git_revision']}, "
        f"{report['test_images']} test images, {report['hardware']}.",
        f"Command: `{report['command']}`",
        "",
        "| Model | Normal | Worst single lost | Worst pair lost | Single-loss cost |",
        "|---|---|---|---|---|",
    ]
    for row in report["models"]:
        cost = row["single_loss_points"]
        lines.append(
            f"| {row['model']} | {pct(row['normal'])} | {worst(row['worst_single'])} | "
            f"{worst(row['worst_pair'])} | {'-' if cost is None else f'{cost:.2f} pts'} |"
        )
    for name, normal, single, pair in ORIGINAL:
        lines.append(
            f"| {name} | {pct(normal)} | {pct(single)} | {pct(pair)} | "
            f"{(normal - single) * 100:.2f} pts |"
        )
    lines.append("")
    lines += [f"- {r['model']}: {r['description']}" for r in report["models"][1:]]
    lines += [
        "",
        "Killed for real: each case's arm actors were killed with ray.kill, the brain "
        f"left them out, and all {report['test_images']} test images went through "
        "the service. Rows starting `Original:` are the figures the original "
        "project reported (30-100 epochs, best epoch chosen on the test set); they "
        "were not measured here.",
        "",
        "| Dead arms | Distributed | In-process masked | Difference | Left out after | "
        "Answers with other arms |",
        "|---|---|---|---|---|---|",
    ]
    for case, measured in report["distributed"].items():
        masked = report["in_process"][case]
        lines.append(
            f"| {case} | {pct(measured['accuracy'])} | {pct(masked)} | "
            f"{(measured['accuracy'] - masked) * 100:+.2f} pts | "
            f"{measured['left_out_ms']:.0f} ms | {measured['arm_mismatches']} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


def plot(report: dict, chance: float, path: Path) -> None:
    models = report["models"]
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.2 * len(models)))
    for axis, row in zip(np.atleast_1d(axes), models, strict=True):
        cases = row["cases"]
        names = list(cases)
        axis.bar(range(len(names)), [cases[n] * 100 for n in names], color="tab:blue")
        axis.axhline(row["normal"] * 100, color="tab:green", ls="--", label="normal")
        axis.axhline(chance * 100, color="tab:red", ls=":", label="chance")
        axis.set_xticks(
            range(len(names)), [f"lost {n}" if n != "none" else n for n in names]
        )
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.set_title(row["model"])
        axis.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-dir", default="", help="default: the run's")
    parser.add_argument(
        "--test-limit", type=non_negative_int, default=0, help="0: whole test set"
    )
    parser.add_argument(
        "--cpus", type=non_negative_int, default=0, help="CPUs for Ray (0: all)"
    )
    parser.add_argument(
        "--heartbeat-timeout-s",
        type=positive_float,
        default=0.5,
        help="seconds of silence before a live arm is dead; above the serving "
        "default, so a busy host does not lose arms that were not killed",
    )
    parser.add_argument(
        "--baselines",
        choices=["train", "reuse", "skip"],
        default="reuse",
        help="reuse RUN_DIR/baselines.json when present, else train",
    )
    parser.add_argument(
        "--baseline-epochs", type=non_negative_int, default=0, help="0: the run's"
    )
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        config = read_run_config(args.run_dir)
        check_servable(config, args.run_dir)
        images, labels = load_test_split(args.run_dir, args.data_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.test_limit:
        images, labels = images[: args.test_limit], labels[: args.test_limit]
    cases = failure_cases(config.arms)

    log.info("in-process masked evaluation of %d cases", len(cases))
    masked = in_process(args.run_dir, images, labels, cases)
    distributed = {}
    overrides = {
        "cpus": float(args.cpus),
        "deadline_s": DEADLINE_S,
        "heartbeat_timeout_s": args.heartbeat_timeout_s,
    }
    with Service(args.run_dir, overrides) as service:
        for dead in cases:
            result = kill_and_measure(service, dead, images, labels)
            distributed[case_name(dead)] = result
            log.info(
                "dead arms %s: accuracy %.4f (in-process %.4f), left out after %.0f ms",
                case_name(dead),
                result["accuracy"],
                masked[case_name(dead)],
                result["left_out_ms"],
            )

    models = [
        summarize_model(
            "OctopusNet (this run, arms killed)",
            {case: r["accuracy"] for case, r in distributed.items()},
        )
    ]
    if args.baselines != "skip":
        models += baseline_rows(args, config)
    disagreements = {
        case: (r["accuracy"] - masked[case]) * 100
        for case, r in distributed.items()
        if abs(r["accuracy"] - masked[case]) * 100 > AGREEMENT_POINTS
    }
    report = {
        "run_dir": str(args.run_dir),
        "git_revision": git_revision(),
        "config": config.to_dict(),
        "command": "python -m deploy.resilience " + " ".join(argv or sys.argv[1:]),
        "hardware": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "test_images": len(images),
        "distributed": distributed,
        "in_process": masked,
        "disagreements_over_half_point": disagreements,
        "lost_or_refused": sum(r["lost_or_refused"] for r in distributed.values()),
        "arm_mismatches": sum(r["arm_mismatches"] for r in distributed.values()),
        "models": models,
        "original": ORIGINAL,
    }
    out = args.run_dir
    (out / "resilience.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "resilience.md")
    chance = 1.0 / DATASET_INFO[config.dataset].num_classes
    plot(report, chance, out / "resilience.png")
    print((out / "resilience.md").read_text())
    problems = [
        f"{len(disagreements)} cases differ from the in-process evaluation by more "
        f"than {AGREEMENT_POINTS} points" * bool(disagreements),
        f"{report['lost_or_refused']} requests lost or refused"
        * bool(report["lost_or_refused"]),
        f"{report['arm_mismatches']} answers from other arms than the live ones (a "
        "busy host? raise --heartbeat-timeout-s)" * bool(report["arm_mismatches"]),
    ]
    problems = [p for p in problems if p]
    if problems:
        print("exit status 1: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def baseline_rows(args, config) -> list[dict]:
    from deploy.baselines import train_baselines

    path = args.run_dir / "baselines.json"
    if args.baselines == "reuse" and path.is_file():
        results = json.loads(path.read_text())
    else:
        results = train_baselines(
            config, args.run_dir, args.baseline_epochs or config.epochs
        )
    rows = []
    for model in results["models"].values():
        accuracy = {"none": model["test_accuracy"], **model["failure_test_accuracy"]}
        row = summarize_model(
            BASELINE_NAMES.get(model["name"], model["name"]), accuracy
        )
        rows.append(row | {"description": model["description"]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
