"""Liveness bookkeeping with explicit timestamps, and the brain's arm-dropout mask.

Run: pytest tests/test_liveness.py
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from brain.liveness import DEAD, LIVE, PROBING, UNKNOWN, Change, Liveness
from brain.model import arm_dropout_mask

ARMS = 4
TIMEOUT_S = 0.3
MISS_LIMIT = 3
BACKOFF_S = 1.0
PID = 100


def liveness() -> Liveness:
    return Liveness(
        ARMS, timeout_s=TIMEOUT_S, miss_limit=MISS_LIMIT, backoff_s=BACKOFF_S
    )


def live_arm(arm_id: int = 0, now_s: float = 0.0) -> Liveness:
    """Bookkeeping where `arm_id` sent a heartbeat and passed its probe at `now_s`."""
    state = liveness()
    state.heartbeat(arm_id, now_s, PID)
    state.admit(arm_id, now_s, "passed the health check")
    return state


def only(changes: list[Change]) -> Change:
    assert len(changes) == 1, changes
    return changes[0]


# Heartbeats and probes.


def test_first_heartbeat_starts_probe():
    state = liveness()

    change = only(state.heartbeat(2, 5.0, PID))

    assert change == Change(2, UNKNOWN, PROBING, f"heartbeat from pid {PID}", 5.0)
    assert state.status(2) == PROBING
    assert state.probing_arms() == (2,)
    assert state.live_arms() == ()


def test_unknown_arms_stay_unknown():
    state = liveness()
    state.heartbeat(0, 0.0, PID)

    changes = state.check(100.0)

    # Arms that never sent a heartbeat cannot time out, but arm 0 does.
    assert [change.arm_id for change in changes] == [0]
    for arm_id in (1, 2, 3):
        assert state.status(arm_id) == UNKNOWN


def test_admit_makes_live():
    state = liveness()
    state.heartbeat(1, 0.0, PID)

    change = only(state.admit(1, 0.2, "passed the health check (12 ms)"))

    assert change == Change(1, PROBING, LIVE, "passed the health check (12 ms)", 0.2)
    assert state.live_arms() == (1,)
    assert state.probing_arms() == ()


@pytest.mark.parametrize("status", [UNKNOWN, LIVE, DEAD])
def test_admit_needs_probing(status):
    state = liveness()
    if status != UNKNOWN:
        state.heartbeat(0, 0.0, PID)
        state.admit(0, 0.0, "passed")
    if status == DEAD:
        state.check(1.0)
    assert state.status(0) == status

    assert state.admit(0, 1.0, "passed") == []
    assert state.status(0) == status


def test_heartbeats_keep_arm_live():
    state = live_arm()

    for step in range(1, 50):
        now_s = step * 0.1  # every 100 ms, inside the 300 ms timeout
        assert state.heartbeat(0, now_s, PID) == []
        assert state.check(now_s + 0.05) == []

    assert state.status(0) == LIVE


# Deaths: heartbeat timeout, missed deadlines, restarts, rejected probes.


def test_heartbeat_timeout_kills():
    state = live_arm(now_s=0.0)

    assert state.check(TIMEOUT_S) == []  # silence equal to the timeout is allowed
    change = only(state.check(0.45))

    assert (change.arm_id, change.old, change.new) == (0, LIVE, DEAD)
    assert change.reason == "no heartbeat for 450 ms (timeout 300 ms)"
    assert change.time_s == 0.45
    assert state.live_arms() == ()


def test_timeout_reason_names_silence():
    state = live_arm(now_s=0.0)

    change = only(state.check(2.5))

    silence_ms = re.search(r"no heartbeat for (\d+) ms", change.reason)
    assert silence_ms is not None, change.reason
    assert int(silence_ms.group(1)) == 2500


def test_probing_arm_times_out():
    state = liveness()
    state.heartbeat(3, 0.0, PID)

    change = only(state.check(0.5))

    assert (change.old, change.new) == (PROBING, DEAD)


def test_dead_arm_not_killed_again():
    state = live_arm()
    state.check(1.0)

    assert state.check(2.0) == []
    assert state.summary()[0]["deaths"] == 1


def test_missed_deadlines_kill():
    state = live_arm()

    for _ in range(MISS_LIMIT - 1):
        assert state.missed(0, 0.1) == []
        assert state.status(0) == LIVE
    change = only(state.missed(0, 0.2))

    assert (change.old, change.new) == (LIVE, DEAD)
    assert change.reason.startswith(f"missed {MISS_LIMIT} deadlines in a row")
    assert change.time_s == 0.2


def test_reply_resets_miss_count():
    state = live_arm()

    for _ in range(5):
        for _ in range(MISS_LIMIT - 1):
            assert state.missed(0, 0.1) == []
        state.replied(0)

    assert state.status(0) == LIVE
    assert state.arms[0].misses == 0


@pytest.mark.parametrize("status", [UNKNOWN, PROBING, DEAD])
def test_missed_ignored_unless_live(status):
    state = liveness()
    if status != UNKNOWN:
        state.heartbeat(0, 0.0, PID)
    if status == DEAD:
        state.check(1.0)

    for _ in range(MISS_LIMIT + 1):
        assert state.missed(0, 1.0) == []
    assert state.status(0) == status


def test_new_pid_while_live_probes():
    # A restart faster than the timeout shows up as a new pid, not as silence.
    state = live_arm(now_s=0.0)

    change = only(state.heartbeat(0, 0.1, PID + 1))

    assert (change.old, change.new) == (LIVE, PROBING)
    assert change.reason == f"restarted (pid {PID} -> {PID + 1})"
    assert change.time_s == 0.1
    assert state.live_arms() == ()
    assert state.summary()[0]["deaths"] == 1
    assert state.summary()[0]["pid"] == PID + 1


def test_same_pid_while_live_no_change():
    state = live_arm()

    assert state.heartbeat(0, 0.1, PID) == []
    assert state.status(0) == LIVE


def test_reject_kills_probing_arm():
    state = liveness()
    state.heartbeat(0, 0.0, PID)

    change = only(state.reject(0, 0.1, "health check: features differ by 0.5"))

    assert change == Change(
        0, PROBING, DEAD, "health check: features differ by 0.5", 0.1
    )
    assert state.summary()[0]["deaths"] == 1
    assert state.summary()[0]["admissions"] == 0


@pytest.mark.parametrize("status", [UNKNOWN, LIVE, DEAD])
def test_reject_needs_probing(status):
    state = liveness()
    if status != UNKNOWN:
        state.heartbeat(0, 0.0, PID)
        state.admit(0, 0.0, "passed")
    if status == DEAD:
        state.check(1.0)

    assert state.reject(0, 1.0, "failed") == []
    assert state.status(0) == status


# Backoff after a death.


def test_heartbeats_in_backoff_ignored():
    state = live_arm()
    state.check(0.5)  # dead at 0.5 s, probed again from 1.5 s

    for now_s in (0.5, 0.8, 1.2, 1.5 - 1e-6):
        assert state.heartbeat(0, now_s, PID) == []
        assert state.status(0) == DEAD
    change = only(state.heartbeat(0, 1.5, PID))

    assert (change.old, change.new) == (DEAD, PROBING)
    assert change.time_s == 1.5


def test_rejoin_reason_names_pids():
    state = live_arm()
    state.check(0.5)

    change = only(state.heartbeat(0, 2.0, PID + 7))

    assert change.reason == f"heartbeat from pid {PID} -> {PID + 7}"


def test_reject_backoff():
    state = liveness()
    state.heartbeat(0, 0.0, PID)
    state.reject(0, 0.2, "health check failed")

    assert state.heartbeat(0, 0.2 + BACKOFF_S / 2, PID) == []
    assert state.status(0) == DEAD
    assert only(state.heartbeat(0, 0.2 + BACKOFF_S, PID)).new == PROBING


def test_missed_deadline_backoff():
    state = live_arm()
    for _ in range(MISS_LIMIT):
        state.missed(0, 3.0)

    assert state.heartbeat(0, 3.5, PID) == []
    assert only(state.heartbeat(0, 4.0, PID)).new == PROBING


def test_zero_backoff_probes_at_once():
    state = Liveness(ARMS, timeout_s=TIMEOUT_S, miss_limit=MISS_LIMIT, backoff_s=0.0)
    state.heartbeat(0, 0.0, PID)
    state.reject(0, 0.1, "failed")

    assert only(state.heartbeat(0, 0.1, PID)).new == PROBING


def test_backoff_per_arm():
    state = liveness()
    for arm_id in range(ARMS):
        state.heartbeat(arm_id, 0.0, PID + arm_id)
        state.admit(arm_id, 0.0, "passed")
    for arm_id in range(ARMS):
        state.heartbeat(arm_id, 0.0 if arm_id == 1 else 1.0, PID + arm_id)
    state.check(1.2)  # arm 1 alone is silent, so it dies at 1.2 s

    assert state.live_arms() == (0, 2, 3)
    assert state.heartbeat(1, 2.0, PID + 1) == []
    assert only(state.heartbeat(1, 2.2, PID + 1)).new == PROBING


# A whole life, and the counts it leaves.


def test_every_change_recorded():
    state = liveness()
    changes = []
    changes += state.heartbeat(0, 0.0, PID)
    changes += state.admit(0, 0.1, "passed")
    changes += state.check(0.5)
    changes += state.heartbeat(0, 1.6, PID + 1)
    changes += state.reject(0, 1.7, "features differ")
    changes += state.heartbeat(0, 2.8, PID + 1)
    changes += state.admit(0, 2.9, "passed again")

    assert [(c.old, c.new) for c in changes] == [
        (UNKNOWN, PROBING),
        (PROBING, LIVE),
        (LIVE, DEAD),
        (DEAD, PROBING),
        (PROBING, DEAD),
        (DEAD, PROBING),
        (PROBING, LIVE),
    ]
    assert [c.time_s for c in changes] == [0.0, 0.1, 0.5, 1.6, 1.7, 2.8, 2.9]
    for change in changes:
        assert change.arm_id == 0
        assert change.reason, change
    assert state.arms[0].since_s == 2.9


def test_summary_counts():
    state = liveness()
    state.heartbeat(0, 0.0, PID)
    state.admit(0, 0.0, "passed")
    state.heartbeat(0, 0.1, PID + 1)  # restart: death 1
    state.admit(0, 0.2, "passed")
    state.check(1.0)  # timeout: death 2
    state.heartbeat(1, 1.0, PID + 10)
    state.admit(1, 1.0, "passed")
    state.heartbeat(2, 1.0, PID + 20)

    summary = state.summary()

    assert summary == [
        {"arm_id": 0, "status": DEAD, "pid": PID + 1, "deaths": 2, "admissions": 2},
        {"arm_id": 1, "status": LIVE, "pid": PID + 10, "deaths": 0, "admissions": 1},
        {"arm_id": 2, "status": PROBING, "pid": PID + 20, "deaths": 0, "admissions": 0},
        {"arm_id": 3, "status": UNKNOWN, "pid": 0, "deaths": 0, "admissions": 0},
    ]
    assert state.live_arms() == (1,)
    assert state.probing_arms() == (2,)


def test_live_arms_sorted():
    state = liveness()
    for arm_id in (3, 0, 2):
        state.heartbeat(arm_id, 0.0, PID)
        state.admit(arm_id, 0.0, "passed")

    assert state.live_arms() == (0, 2, 3)


@pytest.mark.parametrize(
    "settings",
    [
        {"arms": 0},
        {"arms": -1},
        {"timeout_s": 0.0},
        {"timeout_s": -0.1},
        {"miss_limit": 0},
        {"backoff_s": -1.0},
    ],
    ids=str,
)
def test_invalid_settings(settings):
    kwargs = {"arms": ARMS, "timeout_s": TIMEOUT_S, "miss_limit": MISS_LIMIT} | settings

    with pytest.raises(ValueError, match="invalid liveness settings"):
        Liveness(**kwargs)


def test_nan_timeout_invalid():
    with pytest.raises(ValueError, match="invalid liveness settings"):
        Liveness(ARMS, timeout_s=math.nan, miss_limit=MISS_LIMIT)


# Module dropout: the live mask the brain trains with.

# Every set of masked arms out of four that leaves at least one arm live.
MASKED_SETS = [
    frozenset(masked)
    for count in range(1, ARMS)
    for masked in itertools.combinations(range(ARMS), count)
]
SAMPLES = 20_000


@pytest.mark.parametrize("arms", [2, 3, 4])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_dropout_mask_share(arms, p):
    generator = torch.Generator().manual_seed(0)

    live = arm_dropout_mask(SAMPLES, arms, p, generator)

    assert live.shape == (SAMPLES, arms)
    assert live.dtype == torch.bool
    assert live.any(1).all(), "a sample lost every arm"
    share = (~live).any(1).float().mean().item()
    # The share of masked samples is binomial, so its standard deviation is at most
    # sqrt(0.25 / 20000) = 0.0035 and 0.02 is more than five of them.
    assert abs(share - p) < 0.02, f"{share:.4f} of samples masked, expected {p}"


def test_dropout_mask_every_subset():
    generator = torch.Generator().manual_seed(1)

    live = arm_dropout_mask(SAMPLES, ARMS, 0.5, generator)

    counts = {masked: 0 for masked in MASKED_SETS}
    for row in (~live).tolist():
        masked = frozenset(i for i, dead in enumerate(row) if dead)
        if masked:
            assert masked in counts, f"masked arms {sorted(masked)}"
            counts[masked] += 1
    for masked, count in counts.items():
        # 1 to 3 arms masked with equal chance, then one set of that size at random.
        expected = SAMPLES * 0.5 / (ARMS - 1) / math.comb(ARMS, len(masked))
        # The rarest sets expect about 556 samples (standard deviation about 23).
        assert abs(count - expected) < 0.2 * expected, (sorted(masked), count, expected)


@pytest.mark.parametrize("arms, p", [(1, 0.5), (1, 1.0), (4, 0.0), (4, -0.5)])
def test_dropout_mask_all_live(arms, p):
    live = arm_dropout_mask(64, arms, p, torch.Generator().manual_seed(0))

    assert live.shape == (64, arms)
    assert live.all()


def test_dropout_mask_seeded():
    first = arm_dropout_mask(256, ARMS, 0.5, torch.Generator().manual_seed(3))
    second = arm_dropout_mask(256, ARMS, 0.5, torch.Generator().manual_seed(3))

    assert torch.equal(first, second)


# The Brain's output with masked arms replaced by random values is covered for every
# set of live arms by tests/test_brain_model.py::test_dead_arms_ignored.


def test_exiting_heartbeat_marks_the_arm_dead_at_once():
    liveness = Liveness(4, timeout_s=0.15, miss_limit=3)
    liveness.heartbeat(1, 0.0, pid=10)
    liveness.admit(1, 0.01, "passed")

    changes = liveness.leave(1, 0.02, pid=10)

    assert [(c.old, c.new) for c in changes] == [("live", "dead")]
    assert "process 10 is exiting" in changes[0].reason
    assert liveness.leave(1, 0.03, pid=10) == []


def test_exiting_heartbeat_of_a_replaced_process_is_ignored():
    liveness = Liveness(4, timeout_s=0.15, miss_limit=3)
    liveness.heartbeat(2, 0.0, pid=10)
    liveness.admit(2, 0.01, "passed")
    liveness.heartbeat(2, 0.05, pid=11)  # the restart is seen first

    assert liveness.leave(2, 0.06, pid=10) == []
    assert liveness.status(2) == "probing"
