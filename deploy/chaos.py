"""Kill random arms (and, optionally, the brain) of a running service under load.

python -m deploy.chaos RUN_DIR --duration-s 60 --brain

While a load of real test images runs, a random live arm is killed every few
seconds (ray.kill, SIGKILL or SIGTERM at random), and the next kill waits until
the victim has rejoined. At the end: requests sent, answered, degraded and lost,
accuracy before, during and after the faults, time from each kill to the first
answer without the victim and from restart to rejoin; JSON and a PNG timeline.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deploy import faults  # noqa: E402
from deploy.cli import (  # noqa: E402
    add_load_arguments,
    non_negative_float,
    positive_float,
    script_parser,
)
from deploy.client import ServiceClient, ServiceError  # noqa: E402
from deploy.load import load_test_split, run_load  # noqa: E402
from deploy.serve import read_run_config  # noqa: E402
from deploy.timeline import format_summary, summarize  # noqa: E402

REJOIN_TIMEOUT_S = 120.0


def kill_loop(
    run_dir: Path,
    arms: int,
    duration_s: float,
    gap_s: tuple[float, float],
    methods: list[str],
    brain_share: float,
    seed: int,
    records: list[dict],
    stop: threading.Event,
) -> None:
    """Kill, wait for recovery, pause; until `duration_s`; then end the load."""
    rng = random.Random(seed)
    started = time.monotonic()
    try:
        stop.wait(rng.uniform(*gap_s))
        while not stop.is_set() and time.monotonic() - started < duration_s:
            how = rng.choice(methods)
            if rng.random() < brain_share:
                old_pid = faults.brain_stats()["pid"]
                kill = faults.kill("brain", how, run_dir)
                back = faults.wait_brain_back(old_pid, REJOIN_TIMEOUT_S)
                records += [kill, _recovery(kill, {"live": back})]
                _wait_all_live(arms)
            else:
                live = faults.brain_stats()["live_arms"]
                arm_id = rng.choice(live)
                kill = faults.kill(f"arm-{arm_id}", how, run_dir)
                times = faults.wait_rejoin(arm_id, kill["time"], REJOIN_TIMEOUT_S)
                records += [kill, _recovery(kill, times)]
                if times["live"] is None:
                    print(
                        f"  arm-{arm_id} did not rejoin within {REJOIN_TIMEOUT_S:.0f} s "
                        "(Ray stops restarting an actor after --actor-restarts); "
                        "ending the chaos",
                        flush=True,
                    )
                    return
            print(f"  {kill['target']} killed with {how}; back", flush=True)
            stop.wait(rng.uniform(*gap_s))
    except faults.FaultError as err:
        print(f"  chaos ended early: {err}", flush=True)
    finally:
        stop.set()


def _recovery(kill: dict, times: dict) -> dict:
    return {"kind": "recovery", "target": kill["target"], "kill_time": kill["time"]} | (
        times
    )


def _wait_all_live(arms: int) -> None:
    deadline = time.monotonic() + REJOIN_TIMEOUT_S
    while len(faults.brain_stats()["live_arms"]) < arms:
        if time.monotonic() > deadline:
            raise faults.FaultError(f"not all {arms} arms rejoined the restarted brain")
        time.sleep(0.2)


def plot_timeline(records: list[dict], fault_records: list[dict], path: Path) -> None:
    """Accuracy (moving mean) and arms per answer over time, kills and rejoins marked."""
    answered = sorted(
        (r for r in records if not r["error"]), key=lambda r: r["answered"]
    )
    if not answered:
        return
    start = min(r["sent"] for r in records)
    t = np.array([r["answered"] - start for r in answered])
    hits = np.array([r["correct"] / r["images"] for r in answered])
    window = max(1, min(25, len(hits) // 10))
    sums = np.cumsum(np.concatenate([[0.0], hits]))
    # Trailing mean: each point averages the answers up to it, no look-ahead.
    smooth = (
        sums[1:] - sums[np.maximum(0, np.arange(1, len(sums)) - window)]
    ) / np.minimum(np.arange(1, len(sums)), window)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(t, smooth * 100, lw=1.2, label=f"accuracy (mean of {window} answers)")
    top.set_ylabel("accuracy (%)")
    bottom.step(t, [len(r["arm_ids"]) for r in answered], where="post", lw=1.0)
    bottom.set_ylabel("arms in the answer")
    bottom.set_xlabel("seconds since the first request")
    for record in fault_records:
        if record["kind"] == "kill":
            x, color = record["time"] - start, "tab:red"
        elif record.get("live"):
            x, color = record["live"] - start, "tab:green"
        else:
            continue
        for axis in (top, bottom):
            axis.axvline(x, color=color, lw=0.8, ls="--")
    top.set_title("Answers under chaos: red dashes are kills, green ones rejoins")
    top.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    add_load_arguments(parser)
    parser.add_argument(
        "--duration-s", type=positive_float, default=60.0, help="seconds of kills"
    )
    parser.add_argument(
        "--gap-s",
        type=positive_float,
        nargs=2,
        default=(2.0, 5.0),
        metavar=("MIN", "MAX"),
        help="seconds between a victim's return and the next kill",
    )
    parser.add_argument(
        "--how",
        nargs="+",
        choices=faults.KILL_METHODS,
        default=list(faults.KILL_METHODS),
    )
    parser.add_argument("--brain", action="store_true", help="kill the brain too")
    parser.add_argument(
        "--brain-share",
        type=non_negative_float,
        default=0.25,
        help="with --brain, the share of kills aimed at the brain",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the random kills")
    args = parser.parse_args(argv)
    if args.duration_s <= 0 or not 0 < args.gap_s[0] <= args.gap_s[1]:
        parser.error("--duration-s must be > 0 and --gap-s MIN MAX with 0 < MIN <= MAX")
    try:
        config = read_run_config(args.run_dir)
        images, labels = load_test_split(args.run_dir, args.data_dir)
        faults.connect(args.run_dir)
        client = ServiceClient.from_run(args.run_dir)
    except (FileNotFoundError, ServiceError, faults.FaultError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    fault_records: list[dict] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=kill_loop,
        args=(
            args.run_dir,
            config.arms,
            args.duration_s,
            tuple(args.gap_s),
            args.how,
            args.brain_share if args.brain else 0.0,
            args.seed,
            fault_records,
            stop,
        ),
        daemon=True,
    )
    print(f"chaos for {args.duration_s:.0f} s at {args.rate:g} requests/s", flush=True)
    killer.start()
    with client:
        records = run_load(
            client,
            images,
            labels,
            args.rate,
            args.batch_size,
            duration_s=1e9,
            stop=stop,
        )
    killer.join()

    summary = summarize(records, fault_records, config.arms)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.run_dir / f"chaos-{stamp}"
    out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "faults": fault_records}, indent=2) + "\n"
    )
    plot_timeline(records, fault_records, out.with_suffix(".png"))
    with out.with_suffix(".jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(format_summary(summary))
    print(f"written {out}.json, {out}.jsonl (every answer) and {out}.png")
    if summary["lost"]:
        print(f"{summary['lost']} requests lost: exit status 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
