"""Argument types for the deploy scripts: numbers that must be finite and in range.

argparse turns the ValueError raised here into a usage error (exit status 2) that
names the option and the value.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def script_parser(doc: str) -> argparse.ArgumentParser:
    """Create a parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the served run and the request stream's rate, size and images."""
    parser.add_argument("run_dir", type=Path, help="a run served by deploy.serve")
    parser.add_argument(
        "--rate", type=positive_float, default=20.0, help="requests per second"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per request"
    )
    parser.add_argument("--data-dir", default="", help="default: the run's")
