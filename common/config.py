"""Run configuration: one frozen dataclass that checks every value on creation.

The launcher builds it from the command line; actors receive it as a plain dict
(`to_dict`) and rebuild it with `from_dict`, which rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist")
ARM_TYPES = ("grouped", "overlay", "residual", "transformer", "lstm", "heterogeneous")
COMPRESSIONS = ("pool", "stride")
# The original's heterogeneous set: arm i of a heterogeneous run is entry i % 4.
HETEROGENEOUS_KINDS = ("grouped", "grouped", "transformer", "lstm")
COMPETITIONS = ("soft", "topk", "gumbel")
# attention: nerve ring + coordinator + MLP over the arms' features and logits.
# logit: learned softmax weights over the arms' local-classifier logits (fully local
# SFF mode). ensemble: the plain average of those logits.
BRAIN_MODES = ("attention", "logit", "ensemble")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")

# Resolution of each arm, largest first. Arm i of N takes entry i % 4.


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and the allowed range."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"invalid {name} {value!r}: choose one of {', '.join(choices)}"
        )


def _check_range(
    name: str, value: float, low: float, high: float | None = None
) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"invalid {name} {value!r}: it must be a finite number")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"invalid {name} {value!r}: it must be {bound}")


def _check_types(config) -> None:
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), type(f.default)
        # JSON has one number type, so whole numbers may stand for float fields.
        allowed = (int, float) if kind is float else (kind,)
        if not isinstance(value, allowed) or (
            kind is not bool and isinstance(value, bool)
        ):
            raise ConfigError(
                f"invalid config value {f.name}={value!r}: expected {kind.__name__}"
            )


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved to `config.json` in the run directory."""

    # Data.
    dataset: str = "cifar10"
    data_dir: str = "data"
    val_size: int = 5000
    train_limit: int = 0  # 0 uses the whole training split
    test_limit: int = 0  # 0 uses the whole test split
    download: bool = False

    # Arms.
    arms: int = 4
    arm_type: str = "grouped"
    multiscale: bool = True
    # Each arm's downscale factor, cycling over the arms: "1,1,2,2" gives 32, 32, 16
    # and 16 px on CIFAR. Two arms per resolution, so no single loss leaves a scale
    # unseen; the original's "1,2,4,8" (32/16/8/4 px) lost 8 points with its 32-px arm.
    arm_scales: str = "1,1,2,2"
    width: int = 48  # channels of the first block; later blocks double it
    depth: int = 0  # blocks per arm; 0 picks by resolution (4 at 32 px, fewer below)
    bottleneck: int = 64
    # Halving between blocks: "pool" (2x2 max-pool) or "stride" (a learned grouped
    # stride-2 conv, trained by the block's own loss).
    compress: str = "pool"
    residual_blocks: int = 1  # residual arms: same-width layers after each halving
    goodness_layers: int = 1  # grouped/residual arms predict from this many last layers
    lr: float = 2e-3
    weight_decay: float = 5e-4
    goodness_scale: float = 15.0
    threshold: float = 2.0
    label_strength: float = 0.5
    augment: bool = True

    # Brain.
    brain_mode: str = "attention"
    competition: str = "soft"
    top_k: int = 2
    gumbel_tau: float = 0.5
    nerve_ring: bool = True
    heads: int = 4
    brain_lr: float = 1e-3
    brain_passes: int = 3
    dropout: float = 0.1
    # Module dropout: the share of training samples the brain sees with a random
    # 1 to N-1 of the arms masked, so it learns to answer from any subset of arms.
    arm_dropout: float = 0.5
    # Two passes per image: the brain's class probabilities for an image scale the
    # arms' last outputs for that same image, and a second brain classifies them.
    feedback: bool = False

    # Run.
    epochs: int = 1
    batch_size: int = 128
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    gpus: float = 0.0
    cpus: float = 0.0  # 0 uses every CPU Ray reports
    output_dir: str = "runs"
    run_name: str = ""
    address: str = ""  # empty starts a local Ray cluster on 127.0.0.1
    brain_host: str = "127.0.0.1"
    brain_port: int = 0  # 0 lets the OS pick a free port
    dashboard_port: int = 0  # 0: Ray's usual 8265, or any free port when that is taken
    stream_timeout_s: float = 600.0
    actor_restarts: int = 5  # times Ray restarts a killed arm (and, serving, the brain)

    # Inference service.
    deadline_s: float = 0.25  # the brain answers from the arms that replied by then
    heartbeat_interval_s: float = 0.03
    heartbeat_timeout_s: float = 0.15  # an arm silent this long is dead
    miss_limit: int = 3  # deadlines missed in a row that make a live arm dead
    git_revision: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("arm type", self.arm_type, ARM_TYPES)
        _check_choice("competition", self.competition, COMPETITIONS)
        _check_choice("compression", self.compress, COMPRESSIONS)
        _check_choice("brain mode", self.brain_mode, BRAIN_MODES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_range("number of arms (--arms)", self.arms, 1, 64)
        _check_range("epochs", self.epochs, 1)
        _check_range("batch size", self.batch_size, 2, 65536)
        _check_range("bottleneck", self.bottleneck, 1, 4096)
        _check_range("width", self.width, 1, 4096)
        _check_range("depth", self.depth, 0, 8)
        _check_range("residual blocks", self.residual_blocks, 0, 8)
        _check_range("goodness layers", self.goodness_layers, 1, 64)
        _check_range("validation size", self.val_size, 0)
        _check_range("train limit", self.train_limit, 0)
        _check_range("test limit", self.test_limit, 0)
        _check_range("learning rate", self.lr, 1e-8, 10.0)
        _check_range("brain learning rate", self.brain_lr, 1e-8, 10.0)
        _check_range("weight decay", self.weight_decay, 0.0, 1.0)
        _check_range("goodness scale", self.goodness_scale, 1e-3, 1e3)
        _check_range("label strength", self.label_strength, 0.0, 1.0)
        _check_range("threshold", self.threshold, 0.0, 1e3)
        _check_range("gumbel tau", self.gumbel_tau, 1e-3, 100.0)
        _check_range("heads", self.heads, 1, 64)
        _check_range("brain passes", self.brain_passes, 1, 100)
        _check_range("dropout", self.dropout, 0.0, 0.99)
        _check_range("arm dropout", self.arm_dropout, 0.0, 1.0)
        parts = self.arm_scales.split(",")
        if not all(p.isascii() and p.isdigit() and 1 <= int(p) <= 64 for p in parts):
            raise ConfigError(
                f"invalid arm scales {self.arm_scales!r}: give each arm's downscale "
                "factor as whole numbers from 1 to 64 separated by commas, e.g. 1,1,2,2"
            )
        _check_range("actor restarts", self.actor_restarts, 0, 1000)
        _check_range("deadline", self.deadline_s, 0.001, 600.0)
        _check_range("heartbeat interval", self.heartbeat_interval_s, 0.001, 60.0)
        _check_range("heartbeat timeout", self.heartbeat_timeout_s, 0.002, 600.0)
        _check_range("miss limit", self.miss_limit, 1, 1000)
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"heartbeat timeout {self.heartbeat_timeout_s} s must exceed the "
                f"heartbeat interval {self.heartbeat_interval_s} s, or every arm "
                "looks dead between two heartbeats"
            )
        _check_range("gpus", self.gpus, 0.0, 1024.0)
        _check_range("cpus", self.cpus, 0.0, 4096.0)
        if 0 < self.cpus < 1 or self.cpus != int(self.cpus):
            raise ConfigError(
                f"invalid cpus {self.cpus!r}: a local Ray cluster takes a whole number "
                "of CPUs (0 uses all of them)"
            )
        _check_range("brain port", self.brain_port, 0, 65535)
        _check_range("dashboard port", self.dashboard_port, 0, 65535)
        _check_range("stream timeout", self.stream_timeout_s, 1.0)
        if self.competition == "topk" and not 1 <= self.top_k <= self.arms:
            raise ConfigError(
                f"invalid top-k {self.top_k}: it must be between 1 and the number "
                f"of arms ({self.arms})"
            )
        if self.nerve_ring and self.bottleneck % self.heads:
            raise ConfigError(
                f"bottleneck {self.bottleneck} is not divisible by the {self.heads} "
                "attention heads of the nerve ring: pick a bottleneck that is a "
                "multiple of them"
            )
        if self.brain_host not in ("127.0.0.1", "localhost") and not self.address:
            raise ConfigError(
                f"brain host {self.brain_host!r} exposes the brain's socket beyond this "
                "machine: it is allowed only with --address (a multi-node cluster)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """Build a config from a dict, such as a run's config.json, checking every type."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"a config must be a JSON object of options, got {type(values).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config keys {unknown}: the known keys are {sorted(known)}"
            )
        return cls(**values)

    def scales(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.arm_scales.split(","))

    def arm_kind(self, arm_id: int) -> str:
        """Arm type of arm `arm_id`: `arm_type`, resolved per arm when heterogeneous."""
        if self.arm_type == "heterogeneous":
            return HETEROGENEOUS_KINDS[arm_id % len(HETEROGENEOUS_KINDS)]
        return self.arm_type

    def arm_resolution(self, arm_id: int, image_size: int) -> int:
        """Input side length of arm `arm_id` (all arms see full size without multiscale)."""
        if not self.multiscale:
            return image_size
        scales = self.scales()
        return max(4, image_size // scales[arm_id % len(scales)])
