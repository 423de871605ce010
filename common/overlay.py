"""Fourier label overlay: one full-image sinusoid per class, blended into the image.

Up to 12 classes use the original family: orientation 0/45/90/135 degrees by
`c % 4` and 1, 2 or 3 cycles across the image by `c // 4`. Larger label sets use
more orientations and frequencies (`orientations = ceil(sqrt(C))`, 1 to
`ceil(C / orientations)` cycles), so every class keeps a distinct pattern.
"""

from __future__ import annotations

import math

import torch


def class_patterns(num_classes: int, size: int) -> torch.Tensor:
    """Return (C, size, size) patterns, each min-max scaled to [0, 1]."""
    if num_classes < 2:
        raise ValueError(f"invalid number of classes {num_classes}: need at least 2")
    if num_classes <= 12:
        orientations, cycles = 4, 3
    else:
        orientations = math.ceil(math.sqrt(num_classes))
        cycles = math.ceil(num_classes / orientations)
    assert orientations * cycles >= num_classes

    coords = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    patterns = []
    for c in range(num_classes):
        angle = math.pi * (c % orientations) / orientations
        frequency = 1 + c // orientations
        phase = xx * math.cos(angle) + yy * math.sin(angle)
        wave = torch.sin(2 * math.pi * frequency * phase)
        wave = (wave - wave.min()) / (wave.max() - wave.min()).clamp_min(1e-8)
        patterns.append(wave)
    return torch.stack(patterns)


def apply_overlay(
    images: torch.Tensor, labels: torch.Tensor, patterns: torch.Tensor, strength: float
) -> torch.Tensor:
    """Blend each image (B, C, H, W) with its label's pattern on every channel."""
    overlay = patterns[labels].unsqueeze(1).to(images.dtype)  # (B, 1, H, W)
    return images * (1.0 - strength) + overlay * strength


def neutral_overlay(
    images: torch.Tensor, patterns: torch.Tensor, strength: float
) -> torch.Tensor:
    """Blend with the mean of all patterns: the input when the label is unknown."""
    overlay = patterns.mean(0).to(images.dtype)
    return images * (1.0 - strength) + overlay * strength


def wrong_labels(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw a uniformly random label different from each true label."""
    offsets = torch.randint(
        1, num_classes, labels.shape, generator=generator, device=labels.device
    )
    return (labels + offsets) % num_classes
