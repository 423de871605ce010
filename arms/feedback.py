"""Feedback gain: the brain's class probabilities modulate an arm's last output.

`FeedbackGain` maps the brain's detached probabilities p (B, C) to one gain per
channel, h' = h * (1 + tanh(A p + b)). A and b start at zero, so the second pass
starts equal to the first. Pure PyTorch; the arm trains it with its own loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class FeedbackGain(nn.Module):
    """Per-channel gain on an arm's output, computed from the brain's probabilities."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        # Zeros, not nn.Linear's random init: the gain starts at exactly 1, and
        # building it draws no random numbers, so the arm's other weights are the
        # same as in a run without feedback.
        self.weight = nn.Parameter(torch.zeros(channels, num_classes))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Scale dim 1 of `h` (B, channels, ...) by the gain for `probs` (B, C)."""
        gain = 1 + torch.tanh(probs.detach().float() @ self.weight.T + self.bias)
        return h.float() * gain.view(*gain.shape, *([1] * (h.dim() - 2)))


def feedback_rows(
    indices: np.ndarray, probs: np.ndarray, wanted: np.ndarray
) -> np.ndarray:
    """Rows of `probs` (N, C) for the dataset indices `wanted`, looked up in `indices`.

    Raises KeyError naming the first index that has no probabilities.
    """
    if not len(indices):
        raise KeyError("no brain probabilities at all: the feedback sent is empty")
    order = np.argsort(indices, kind="stable")
    sorted_indices = indices[order]
    positions = np.searchsorted(sorted_indices, wanted)
    positions = np.minimum(positions, len(sorted_indices) - 1)
    found = sorted_indices[positions] == wanted
    if not found.all():
        missing = wanted[~found][0]
        raise KeyError(
            f"no brain probabilities for image {missing}: the feedback sent to this "
            "arm does not cover the split it streams"
        )
    return probs[order[positions]]
