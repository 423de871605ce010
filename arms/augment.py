"""Turn uint8 image batches into normalised tensors at an arm's resolution."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]."""
    return (
        torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        / 255.0
    )


def random_crop_flip(
    x: torch.Tensor, pad: int, generator: torch.Generator
) -> torch.Tensor:
    """Random translation by up to `pad` pixels (reflect padding) and horizontal flip."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(batch):
        dy, dx = offsets[i].tolist()
        crop = padded[i, :, dy : dy + height, dx : dx + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize with antialiasing; a no-op at the native size."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(
        x,
        size=(resolution, resolution),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )


def normalize(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
