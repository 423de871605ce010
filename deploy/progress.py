"""Progress bars in the launcher's terminal, one per arm and one for the brain.

A background thread polls each actor's `progress()` (the actors are threaded, so
they reply while they train) and moves a tqdm bar per actor. Without a terminal,
or with `--quiet`, no bars are drawn and the actors' own log lines remain.
"""

from __future__ import annotations

import logging
import threading

import ray
from tqdm import tqdm

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class ProgressBoard:
    """Draw a bar per actor while the context is open; do nothing when disabled."""

    def __init__(self, actors: dict[str, object], enabled: bool):
        self.actors = actors
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> ProgressBoard:
        if self.enabled:
            for position, name in enumerate(self.actors):
                self.bars[name] = tqdm(
                    total=1,
                    desc=f"{name:>7}",
                    position=position,
                    leave=True,
                    unit="batch",
                    dynamic_ncols=True,
                )
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        for bar in self.bars.values():
            bar.close()

    def _poll(self) -> None:
        while not self.stop_event.wait(POLL_INTERVAL_S):
            self._poll_once()
        self._poll_once()  # the final state, so finished bars do not stop short

    def _poll_once(self) -> None:
        names = list(self.actors)
        refs = [self.actors[name].progress.remote() for name in names]
        try:
            reports = ray.get(refs, timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as err:
            log.debug("progress poll failed: %s", err)
            return
        for name, report in zip(names, reports, strict=True):
            self._update(self.bars[name], report)

    @staticmethod
    def _update(bar: tqdm, report: dict) -> None:
        phase = f"epoch {report['epoch']} {report['phase']}"
        if bar.desc.split(": ")[-1] != phase or bar.total != max(1, report["total"]):
            bar.reset(total=max(1, report["total"]))
            bar.set_description_str(f"{bar.desc.split(':')[0]}: {phase}")
        bar.n = report["step"]
        postfix = {k: f"{v:.3f}" for k, v in report.get("metrics", {}).items()}
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()
