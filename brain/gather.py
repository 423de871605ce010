"""Gather the arms' outputs for one stream by batch id. Pure bookkeeping, no sockets."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class GatherError(ValueError):
    """Arm outputs that cannot belong together (wrong arm, stream or indices)."""


@dataclass
class Batch:
    """Outputs of all expected arms for one batch; arrays are stacked in arm order."""

    batch_id: int
    indices: np.ndarray  # (B,) dataset indices
    features: np.ndarray  # (B, N, D)
    logits: np.ndarray  # (B, N, C)
    first_arrival_s: float = 0.0  # time.monotonic() when the first arm's output arrived


@dataclass
class BatchGatherer:
    """Collects `arm_output` messages until every expected arm has sent a batch."""

    stream_id: str
    arm_ids: tuple[int, ...]
    pending: dict[int, dict[int, dict]] = field(default_factory=dict)
    first_arrival_s: dict[int, float] = field(default_factory=dict)
    finished_arms: dict[int, int] = field(default_factory=dict)  # arm_id -> batch count

    def add(self, message: dict) -> Batch | None:
        """Store one arm output; return the batch once all arms have sent it."""
        arm_id = message["arm_id"]
        if arm_id not in self.arm_ids:
            raise GatherError(
                f"output from unknown arm {arm_id}; expected arms {self.arm_ids}"
            )
        if message["stream_id"] != self.stream_id:
            raise GatherError(
                f"arm {arm_id} sent stream {message['stream_id']!r} while gathering "
                f"{self.stream_id!r}"
            )
        slots = self.pending.setdefault(message["batch_id"], {})
        self.first_arrival_s.setdefault(message["batch_id"], time.monotonic())
        if arm_id in slots:
            raise GatherError(f"arm {arm_id} sent batch {message['batch_id']} twice")
        slots[arm_id] = message
        if len(slots) < len(self.arm_ids):
            return None
        del self.pending[message["batch_id"]]
        batch = self._stack(message["batch_id"], slots)
        batch.first_arrival_s = self.first_arrival_s.pop(message["batch_id"])
        return batch

    def finish(self, arm_id: int, batches: int) -> None:
        """Record an arm's end of stream with the number of batches it sent."""
        if arm_id not in self.arm_ids:
            raise GatherError(f"end of stream from unknown arm {arm_id}")
        self.finished_arms[arm_id] = batches

    @property
    def done(self) -> bool:
        """True once every arm has ended its stream."""
        return len(self.finished_arms) == len(self.arm_ids)

    def check_complete(self, gathered: int) -> None:
        """Raise unless every arm ended its stream and all its batches arrived."""
        announced = set(self.finished_arms.values())
        if self.pending or not self.done or announced != {gathered}:
            incomplete = {
                b: sorted(slots) for b, slots in sorted(self.pending.items())[:5]
            }
            raise GatherError(
                f"stream {self.stream_id!r} is incomplete: arms announced "
                f"{self.finished_arms} batches, {gathered} were gathered from all arms; "
                f"batches with missing arms (batch: arms present) {incomplete}"
            )

    def _stack(self, batch_id: int, slots: dict[int, dict]) -> Batch:
        first = slots[self.arm_ids[0]]
        for arm_id in self.arm_ids[1:]:
            other = slots[arm_id]
            if not np.array_equal(other["indices"], first["indices"]):
                raise GatherError(
                    f"batch {batch_id}: arm {arm_id} sent other images than arm "
                    f"{self.arm_ids[0]}; the arms disagree on the batch order"
                )
            for name in ("features", "logits"):
                if other[name].shape != first[name].shape:
                    raise GatherError(
                        f"batch {batch_id}: arm {arm_id} {name} shape {other[name].shape} "
                        f"differs from arm {self.arm_ids[0]}'s {first[name].shape}"
                    )
        features = np.stack([slots[a]["features"] for a in self.arm_ids], axis=1)
        logits = np.stack([slots[a]["logits"] for a in self.arm_ids], axis=1)
        return Batch(batch_id, first["indices"], features, logits)
