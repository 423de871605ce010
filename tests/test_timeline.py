"""deploy.timeline on hand-built load and fault records: counts, accuracy, kill effects.

Run: pytest tests/test_timeline.py
"""

from __future__ import annotations

import pytest

from deploy.faults import rejoin_times
from deploy.timeline import format_summary, recovery_of, summarize

ARMS = 4
ALL_ARMS = (0, 1, 2, 3)
WITHOUT_ARM_2 = (0, 1, 3)


def record(
    sent: float,
    answered: float,
    correct: int = 4,
    arm_ids: tuple[int, ...] = ALL_ARMS,
    error: str = "",
    lost: bool = False,
    attempts: int = 1,
    images: int = 4,
) -> dict:
    """One request as deploy/load.py records it (wall-clock seconds)."""
    return {
        "request_id": f"r-{sent}",
        "first_image": 0,
        "images": images,
        "sent": sent,
        "answered": answered,
        "attempts": attempts,
        "arm_ids": [] if error else list(arm_ids),
        "degraded": bool(error) or len(arm_ids) < ARMS,
        "error": error,
        "lost": lost,
        "correct": 0 if error else correct,
        "latency_ms": (answered - sent) * 1000,
    }


KILL = {"kind": "kill", "time": 10.0, "target": "arm-2", "how": "sigkill", "pid": 4242}
RECOVERY = {
    "kind": "recovery",
    "target": "arm-2",
    "kill_time": 10.0,
    "dead": 10.3,
    "probing": 11.5,
    "live": 12.0,
}

# Arm 2 is killed at 10.0 s and live again at 12.0 s.
RECORDS = [
    record(9.0, 9.1),  # before the kill
    record(9.9, 10.05, correct=3),  # last answer with arm 2, 50 ms after the kill
    record(10.2, 10.4, correct=2, arm_ids=WITHOUT_ARM_2),  # first without, 400 ms
    record(10.5, 10.6, correct=3, arm_ids=WITHOUT_ARM_2, attempts=2),
    record(10.7, 10.7, error="no live arm to answer from"),  # refused
    record(10.8, 11.8, error="no answer after 3 attempts", lost=True, attempts=3),
    record(12.1, 12.2),  # after the rejoin
    record(12.5, 12.6, correct=1),
]


def test_counts():
    summary = summarize(RECORDS, [KILL, RECOVERY], ARMS)

    assert summary["requests"] == 8
    assert summary["images"] == 32
    assert summary["answered"] == 6
    assert summary["degraded"] == 2
    assert summary["refused"] == 1
    assert summary["lost"] == 1
    assert summary["retried"] == 2


def test_accuracy():
    summary = summarize(RECORDS, [KILL, RECOVERY], ARMS)

    # Correct images over answered images. Refused and lost requests count in neither.
    assert summary["accuracy"] == pytest.approx((4 + 3 + 2 + 3 + 4 + 1) / 24)
    assert summary["accuracy_all_arms"] == pytest.approx((4 + 3 + 4 + 1) / 16)
    assert summary["accuracy_degraded"] == pytest.approx((2 + 3) / 8)


def test_latency_percentiles():
    summary = summarize(RECORDS, [], ARMS)

    # Answered latencies: 100, 150, 200, 100, 100 and 100 ms.
    assert summary["latency_ms_p50"] == pytest.approx(100.0)
    assert summary["latency_ms_p99"] == pytest.approx(197.5)


def test_kill_effect():
    summary = summarize(RECORDS, [KILL, RECOVERY], ARMS)

    assert len(summary["kills"]) == 1
    kill = summary["kills"][0]
    assert kill["target"] == "arm-2"
    assert kill["how"] == "sigkill"
    assert kill["time"] == 10.0
    assert kill["first_degraded_ms"] == pytest.approx(400.0)
    assert kill["last_included_ms"] == pytest.approx(50.0)
    assert kill["rejoined_s"] == 12.0
    assert kill["kill_to_rejoin_s"] == pytest.approx(2.0)
    assert kill["restart_to_rejoin_s"] == pytest.approx(0.5)


