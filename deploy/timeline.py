"""Summaries of a load run with kills: what was answered, degraded or lost, and when.

Pure functions over the records of deploy/load.py (one per request, wall-clock
times in seconds) and the records of deploy/faults.py (kills and recoveries).
"""

from __future__ import annotations

import numpy as np


def _accuracy(records: list[dict]) -> float | None:
    images = sum(r["images"] for r in records)
    return sum(r["correct"] for r in records) / images if images else None


def _phase(records: list[dict]) -> dict:
    answered = [r for r in records if not r["error"]]
    return {
        "requests": len(records),
        "answered": len(answered),
        "degraded": sum(r["degraded"] for r in answered),
        "accuracy": _accuracy(answered),
    }


def recovery_of(faults: list[dict], kill: dict) -> dict | None:
    for record in faults:
        if (
            record.get("kind") == "recovery"
            and record["target"] == kill["target"]
            and abs(record["kill_time"] - kill["time"]) < 1e-6
        ):
            return record
    return None


def summarize(records: list[dict], faults: list[dict], arms: int) -> dict:
    """Return counts, accuracy per phase, and for each kill how fast answers changed."""
    answered = [r for r in records if not r["error"]]
    refused = [r for r in records if r["error"] and not r["lost"]]
    lost = [r for r in records if r["lost"]]
    latencies = np.array([(r["answered"] - r["sent"]) * 1000 for r in answered])
    summary = {
        "requests": len(records),
        "images": sum(r["images"] for r in records),
        "answered": len(answered),
        "degraded": sum(r["degraded"] for r in answered),
        "refused": len(refused),
        "lost": len(lost),
        "retried": sum(r["attempts"] > 1 for r in records),
        "accuracy": _accuracy(answered),
        "accuracy_all_arms": _accuracy([r for r in answered if not r["degraded"]]),
        "accuracy_degraded": _accuracy([r for r in answered if r["degraded"]]),
        "latency_ms_p50": float(np.percentile(latencies, 50))
        if len(latencies)
        else None,
        "latency_ms_p99": float(np.percentile(latencies, 99))
        if len(latencies)
        else None,
        "kills": [],
    }
    if not records:
        return summary
    start = min(r["sent"] for r in records)
    end = max(r["answered"] for r in records)
    kills = [
        f
        for f in faults
        if f.get("kind", "kill") == "kill" and start <= f["time"] <= end
    ]
    for kill in kills:
        summary["kills"].append(_kill_effect(kill, recovery_of(faults, kill), answered))

    if kills:
        first_kill = min(k["time"] for k in kills)
        rejoins = [k["rejoined_s"] for k in summary["kills"] if k["rejoined_s"]]
        back = max(rejoins) if len(rejoins) == len(kills) else None
        summary["phases"] = {
            "before": _phase([r for r in records if r["answered"] < first_kill]),
            "faults": _phase(
                [
                    r
                    for r in records
                    if r["answered"] >= first_kill
                    and (back is None or r["sent"] < back)
                ]
            ),
            "after": _phase([r for r in records if back and r["sent"] >= back]),
        }
    return summary


def _kill_effect(kill: dict, recovery: dict | None, answered: list[dict]) -> dict:
    """For one kill: first answer without the target, last with it, rejoin times."""
    target, killed = kill["target"], kill["time"]
    effect = {
        "target": target,
        "how": kill["how"],
        "time": killed,
        "first_degraded_ms": None,
        "last_included_ms": None,
        "restart_to_rejoin_s": None,
        "kill_to_rejoin_s": None,
        "rejoined_s": None,
    }
    rejoined = recovery.get("live") if recovery else None
    effect["rejoined_s"] = rejoined
    if recovery and rejoined:
        effect["kill_to_rejoin_s"] = rejoined - killed
        if recovery.get("probing"):
            effect["restart_to_rejoin_s"] = rejoined - recovery["probing"]
    if not target.startswith("arm-"):
        return effect
    arm_id = int(target.split("-")[1])
    until = rejoined or float("inf")
    after = [r for r in answered if killed < r["answered"] < until]
    without = [r["answered"] - killed for r in after if arm_id not in r["arm_ids"]]
    with_arm = [r["answered"] - killed for r in after if arm_id in r["arm_ids"]]
    if without:
        effect["first_degraded_ms"] = min(without) * 1000
    if with_arm:
        effect["last_included_ms"] = max(with_arm) * 1000
    return effect


def format_summary(summary: dict) -> str:
    """Format the summary as a few human-readable lines."""

    def pct(value):
        return "-" if value is None else f"{value * 100:.2f}%"

    def ms(value):
        return "-" if value is None else f"{value:.0f} ms"

    def sec(value):
        return "-" if value is None else f"{value:.1f} s"

    lines = [
        f"requests {summary['requests']} ({summary['images']} images): answered "
        f"{summary['answered']}, degraded {summary['degraded']}, refused "
        f"{summary['refused']}, lost {summary['lost']}, retried {summary['retried']}",
        f"accuracy {pct(summary['accuracy'])} (all arms {pct(summary['accuracy_all_arms'])}"
        f", degraded {pct(summary['accuracy_degraded'])}); latency p50 "
        f"{ms(summary['latency_ms_p50'])}, p99 {ms(summary['latency_ms_p99'])}",
    ]
    for name, phase in summary.get("phases", {}).items():
        lines.append(
            f"  {name:7s} {phase['answered']:5d} answered, {phase['degraded']:5d} "
            f"degraded, accuracy {pct(phase['accuracy'])}"
        )
    for kill in summary["kills"]:
        lines.append(
            f"  kill {kill['target']} ({kill['how']}): first answer without it after "
            f"{ms(kill['first_degraded_ms'])}, last with it {ms(kill['last_included_ms'])}"
            f"; restart to rejoin {sec(kill['restart_to_rejoin_s'])}, kill to rejoin "
            f"{sec(kill['kill_to_rejoin_s'])}"
        )
    return "\n".join(lines)
