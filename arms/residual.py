"""A deeper layer-local arm: class-grouped conv layers with parameter-free residuals.

It follows what the best published layer-local results share:

- every layer's channels are split into one group per class, and the layer minimises
  a cross-entropy over the scaled per-class goodness. Goodness is the group's mean
  activation (mean, not squared), so a unit that is off still gets gradient;
- each layer's input is normalised per class group (no learned affine), so a layer
  cannot read the previous layer's class evidence off its group magnitudes;
- after each downsampling layer come `residual_blocks` same-width layers whose output
  is added to their input (an identity skip, no parameters);
- every layer's input is detached and every layer has its own optimizer, so each
  loss trains exactly one layer;
- the arm predicts from the goodness of its last `goodness_layers` layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arms.goodness import class_goodness, grouped_loss, separation
from arms.model import ConvBlock, LocalArm, combine_layers


class ResidualLayer(nn.Module):
    """3x3 conv, BatchNorm, ReLU at constant width; the caller adds the skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class ResidualArm(LocalArm):
    """Downsampling conv layers, each followed by residual layers, all layer-local."""

    def __init__(
        self,
        *args,
        goodness_scale: float,
        goodness_layers: int,
        residual_blocks: int,
        widths: list[int],
        compress: str = "pool",
        groups: int = 1,
        **kwargs,
    ):
        super().__init__(*args, widths=widths, batch_norm=True, **kwargs)
        self.goodness_scale = goodness_scale
        self.goodness_layers = goodness_layers
        layers: list[nn.Module] = []
        self.is_residual: list[bool] = []
        in_channels = self.blocks[0].conv.in_channels
        for width in widths:
            layers.append(ConvBlock(in_channels, width, True, compress, groups))
            self.is_residual.append(False)
            for _ in range(residual_blocks):
                layers.append(ResidualLayer(width))
                self.is_residual.append(True)
            in_channels = width
        self.blocks = nn.ModuleList(layers)

    def _layer_input(self, y: torch.Tensor, index: int) -> torch.Tensor:
        # The first layer takes the normalised image, later ones a per-group norm.
        return y if index == 0 else F.group_norm(y, self.num_classes)

    def _forward(
        self, images: torch.Tensor, detach: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return every layer's own output h and the last layer's output y."""
        y = self.normalize(images)
        outputs = []
        for index, (layer, residual) in enumerate(
            zip(self.blocks, self.is_residual, strict=True)
        ):
            x = self._layer_input(y, index)
            if detach:
                x = x.detach()
            h = layer(x)
            y = x + h if residual else h
            outputs.append(h)
        return outputs, y

    def block_losses(self, images, labels):
        losses = []
        outputs, y = self._forward(images, detach=True)
        for h in outputs:
            g = class_goodness(h.float(), self.num_classes)
            losses.append(grouped_loss(g, labels, self.goodness_scale))
        g_pos, g_neg = separation(g.detach(), labels)
        accuracy = (g.argmax(1) == labels).float().mean().item()
        return (
            losses,
            y,
            {"goodness_pos": g_pos, "goodness_neg": g_neg, "accuracy": accuracy},
        )

    def layer_goodness(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the last layer's output and every layer's scaled goodness (L, B, C)."""
        outputs, y = self._forward(images, detach=False)
        scores = [class_goodness(h.float(), self.num_classes) for h in outputs]
        return y, torch.stack(scores) * self.goodness_scale

    def encode(self, images):
        y, scores = self.layer_goodness(images)
        return y, combine_layers(scores, self.goodness_layers)

    def readout(self, h):
        # Pass 2 of a feedback run scores the gained last output only. Its mean per
        # class group is the last layer's goodness, as the skip input is group-normed.
        scores = class_goodness(h.float(), self.num_classes) * self.goodness_scale
        return F.log_softmax(scores, dim=-1)
