"""Fault injection: kill an arm's or the brain's actor, and watch it come back.

Shared by deploy/kill_arm.py, deploy/chaos.py and deploy/resilience.py. A kill is
either through Ray (`ray.kill`, which restarts the actor) or an OS signal to the
actor's process (SIGKILL, SIGTERM). Each kill is appended to RUN_DIR/faults.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import ray

KILL_METHODS = ("ray", "sigkill", "sigterm")
RPC_TIMEOUT_S = 10.0


class FaultError(RuntimeError):
    """The target could not be found or killed."""


def connect(run_dir: Path) -> dict:
    """Join the Ray cluster described by RUN_DIR/cluster.json; return that description."""
    path = run_dir / "cluster.json"
    try:
        info = json.loads(path.read_text())
        address, namespace = info["ray_address"], info["namespace"]
    except FileNotFoundError as err:
        raise FaultError(
            f"{path} not found: start `python -m deploy.serve {run_dir}` (or a "
            "training run) first"
        ) from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise FaultError(f"{path} is not a cluster description ({err!r})") from err
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    return info


def actor(name: str):
    try:
        return ray.get_actor(name)
    except ValueError as err:
        raise FaultError(
            f"no actor named {name!r} in this cluster: arms are arm-0 .. arm-N-1"
        ) from err


def process_id(name: str, timeout_s: float = RPC_TIMEOUT_S) -> int:
    """Return the pid of `name`'s current process, waiting while Ray restarts it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor(name).process_id.remote(), timeout=RPC_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            if time.monotonic() > deadline:
                raise FaultError(
                    f"{name} did not respond within {timeout_s:.0f} s"
                ) from err
            time.sleep(0.2)


def kill(
    name: str, how: str, run_dir: Path | None = None, restart: bool = True
) -> dict:
    """Kill actor `name` now; return (and log to faults.jsonl) what was done, when."""
    if how not in KILL_METHODS:
        raise FaultError(f"invalid kill method {how!r}: choose one of {KILL_METHODS}")
    handle = actor(name)
    pid = process_id(name)
    killed_s = time.time()
    if how == "ray":
        ray.kill(handle, no_restart=not restart)
    else:
        os.kill(pid, signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    record = {"kind": "kill", "time": killed_s, "target": name, "how": how, "pid": pid}
    if run_dir is not None:
        with (run_dir / "faults.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def brain_stats(timeout_s: float = 60.0) -> dict:
    """Return the serving brain's stats, waiting while a restarted brain comes back."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor("brain").stats.remote(), timeout=RPC_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            if time.monotonic() > deadline:
                raise FaultError(
                    f"the brain did not respond within {timeout_s:.0f} s"
                ) from err
            time.sleep(0.2)


def wait_rejoin(arm_id: int, killed_s: float, timeout_s: float) -> dict:
    """Wait until arm `arm_id` is live again after a kill at `killed_s` (wall clock).

    Returns the wall-clock times the brain marked it dead, saw its restarted
    process (probing) and readmitted it. A time not reached before `timeout_s` is
    None.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        times = rejoin_times(brain_stats()["changes"], arm_id, killed_s)
        if times["live"] is not None or time.monotonic() > deadline:
            return times
        time.sleep(0.2)


def rejoin_times(changes: list[dict], arm_id: int, killed_s: float) -> dict:
    """Return the first death after the kill, and the probe and readmission after it."""
    times = {"dead": None, "probing": None, "live": None}
    for change in sorted(changes, key=lambda c: c["time"]):
        # 10 ms: the brain's change times are converted from its monotonic clock.
        if change["arm_id"] != arm_id or change["time"] < killed_s - 0.01:
            continue
        if times["dead"] is None:
            if change["new"] == "dead":
                times["dead"] = change["time"]
        elif times["probing"] is None:
            if change["new"] == "probing":
                times["probing"] = change["time"]
        elif change["new"] == "live":
            times["live"] = change["time"]
            break
        elif change["new"] == "dead":  # the probe failed: wait for the next one
            times["probing"] = None
    return times


def wait_brain_back(old_pid: int, timeout_s: float) -> float | None:
    """Wait until a brain process other than `old_pid` serves; return when (wall)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = brain_stats(timeout_s=RPC_TIMEOUT_S)
        except FaultError:
            continue
        if stats["pid"] != old_pid:
            return time.time()
        time.sleep(0.2)
    return None
