"""Goodness and the local losses of Forward-Forward layers. Pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Mean of squared activations per sample: (B, ...) -> (B,)."""
    return h.pow(2).flatten(1).mean(1)


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Push positive goodness above `threshold` and negative goodness below it."""
    return (F.softplus(threshold - g_pos) + F.softplus(g_neg - threshold)).mean()


def class_goodness(h: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean activation of each class's channel group: (B, C*k, H, W) -> (B, C).

    Channels are split into `num_classes` contiguous groups of equal size.
    """
    batch, channels = h.shape[:2]
    if channels % num_classes:
        raise ValueError(
            f"{channels} channels cannot be split into {num_classes} equal class groups"
        )
    return h.reshape(batch, num_classes, -1).mean(2)


def grouped_loss(g: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy over the scaled per-class goodness (B, C)."""
    return F.cross_entropy(g * scale, labels)


def separation(g: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean goodness of the true class and of the other classes, for logging."""
    true = g.gather(1, labels[:, None]).squeeze(1)
    others = (g.sum(1) - true) / (g.shape[1] - 1)
    return true.mean().item(), others.mean().item()