def test_phases():
    summary = summarize(RECORDS, [KILL, RECOVERY], ARMS)

    phases = summary["phases"]
    assert list(phases) == ["before", "faults", "after"]
    assert phases["before"] == {
        "requests": 1,
        "answered": 1,
        "degraded": 0,
        "accuracy": 1.0,
    }
    assert phases["faults"]["requests"] == 5
    assert phases["faults"]["answered"] == 3
    assert phases["faults"]["degraded"] == 2
    assert phases["faults"]["accuracy"] == pytest.approx((3 + 2 + 3) / 12)
    assert phases["after"]["requests"] == 2
    assert phases["after"]["answered"] == 2
    assert phases["after"]["degraded"] == 0
    assert phases["after"]["accuracy"] == pytest.approx((4 + 1) / 8)


def test_kill_without_recovery():
    summary = summarize(RECORDS, [KILL], ARMS)

    kill = summary["kills"][0]
    assert kill["rejoined_s"] is None
    assert kill["kill_to_rejoin_s"] is None
    assert kill["restart_to_rejoin_s"] is None
    # With no rejoin time, every answer after the kill counts.
    assert kill["first_degraded_ms"] == pytest.approx(400.0)
    assert kill["last_included_ms"] == pytest.approx(2600.0)
    # Nothing marks the end of the faults, so no request falls after them.
    assert summary["phases"]["faults"]["requests"] == 7
    assert summary["phases"]["after"]["requests"] == 0
    assert summary["phases"]["after"]["accuracy"] is None


def test_recovery_timed_out():
    # The wait for the rejoin ran out, so wait_rejoin left `live` as None.
    recovery = RECOVERY | {"probing": None, "live": None}

    kill = summarize(RECORDS, [KILL, recovery], ARMS)["kills"][0]

    assert kill["rejoined_s"] is None
    assert kill["kill_to_rejoin_s"] is None
    assert kill["restart_to_rejoin_s"] is None


def test_recovery_without_probing_time():
    # deploy/chaos.py records only when the arm was live again.
    recovery = {"kind": "recovery", "target": "arm-2", "kill_time": 10.0, "live": 12.0}

    kill = summarize(RECORDS, [KILL, recovery], ARMS)["kills"][0]

    assert kill["kill_to_rejoin_s"] == pytest.approx(2.0)
    assert kill["restart_to_rejoin_s"] is None


def test_recovery_matches_target_and_time():
    other_arm = RECOVERY | {"target": "arm-1"}
    other_kill = RECOVERY | {"kill_time": 9.5}

    assert recovery_of([other_arm, other_kill], KILL) is None
    assert recovery_of([other_arm, other_kill, RECOVERY], KILL) is RECOVERY
    kill = summarize(RECORDS, [KILL, other_arm, other_kill], ARMS)["kills"][0]
    assert kill["rejoined_s"] is None


def test_kill_record_without_kind():
    # summarize treats a fault record without `kind` as a kill.
    kill = {key: value for key, value in KILL.items() if key != "kind"}

    summary = summarize(RECORDS, [kill, RECOVERY], ARMS)

    assert len(summary["kills"]) == 1
    assert summary["kills"][0]["rejoined_s"] == 12.0


def test_kills_outside_load_ignored():
    early = KILL | {"time": 5.0}
    late = KILL | {"time": 20.0}

    summary = summarize(RECORDS, [early, late], ARMS)

    assert summary["kills"] == []
    assert "phases" not in summary


def test_brain_kill_has_no_arm_times():
    kill = KILL | {"target": "brain", "how": "ray"}
    recovery = {"kind": "recovery", "target": "brain", "kill_time": 10.0, "live": 11.0}

    effect = summarize(RECORDS, [kill, recovery], ARMS)["kills"][0]

    assert effect["target"] == "brain"
    assert effect["first_degraded_ms"] is None
    assert effect["last_included_ms"] is None
    assert effect["kill_to_rejoin_s"] == pytest.approx(1.0)


