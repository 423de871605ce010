"""Logging set-up shared by the launcher and the actors."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at `level`; safe to call more than once.

    A run's `run.log` is added and removed by `deploy.training.run_log`.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        if getattr(handler, "_octopusnet", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler._octopusnet = True  # type: ignore[attr-defined]
    root.addHandler(handler)
