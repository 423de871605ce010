"""Backprop baselines for the resilience comparison, as pure PyTorch modules.

`PlainCNN` fails by zeroing the output of one or more of its blocks. `MultiscaleNet`
has OctopusNet's multiscale layout (one branch per arm resolution), and fails by
masking branches out of its fusion. Trained and scored by `python -m deploy.baselines`.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from arms.augment import normalize, resize
from arms.model import ConvBlock, block_widths, build_arm, default_depth
from common.config import RunConfig
from common.datasets import DatasetInfo

PLAIN_BLOCKS = 4

Failure = tuple[int, ...]  # ids of the failed blocks or branches


def failure_cases(units: int, keep_one: bool) -> list[Failure]:
    """Return every single and every pair of failed units, singles first.

    With `keep_one`, cases that fail every unit are left out.
    """
    cases = [
        *itertools.combinations(range(units), 1),
        *itertools.combinations(range(units), 2),
    ]
    return [failed for failed in cases if not keep_one or len(failed) < units]


def case_name(failed: Failure) -> str:
    """Return the results key of a failure case, such as "0+2"."""
    return "+".join(str(unit) for unit in failed)


class PlainCNN(nn.Module):
    """Four conv-BN-ReLU-max-pool blocks, global average pooling and a linear head."""

    failure_unit = "block"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        self.mean = mean
        self.std = std

        channels = [in_channels, *block_widths(width, PLAIN_BLOCKS)]
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, batch_norm=True)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(
        self, images: torch.Tensor, zeroed: Collection[int] = ()
    ) -> torch.Tensor:
        """Return logits (B, C) for images (B, C_in, H, W) in [0, 1].

        The output of every block in `zeroed` is replaced by zeros, for the whole batch.
        """
        unknown = set(zeroed) - set(range(len(self.blocks)))
        if unknown:
            raise ValueError(
                f"invalid zeroed blocks {sorted(unknown)}: block ids run from 0 to "
                f"{len(self.blocks) - 1}"
            )
        h = normalize(images, self.mean, self.std)
        for block_id, block in enumerate(self.blocks):
            h = block(h)
            if block_id in zeroed:
                h = torch.zeros_like(h)
        return self.head(h.mean(dim=(2, 3)))

    def failure_cases(self) -> list[Failure]:
        return failure_cases(len(self.blocks), keep_one=False)

    def logits_with_failures(
        self, images: torch.Tensor, cases: list[Failure]
    ) -> dict[Failure, torch.Tensor]:
        """Return the logits with each case's blocks zeroed (`()`: the normal case)."""
        return {failed: self(images, zeroed=failed) for failed in cases}


class Branch(nn.Module):
    """Conv blocks at one resolution, then 2x2 pooling, linear and LayerNorm to D dims.

    It ends like an arm's bottleneck, so the fused vectors have the arm features' scale.
    """

    def __init__(self, in_channels: int, widths: list[int], dim: int):
        super().__init__()
        channels = [in_channels, *widths]
        self.blocks = nn.Sequential(
            *(
                ConvBlock(c_in, c_out, batch_norm=True)
                for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
            )
        )
        self.projection = nn.Linear(widths[-1] * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.blocks(x), 2).flatten(1)
        return F.layer_norm(self.projection(pooled), (self.projection.out_features,))


