"""Custom Ray metrics of the arms and the brain, shown on the Ray dashboard.

Ray exports them in Prometheus format from each node's metrics agent, with the
`octopusnet_` prefix used here and an `arm_id` label on every arm metric.
"""

from __future__ import annotations

from ray.util import metrics

ARM_TAGS = ("arm_id",)
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class ArmTelemetry:
    """Gauges of one arm's local training, and a counter of its restarts."""

    def __init__(self, arm_id: int):
        self.tags = {"arm_id": str(arm_id)}
        self.gauges = {
            name: metrics.Gauge(
                f"octopusnet_arm_{name}", description=text, tag_keys=ARM_TAGS
            )
            for name, text in {
                "ff_loss": "Mean local FF loss of the latest logging interval",
                "goodness_pos": "Mean goodness of positives (true class)",
                "goodness_neg": "Mean goodness of negatives (other classes)",
                "images_per_s": "Local training throughput in images per second",
                "epoch": "Epoch the arm is in",
            }.items()
        }
        self.restarts = metrics.Counter(
            "octopusnet_arm_restarts",
            description="Times the arm actor was restarted by Ray",
            tag_keys=ARM_TAGS,
        )

    def record(self, values: dict[str, float]) -> None:
        for name, gauge in self.gauges.items():
            if name in values:
                gauge.set(float(values[name]), tags=self.tags)

    def restarted(self) -> None:
        self.restarts.inc(1.0, tags=self.tags)


class BrainTelemetry:
    """Counters of the batches and requests the brain processes, their latency,
    degraded ones, live arms and restarts. Requests have the split `request`.
    """

    def __init__(self):
        self.batches = metrics.Counter(
            "octopusnet_brain_batches",
            description="Batches the brain processed (trained on or scored)",
            tag_keys=("split",),
        )
        self.latency = metrics.Histogram(
            "octopusnet_brain_batch_latency_ms",
            description="Time from a batch's first arm output until the brain has processed it, in ms",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("split",),
        )
        self.degraded = metrics.Counter(
            "octopusnet_brain_degraded_batches",
            description="Batches processed without every arm",
            tag_keys=("split",),
        )
        self.live_arms = metrics.Gauge(
            "octopusnet_brain_live_arms",
            description="Arms whose outputs the brain receives",
        )
        self.restarts = metrics.Counter(
            "octopusnet_brain_restarts",
            description="Times the brain's process was restarted",
        )

    def answered(self, split: str, latency_ms: float, degraded: bool) -> None:
        tags = {"split": split}
        self.batches.inc(1.0, tags=tags)
        self.latency.observe(latency_ms, tags=tags)
        if degraded:
            self.degraded.inc(1.0, tags=tags)
