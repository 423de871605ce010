"""LSTM arm: the image read row by row through a stack of locally trained LSTM layers.

Each time step is one row of pixels with all its channels (C * W values), so an
arm at R px reads R steps. Every layer is its own one-layer LSTM with a detached
input and its own class-grouped loss. Its hidden units are split into one group per
class, and per-class goodness is the group's mean hidden state over all time steps.
The layer minimises cross-entropy over the scaled goodness. Hidden states lie in
(-1, 1) and need no ReLU, because cross-entropy depends only on differences of
goodness.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arms.goodness import class_goodness, grouped_loss, separation
from arms.model import LocalArm

FEATURE_SEGMENTS = 4  # time segments pooled per hidden unit, as a 2x2 pool gives 4


class LSTMLayer(nn.Module):
    """One LSTM layer over a (B, T, input) sequence, returning hidden states (B, T, H)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(x)
        return hidden


class LSTMArm(LocalArm):
    """Stacked LSTM layers with class-grouped hidden units, one local loss per layer.

    `widths` gives the hidden size of each layer, each a multiple of the class count.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        widths: list[int],
        bottleneck: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        goodness_scale: float,
        feedback: bool = False,
    ):
        super().__init__(
            in_channels,
            num_classes,
            resolution,
            widths,
            bottleneck,
            mean,
            std,
            batch_norm=False,
            feedback=feedback,
        )
        if any(width % self.num_classes for width in widths):
            raise ValueError(
                f"LSTM hidden sizes {widths} must be multiples of the "
                f"{self.num_classes} classes"
            )
        self.goodness_scale = goodness_scale
        sizes = [in_channels * self.resolution, *widths]
        # Replaces the conv blocks that LocalArm builds.
        self.blocks = nn.ModuleList(
            LSTMLayer(n_in, n_out)
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def _rows(self, images: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, C * W): one time step per row of pixels.
        x = self.normalize(images)
        return x.permute(0, 2, 1, 3).flatten(2)

    def _goodness(self, hidden: torch.Tensor) -> torch.Tensor:
        # (B, T, H) -> (B, H, T): class groups are contiguous ranges of hidden units.
        return class_goodness(hidden.float().transpose(1, 2), self.num_classes)

    def features(self, h: torch.Tensor, detach: bool = True) -> torch.Tensor:
        """Bottleneck features (B, D) from the last layer's hidden states (B, H, T)."""
        h = h.detach() if detach else h
        segments = F.adaptive_avg_pool1d(h.float(), FEATURE_SEGMENTS)
        projected = self.projection(segments.flatten(1))
        return F.layer_norm(projected, (self.projection.out_features,))

    def block_losses(self, images, labels):
        x = self._rows(images)
        losses = []
        for layer in self.blocks:
            x = layer(x.detach())
            g = self._goodness(x)
            losses.append(grouped_loss(g, labels, self.goodness_scale))
        g_pos, g_neg = separation(g.detach(), labels)
        accuracy = (g.argmax(1) == labels).float().mean().item()
        metrics = {"goodness_pos": g_pos, "goodness_neg": g_neg, "accuracy": accuracy}
        # Hidden units first, (B, H, T), as the feedback gain scales dim 1.
        return losses, x.transpose(1, 2), metrics

    def encode(self, images):
        x = self._rows(images)
        for layer in self.blocks:
            x = layer(x)
        return x.transpose(1, 2), self._goodness(x) * self.goodness_scale

    def readout(self, h):
        # Pass 2 of a feedback run: the goodness of the gained hidden states (B, H, T).
        return class_goodness(h.float(), self.num_classes) * self.goodness_scale