class MultiscaleNet(nn.Module):
    """One CNN branch per resolution, fused by the mean of the live branches' vectors.

    Shapes: B batch, N branches, D vector size, C classes. `live` (B, N) or (N,) is
    True where a branch takes part. Masked branches are left out of the mean, not
    fed in as zeros, so they have no influence on the logits. In training mode and
    without a `live` mask, `forward` applies module dropout (`sample_live`) with
    probability `module_dropout`, as `nn.Dropout` drops activations.
    """

    failure_unit = "branch"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolutions: list[int],
        branch_widths: list[list[int]],
        dim: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        module_dropout: float = 0.5,
    ):
        super().__init__()
        if not 0.0 <= module_dropout <= 1.0:
            raise ValueError(
                f"invalid module dropout {module_dropout!r}: it must be between 0 and 1"
            )
        self.module_dropout = module_dropout
        self.resolutions = list(resolutions)
        self.mean = mean
        self.std = std

        self.branches = nn.ModuleList(
            Branch(in_channels, widths, dim) for widths in branch_widths
        )
        self.classifier = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes)
        )

    def branch_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalise images (B, C_in, H, W) in [0, 1] and resize them per branch."""
        x = normalize(images, self.mean, self.std)
        return [resize(x, r) for r in self.resolutions]

    def encode(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Return every branch's vector, (B, N, D)."""
        return torch.stack(
            [branch(x) for branch, x in zip(self.branches, inputs, strict=True)], dim=1
        )

    def fuse(self, features: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        """Return logits (B, C) from the mean of the live vectors in (B, N, D)."""
        if live is None:
            return self.classifier(features.mean(dim=1))
        live = live.to(features.device).expand(features.shape[:2])
        empty = int((~live.any(dim=1)).sum())
        if empty:
            raise ValueError(
                f"invalid live mask: {empty} samples have no live branch, but every "
                "sample needs at least one"
            )
        # torch.where, not a product: a masked branch's NaN or inf must not leak in.
        kept = torch.where(live.unsqueeze(-1), features, torch.zeros_like(features))
        count = live.sum(dim=1, keepdim=True).to(features.dtype)
        return self.classifier(kept.sum(dim=1) / count)

    def forward(
        self, images: torch.Tensor, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        if live is None and self.training and self.module_dropout > 0:
            live = sample_live(
                len(images), len(self.branches), self.module_dropout, images.device
            )
        return self.fuse(self.encode(self.branch_inputs(images)), live)

    def failure_cases(self) -> list[Failure]:
        # With no live branch there is nothing to fuse, so every case keeps one.
        return failure_cases(len(self.branches), keep_one=True)

    def logits_with_failures(
        self, images: torch.Tensor, cases: list[Failure]
    ) -> dict[Failure, torch.Tensor]:
        """Return the logits with each case's branches masked (`()`: the normal case).

        Each branch's vector is computed once and fused once per case, because
        masking a branch leaves the other vectors unchanged.
        """
        features = self.encode(self.branch_inputs(images))
        logits = {}
        for failed in cases:
            live = torch.ones(
                len(self.branches), dtype=torch.bool, device=images.device
            )
            live[list(failed)] = False
            logits[failed] = self.fuse(features, live)
        return logits


def sample_live(
    batch: int,
    branches: int,
    p: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the module-dropout mask (B, N): True where a branch stays live.

    Each sample, with probability `p`, loses k branches, k uniform in 1..N-1 and the
    branches chosen uniformly, so at least one branch always stays live. Without a
    `generator`, torch's global generator for `device` is used.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"invalid module dropout {p!r}: it must be between 0 and 1")
    if branches < 2:
        return torch.ones(batch, branches, dtype=torch.bool, device=device)
    options = {"device": device, "generator": generator}
    dropped = torch.rand(batch, **options) < p
    removed = torch.randint(1, branches, (batch, 1), **options)
    # The rank of each branch in a random order per sample. The lowest k are removed.
    ranks = torch.rand(batch, branches, **options).argsort(1).argsort(1)
    return ~((ranks < removed) & dropped.unsqueeze(1))


def arm_parameters(config: RunConfig, info: DatasetInfo) -> int:
    """Count the parameters of all the arms of an OctopusNet run with this config."""
    return sum(
        p.numel()
        for arm_id in range(config.arms)
        for p in build_arm(config, arm_id, info).parameters()
    )


def plain_width(target: int, info: DatasetInfo) -> int:
    """Return the first-block width whose `PlainCNN` size is closest to `target`."""

    def count(width: int) -> int:
        # The meta device allocates no memory, so trying many widths is cheap.
        with torch.device("meta"):
            model = PlainCNN(info.channels, info.num_classes, width, (0.0,), (1.0,))
        return sum(p.numel() for p in model.parameters())

    width = 1
    while count(width + 1) < target and width < 1024:
        width += 1
    # Parameters grow with width, so the closest width is `width` or `width + 1`.
    return min((width, width + 1), key=lambda w: abs(count(w) - target))


def build_plain_cnn(config: RunConfig, info: DatasetInfo) -> PlainCNN:
    """Build a `PlainCNN` with about as many parameters as all the run's arms."""
    width = plain_width(arm_parameters(config, info), info)
    return PlainCNN(info.channels, info.num_classes, width, info.mean, info.std)


def build_multiscale_net(
    config: RunConfig, info: DatasetInfo, module_dropout: float = 0.5
) -> MultiscaleNet:
    """Build a `MultiscaleNet` with the resolutions and widths of the run's arms.

    Widths are rounded as `arms.model.build_arm` rounds them, and the vector size is
    the arms' bottleneck.
    """
    resolutions = [
        config.arm_resolution(arm_id, info.image_size) for arm_id in range(config.arms)
    ]
    groups = 1 if config.arm_type == "overlay" else info.num_classes
    branch_widths = [
        block_widths(config.width, config.depth or default_depth(r), groups)
        for r in resolutions
    ]
    return MultiscaleNet(
        info.channels,
        info.num_classes,
        resolutions,
        branch_widths,
        config.bottleneck,
        info.mean,
        info.std,
        module_dropout,
    )
