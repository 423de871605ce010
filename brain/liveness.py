"""Which arms the brain answers from: liveness bookkeeping with timestamps as inputs.

An arm is `unknown` until its first heartbeat, then `probing` until it answers a
health-check request, then `live`. Missing heartbeats for `timeout_s`, or
`miss_limit` deadlines in a row, make it `dead`; its next heartbeat starts a new
probe. Every call returns the state changes it made, each with its reason, so the
caller can log them. No clocks or sockets here: the caller passes `now_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNKNOWN, PROBING, LIVE, DEAD = "unknown", "probing", "live", "dead"


@dataclass(frozen=True)
class Change:
    """One arm's move from `old` to `new` state at `time_s`, and why."""

    arm_id: int
    old: str
    new: str
    reason: str
    time_s: float


@dataclass
class ArmState:
    status: str = UNKNOWN
    pid: int = 0
    last_heartbeat_s: float = -math.inf
    since_s: float = 0.0
    misses: int = 0
    deaths: int = 0
    admissions: int = 0
    retry_after_s: float = 0.0


class Liveness:
    """The live/dead view of `arms` arms, driven by heartbeats, replies and deadlines."""

    def __init__(
        self, arms: int, timeout_s: float, miss_limit: int, backoff_s: float = 1.0
    ):
        if not (
            arms >= 1
            and math.isfinite(timeout_s)
            and timeout_s > 0
            and miss_limit >= 1
            and math.isfinite(backoff_s)
            and backoff_s >= 0
        ):
            raise ValueError(
                f"invalid liveness settings: arms {arms}, timeout {timeout_s} s, "
                f"miss limit {miss_limit}, backoff {backoff_s} s"
            )
        self.timeout_s = timeout_s
        self.miss_limit = miss_limit
        self.backoff_s = backoff_s
        self.arms = [ArmState() for _ in range(arms)]

    def status(self, arm_id: int) -> str:
        return self.arms[arm_id].status

    def live_arms(self) -> tuple[int, ...]:
        return tuple(i for i, arm in enumerate(self.arms) if arm.status == LIVE)

    def probing_arms(self) -> tuple[int, ...]:
        return tuple(i for i, arm in enumerate(self.arms) if arm.status == PROBING)

    def heartbeat(self, arm_id: int, now_s: float, pid: int) -> list[Change]:
        """Record a heartbeat; an unknown, dead or restarted arm starts a probe."""
        arm = self.arms[arm_id]
        arm.last_heartbeat_s = now_s
        if arm.status in (UNKNOWN, DEAD) and now_s < arm.retry_after_s:
            return []  # the pid is kept, so the log shows the restart when probed
        old_pid, arm.pid = arm.pid, pid
        if arm.status in (UNKNOWN, DEAD):
            where = f"pid {pid}" if arm.status == UNKNOWN else f"pid {old_pid} -> {pid}"
            return [self._move(arm_id, PROBING, f"heartbeat from {where}", now_s)]
        if old_pid and pid != old_pid:
            # Restarted faster than the timeout: the new process must pass its own probe.
            arm.deaths += 1
            return [
                self._move(
                    arm_id, PROBING, f"restarted (pid {old_pid} -> {pid})", now_s
                )
            ]
        return []

    def leave(self, arm_id: int, now_s: float, pid: int) -> list[Change]:
        """Mark an arm dead now because its process sent an exiting heartbeat."""
        arm = self.arms[arm_id]
        if arm.status not in (PROBING, LIVE) or pid != arm.pid:
            return []  # an old process's goodbye after its restart has been seen
        return [self._kill(arm_id, f"process {pid} is exiting", now_s)]

    def check(self, now_s: float) -> list[Change]:
        """Mark dead every probing or live arm whose last heartbeat is too old."""
        changes = []
        for arm_id, arm in enumerate(self.arms):
            silent_s = now_s - arm.last_heartbeat_s
            if arm.status in (PROBING, LIVE) and silent_s > self.timeout_s:
                changes.append(
                    self._kill(
                        arm_id,
                        f"no heartbeat for {silent_s * 1000:.0f} ms "
                        f"(timeout {self.timeout_s * 1000:.0f} ms)",
                        now_s,
                    )
                )
        return changes

    def admit(self, arm_id: int, now_s: float, reason: str) -> list[Change]:
        """Admit a probing arm that passed its health check."""
        arm = self.arms[arm_id]
        if arm.status != PROBING:
            return []
        arm.admissions += 1
        arm.misses = 0
        return [self._move(arm_id, LIVE, reason, now_s)]

    def reject(self, arm_id: int, now_s: float, reason: str) -> list[Change]:
        """Mark dead a probing arm that failed its health check; probe it after the backoff."""
        if self.arms[arm_id].status != PROBING:
            return []
        return [self._kill(arm_id, reason, now_s)]

    def replied(self, arm_id: int) -> None:
        self.arms[arm_id].misses = 0

    def missed(self, arm_id: int, now_s: float) -> list[Change]:
        """Count a missed deadline of a live arm; `miss_limit` in a row make it dead."""
        arm = self.arms[arm_id]
        if arm.status != LIVE:
            return []
        arm.misses += 1
        if arm.misses < self.miss_limit:
            return []
        reason = f"missed {arm.misses} deadlines in a row (raise --deadline-s on a busy host)"
        return [self._kill(arm_id, reason, now_s)]

    def _kill(self, arm_id: int, reason: str, now_s: float) -> Change:
        arm = self.arms[arm_id]
        arm.deaths += 1
        arm.misses = 0
        arm.retry_after_s = now_s + self.backoff_s
        return self._move(arm_id, DEAD, reason, now_s)

    def _move(self, arm_id: int, new: str, reason: str, now_s: float) -> Change:
        arm = self.arms[arm_id]
        change = Change(arm_id, arm.status, new, reason, now_s)
        arm.status = new
        arm.since_s = now_s
        return change

    def summary(self) -> list[dict]:
        return [
            {
                "arm_id": i,
                "status": arm.status,
                "pid": arm.pid,
                "deaths": arm.deaths,
                "admissions": arm.admissions,
            }
            for i, arm in enumerate(self.arms)
        ]
