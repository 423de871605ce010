"""Kill arm K of a running service (or training run), then wait for it to rejoin.

python -m deploy.kill_arm RUN_DIR --arm 2 --how sigkill --after-requests 200

`--how ray` uses ray.kill (Ray restarts the actor); `sigkill` and `sigterm` signal
the arm's process. The kill waits for R more answered requests or S seconds. Each kill
and the arm's recovery (dead, probing, live) are appended to RUN_DIR/faults.jsonl,
which deploy/load.py reads for its summary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from deploy import faults
from deploy.cli import (
    non_negative_float,
    non_negative_int,
    positive_float,
    script_parser,
)


def wait_for_requests(count: int, timeout_s: float) -> None:
    """Wait until the service has answered `count` more requests than it had now."""
    deadline = time.monotonic() + timeout_s
    target = faults.brain_stats()["answered"] + count
    while faults.brain_stats()["answered"] < target:
        if time.monotonic() > deadline:
            raise faults.FaultError(
                f"the service answered fewer than {count} requests in {timeout_s:.0f} s:"
                " is deploy/load.py running?"
            )
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--arm", type=non_negative_int, required=True, help="arm id K")
    parser.add_argument(
        "--how",
        choices=faults.KILL_METHODS,
        default="sigkill",
        help="ray.kill (Ray restarts it), or a signal to the arm's process",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--after-requests",
        type=non_negative_int,
        default=0,
        help="R more answered requests",
    )
    when.add_argument(
        "--after-seconds", type=non_negative_float, default=0.0, help="S seconds"
    )
    parser.add_argument(
        "--wait-rejoin-s",
        type=positive_float,
        default=120.0,
        help="seconds to wait for the arm to be readmitted",
    )
    args = parser.parse_args(argv)
    if args.after_requests < 0 or args.after_seconds < 0 or args.arm < 0:
        parser.error("--arm, --after-requests and --after-seconds must be >= 0")
    try:
        info = faults.connect(args.run_dir)
        serving = "service" in info
        if args.after_requests and not serving:
            raise faults.FaultError(
                "--after-requests needs a running service; a training run takes "
                "--after-seconds"
            )
        if args.after_requests:
            wait_for_requests(args.after_requests, timeout_s=3600)
        elif args.after_seconds:
            time.sleep(args.after_seconds)
        kill = faults.kill(f"arm-{args.arm}", args.how, args.run_dir)
        print(f"killed arm {args.arm} (pid {kill['pid']}) with {args.how}", flush=True)
        if not serving:
            return 0
        times = faults.wait_rejoin(args.arm, kill["time"], args.wait_rejoin_s)
    except faults.FaultError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recovery = {"kind": "recovery", "target": kill["target"], "kill_time": kill["time"]}
    recovery |= times
    with (args.run_dir / "faults.jsonl").open("a") as f:
        f.write(json.dumps(recovery) + "\n")
    for state in ("dead", "probing", "live"):
        at = times[state]
        took = (
            "not seen" if at is None else f"after {(at - kill['time']) * 1000:.0f} ms"
        )
        print(f"arm {args.arm} {state}: {took}")
    return 0 if times["live"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
