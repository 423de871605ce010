"""Fourier label overlay: one full-image pattern per class, blended into the image.

Up to 12 classes use the original family: one sinusoid, orientation 0/45/90/135
degrees by `c % 4` and 1, 2 or 3 cycles across the image by `c // 4`. Larger label
sets would alias on small grids, where 100 plain sinusoids coincide at 8 px. So each
class there gets a sum of three sinusoids with random orientation, frequency (up to
the grid's Nyquist limit) and phase. A draw is repeated until it differs from every
earlier class by at least `MIN_RMS_DISTANCE` per pixel. The draws are seeded, so every
process builds the same patterns.
"""

import math

import torch

MIN_RMS_DISTANCE = 0.15
MAX_DRAWS = 10_000


def class_patterns(num_classes: int, size: int) -> torch.Tensor:
    """Return (C, size, size) patterns, each min-max scaled to [0, 1]."""
    if num_classes < 2:
        raise ValueError(f"invalid number of classes {num_classes}: need at least 2")
    coords = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def wave(angle: float, cycles: float, phase: float) -> torch.Tensor:
        position = xx * math.cos(angle) + yy * math.sin(angle)
        return torch.sin(2 * math.pi * cycles * position + phase)

    if num_classes <= 12:
        patterns = [
            wave(math.pi * (c % 4) / 4, 1 + c // 4, 0.0) for c in range(num_classes)
        ]
        return torch.stack([_min_max(p) for p in patterns]).float()

    generator = torch.Generator().manual_seed(num_classes * 1000 + size)
    nyquist = max(1.0, (size - 1) / 2)
    patterns = []
    for _ in range(MAX_DRAWS):
        draws = torch.rand(3, 3, generator=generator, dtype=torch.float64).tolist()
        candidate = _min_max(
            sum(
                wave(math.pi * a, 1 + (nyquist - 1) * f, 2 * math.pi * p)
                for a, f, p in draws
            )
        )
        if all(
            (candidate - q).pow(2).mean().sqrt() >= MIN_RMS_DISTANCE for q in patterns
        ):
            patterns.append(candidate)
            if len(patterns) == num_classes:
                return torch.stack(patterns).float()
    raise ValueError(
        f"cannot draw {num_classes} distinct patterns on a {size} px grid: use a larger "
        "resolution for the overlay arms"
    )


def _min_max(pattern: torch.Tensor) -> torch.Tensor:
    return (pattern - pattern.min()) / (pattern.max() - pattern.min()).clamp_min(1e-8)


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