def test_two_kills_phases_end_at_last_rejoin():
    second_kill = KILL | {"time": 10.5, "target": "arm-0"}
    second_recovery = RECOVERY | {"target": "arm-0", "kill_time": 10.5, "live": 12.3}

    summary = summarize(RECORDS, [KILL, RECOVERY, second_kill, second_recovery], ARMS)

    assert [kill["target"] for kill in summary["kills"]] == ["arm-2", "arm-0"]
    # Faults run from the first kill (10.0 s) to the last rejoin (12.3 s).
    assert summary["phases"]["before"]["requests"] == 1
    assert summary["phases"]["faults"]["requests"] == 6
    assert summary["phases"]["after"]["requests"] == 1
    # These records never leave out arm 0, so its last answer before the rejoin at
    # 12.3 s is the one at 12.2 s, 1.7 s after its kill.
    arm_0 = summary["kills"][1]
    assert arm_0["first_degraded_ms"] is None
    assert arm_0["last_included_ms"] == pytest.approx(1700.0)


def test_only_errors():
    records = [
        record(1.0, 1.0, error="no live arm to answer from"),
        record(1.0, 3.0, error="no answer after 2 attempts", lost=True, attempts=2),
    ]

    summary = summarize(records, [], ARMS)

    assert summary["answered"] == 0
    assert summary["refused"] == 1
    assert summary["lost"] == 1
    assert summary["accuracy"] is None
    assert summary["latency_ms_p50"] is None
    assert summary["latency_ms_p99"] is None


def test_empty_input():
    summary = summarize([], [KILL, RECOVERY], ARMS)

    assert summary["requests"] == 0
    assert summary["images"] == 0
    assert summary["answered"] == 0
    assert summary["retried"] == 0
    assert summary["accuracy"] is None
    assert summary["accuracy_all_arms"] is None
    assert summary["accuracy_degraded"] is None
    assert summary["latency_ms_p50"] is None
    assert summary["kills"] == []
    assert "phases" not in summary


def test_format_summary():
    text = format_summary(summarize(RECORDS, [KILL, RECOVERY], ARMS))

    lines = text.splitlines()
    assert lines[0] == (
        "requests 8 (32 images): answered 6, degraded 2, refused 1, lost 1, retried 2"
    )
    assert lines[1] == (
        "accuracy 70.83% (all arms 75.00%, degraded 62.50%); latency p50 100 ms, "
        "p99 198 ms"
    )
    assert lines[2].split() == "before 1 answered, 0 degraded, accuracy 100.00%".split()
    assert lines[3].split() == "faults 3 answered, 2 degraded, accuracy 66.67%".split()
    assert lines[4].split() == "after 2 answered, 0 degraded, accuracy 62.50%".split()
    assert lines[5] == (
        "  kill arm-2 (sigkill): first answer without it after 400 ms, last with it "
        "50 ms; restart to rejoin 0.5 s, kill to rejoin 2.0 s"
    )
    assert len(lines) == 6


def test_format_summary_empty():
    text = format_summary(summarize([], [], ARMS))

    assert text.splitlines() == [
        "requests 0 (0 images): answered 0, degraded 0, refused 0, lost 0, retried 0",
        "accuracy - (all arms -, degraded -); latency p50 -, p99 -",
    ]


def test_format_summary_missing_times():
    text = format_summary(summarize(RECORDS, [KILL], ARMS))

    kill_line = text.splitlines()[-1]
    assert "last with it 2600 ms" in kill_line
    assert "restart to rejoin -, kill to rejoin -" in kill_line
    assert "after       0 answered" in text
    assert "accuracy -" in text.splitlines()[-2]


def change(arm_id: int, new: str, time_s: float) -> dict:
    return {"arm_id": arm_id, "old": "", "new": new, "reason": "", "time": time_s}


def test_rejoin_times_in_order_after_the_kill():
    changes = [
        change(1, "live", 99.0),  # before the kill: ignored
        change(1, "dead", 100.2),
        change(2, "dead", 100.3),  # another arm: ignored
        change(1, "probing", 103.0),
        change(1, "dead", 103.1),  # the probe failed
        change(1, "probing", 104.5),
        change(1, "live", 104.6),
    ]

    times = rejoin_times(changes, arm_id=1, killed_s=100.0)

    assert times == {"dead": 100.2, "probing": 104.5, "live": 104.6}


def test_rejoin_times_without_a_death():
    changes = [change(1, "live", 100.5)]

    assert rejoin_times(changes, arm_id=1, killed_s=100.0) == {
        "dead": None,
        "probing": None,
        "live": None,
    }
