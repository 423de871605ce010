"""Arm models: stacks of conv blocks, each trained by its own local objective.

Every block takes a detached input, so its loss reaches only its own weights. Two
objectives exist:

- `GroupedArm`: the channels of each block are split into one group per class.
  Per-class goodness is the group's mean activation, and the block minimises
  cross-entropy over the scaled goodness. No overlay, no negatives.
- `OverlayArm`: Hinton's Forward-Forward with a Fourier label overlay. Positive
  input carries the true label's pattern, negative input a wrong label's; each
  block pushes goodness (mean squared activation) above a threshold for positives
  and below it for negatives.

Both end in a bottleneck: the last block's detached output pooled to 2x2, a linear
projection and a parameter-free LayerNorm, trained by a local linear classifier.
These `features` and the arm's `logits` are what the brain receives.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from arms.feedback import FeedbackGain
from arms.goodness import class_goodness, ff_loss, goodness, grouped_loss, separation
from arms.optim import LayerOptimizers, LayerSchedulers
from common.overlay import apply_overlay, class_patterns, neutral_overlay, wrong_labels


def default_depth(resolution: int) -> int:
    """Blocks for an input side length: each block halves it, down to about 2 px."""
    return max(1, min(4, int(math.log2(resolution)) - 1))


def block_widths(width: int, depth: int, num_classes: int = 1) -> list[int]:
    """Channel widths doubling per block, rounded up to a multiple of `num_classes`.

    Grouped arms pass their class count so every block splits into equal class groups.
    """
    return [math.ceil(width * 2**i / num_classes) * num_classes for i in range(depth)]


class ConvBlock(nn.Module):
    """3x3 conv, optional BatchNorm, ReLU, then halving of the side length.

    `compress` "pool" halves it with a 2x2 max-pool; "stride" with a learned 3x3
    stride-2 conv, BatchNorm and ReLU, grouped so that each of `groups` channel groups
    (one per class in grouped arms) is compressed on its own. Nothing halves below 2 px.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        batch_norm: bool,
        compress: str = "pool",
        groups: int = 1,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, 3, padding=1, bias=not batch_norm
        )
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.compress = None
        if compress == "stride":
            self.compress = nn.Sequential(
                nn.Conv2d(
                    out_channels,
                    out_channels,
                    3,
                    stride=2,
                    padding=1,
                    groups=groups,
                    bias=not batch_norm,
                ),
                nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity(),
                nn.ReLU(),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x)))
        if h.shape[-1] < 2:
            return h
        return self.compress(h) if self.compress is not None else F.max_pool2d(h, 2)


def opt_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Return every parameter an optimizer updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class LocalArm(nn.Module):
    """Shared parts: normalisation of the input, bottleneck, local classifier, optimizer."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        widths: list[int],
        bottleneck: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_norm: bool,
        compress: str = "pool",
        groups: int = 1,
        feedback: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        channels = [in_channels, *widths]
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, batch_norm, compress, groups)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        self.projection = nn.Linear(widths[-1] * 4, bottleneck)
        self.head = nn.Linear(bottleneck, num_classes)
        self.optimizer: LayerOptimizers | None = None
        self.scheduler: LayerSchedulers | None = None
        # Built last and without random numbers, so the other weights match a run
        # without feedback.
        self.feedback = FeedbackGain(num_classes, widths[-1]) if feedback else None
        self.feedback_optimizer: torch.optim.Optimizer | None = None

    def configure_optimizer(
        self, lr: float, weight_decay: float, total_steps: int
    ) -> None:
        """One AdamW with a cosine schedule over `total_steps` steps per layer.

        Each block has its own optimizer, and so does the readout (bottleneck projection
        and local classifier), so no optimizer state is shared between layers. The
        feedback gain has its own AdamW at a constant `lr`, used only by
        `train_feedback_step`.
        """
        readout = nn.ModuleList([self.projection, self.head])
        self.optimizer = LayerOptimizers(
            [*self.blocks, readout], lr, weight_decay, total_steps
        )
        self.scheduler = LayerSchedulers(self.optimizer)
        covered = {id(p) for opt in self.optimizer.optimizers for p in opt_params(opt)}
        missed = [
            name
            for name, p in self.named_parameters()
            if id(p) not in covered and not name.startswith("feedback.")
        ]
        if missed:
            raise ValueError(f"parameters outside every layer's optimizer: {missed}")
        if self.feedback is not None:
            self.feedback_optimizer = torch.optim.AdamW(
                self.feedback.parameters(), lr=lr, weight_decay=weight_decay
            )

    def features(self, h: torch.Tensor, detach: bool = True) -> torch.Tensor:
        """Bottleneck features (B, D) from the last block's output.

        `detach=False` lets the feedback gain before `h` learn from the local
        classifier's loss.
        """
        h = h.detach() if detach else h
        pooled = F.adaptive_avg_pool2d(h.float(), 2).flatten(1)
        return F.layer_norm(self.projection(pooled), (self.projection.out_features,))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Compute the arm's own logits from its last output, as pass 2 needs them.

        Subclasses whose `encode` logits are not the local classifier's override it.
        """
        return self.head(self.features(h, detach=False))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def block_losses(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, float]]:
        """Return each block's loss, the last block's output and metrics."""
        raise NotImplementedError

    def train_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        autocast_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        """Run one local update on images in [0, 1] at this arm's resolution."""
        assert self.optimizer is not None, "call configure_optimizer first"
        self.train()
        device_type = images.device.type
        with torch.autocast(
            device_type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            losses, h_last, metrics = self.block_losses(images, labels)
        head_logits = self.head(self.features(h_last))
        head_loss = F.cross_entropy(head_logits.float(), labels)

        self.optimizer.zero_grad(set_to_none=True)
        (sum(loss.float() for loss in losses) + head_loss).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

        metrics["ff_loss"] = sum(loss.item() for loss in losses) / len(losses)
        metrics["head_loss"] = head_loss.item()
        return metrics

    @torch.no_grad()
    def infer(
        self,
        images: torch.Tensor,
        autocast_dtype: torch.dtype | None = None,
        head_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (features (B, D), logits (B, C)) for images in [0, 1].

        The logits are the arm's own prediction, or with `head_logits` those of its
        local classifier on the features (the SFF and ensemble modes use these).
        """
        self.eval()
        device_type = images.device.type
        with torch.autocast(
            device_type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            h_last, logits = self.encode(images)
        features = self.features(h_last).float()
        if head_logits:
            logits = self.head(features)
        return features, logits.float()

    def _check_feedback(self) -> FeedbackGain:
        if self.feedback is None:
            raise RuntimeError(
                "this arm has no feedback gain: build it from a config with "
                "feedback=True (--feedback)"
            )
        return self.feedback

    @torch.no_grad()
    def infer_feedback(
        self,
        images: torch.Tensor,
        probs: torch.Tensor,
        autocast_dtype: torch.dtype | None = None,
        head_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return pass-2 (features, logits), with the last output scaled by the gain
        for the brain's probabilities `probs` (B, C) of the same images.
        """
        feedback = self._check_feedback()
        self.eval()
        device_type = images.device.type
        with torch.autocast(
            device_type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            h_last, _ = self.encode(images)
        h_feedback = feedback(h_last, probs)
        features = self.features(h_feedback).float()
        logits = self.head(features) if head_logits else self.readout(h_feedback)
        return features, logits.float()

    def train_feedback_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        probs: torch.Tensor,
        autocast_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        """Update only the feedback gain with this arm's own loss on pass 2.

        The loss is the cross-entropy of the readout (per-class goodness for grouped
        arms) plus that of the local classifier, both on the modulated output. The
        blocks run in eval mode under no_grad, so they and their BatchNorm
        statistics stay as they were when the pass-1 brain trained on their outputs.
        `probs` is detached.
        """
        feedback = self._check_feedback()
        assert self.feedback_optimizer is not None, "call configure_optimizer first"
        self.eval()
        device_type = images.device.type
        with (
            torch.no_grad(),
            torch.autocast(
                device_type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ),
        ):
            h_last, _ = self.encode(images)
        h_feedback = feedback(h_last, probs)
        readout_loss = F.cross_entropy(self.readout(h_feedback).float(), labels)
        head_logits = self.head(self.features(h_feedback, detach=False))
        head_loss = F.cross_entropy(head_logits, labels)

        self.feedback_optimizer.zero_grad(set_to_none=True)
        (readout_loss + head_loss).backward()
        self.feedback_optimizer.step()
        # The backward pass also reached the frozen projection and head.
        for name, parameter in self.named_parameters():
            if not name.startswith("feedback."):
                parameter.grad = None
        correct = (head_logits.argmax(1) == labels).float()
        return {
            "feedback_readout_loss": readout_loss.item(),
            "feedback_head_loss": head_loss.item(),
            "feedback_accuracy": correct.mean().item(),
        }

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the last block's output and the arm's own logits."""
        raise NotImplementedError


class GroupedArm(LocalArm):
    """Class-grouped channels with a cross-entropy over per-class goodness per block.

    The arm predicts from the mean log-softmax of the scaled goodness of its last
    `goodness_layers` blocks.
    """

    def __init__(
        self, *args, goodness_scale: float, goodness_layers: int = 1, **kwargs
    ):
        super().__init__(*args, batch_norm=True, **kwargs)
        self.goodness_scale = goodness_scale
        self.goodness_layers = goodness_layers

    def block_losses(self, images, labels):
        x = self.normalize(images)
        losses = []
        for block in self.blocks:
            h = block(x.detach())
            g = class_goodness(h.float(), self.num_classes)
            losses.append(grouped_loss(g, labels, self.goodness_scale))
            x = h
        g_pos, g_neg = separation(g.detach(), labels)
        accuracy = (g.argmax(1) == labels).float().mean().item()
        return (
            losses,
            x,
            {"goodness_pos": g_pos, "goodness_neg": g_neg, "accuracy": accuracy},
        )

    def layer_goodness(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the last block's output and every block's scaled goodness (L, B, C)."""
        x = self.normalize(images)
        scores = []
        for block in self.blocks:
            x = block(x)
            scores.append(class_goodness(x.float(), self.num_classes))
        return x, torch.stack(scores) * self.goodness_scale

    def encode(self, images):
        h_last, scores = self.layer_goodness(images)
        return h_last, combine_layers(scores, self.goodness_layers)

    def readout(self, h):
        # Pass 2 of a feedback run scores the gained last block only.
        scores = class_goodness(h.float(), self.num_classes) * self.goodness_scale
        return F.log_softmax(scores, dim=-1)


def combine_layers(scores: torch.Tensor, last: int) -> torch.Tensor:
    """Mean log-softmax of the last `last` layers' scores (L, B, C) -> (B, C)."""
    return F.log_softmax(scores[-last:], dim=-1).mean(0)


class OverlayArm(LocalArm):
    """Forward-Forward on label-overlaid images, positives against wrong-label negatives."""

    def __init__(self, *args, threshold: float, label_strength: float, **kwargs):
        super().__init__(*args, batch_norm=False, **kwargs)
        self.threshold = threshold
        self.label_strength = label_strength
        patterns = class_patterns(self.num_classes, self.resolution)
        self.register_buffer("patterns", patterns, persistent=False)
        self.generator = torch.Generator().manual_seed(0)

    def _layer_input(self, h: torch.Tensor) -> torch.Tensor:
        # Parameter-free LayerNorm over (C, H, W) hides the previous layer's goodness,
        # so each layer has to find its own evidence for the label.
        return F.layer_norm(h, h.shape[1:])

    def block_losses(self, images, labels):
        negatives = wrong_labels(labels.cpu(), self.num_classes, self.generator).to(
            labels.device
        )
        x_pos = self.normalize(
            apply_overlay(images, labels, self.patterns, self.label_strength)
        )
        x_neg = self.normalize(
            apply_overlay(images, negatives, self.patterns, self.label_strength)
        )
        losses = []
        for i, block in enumerate(self.blocks):
            if i:
                x_pos, x_neg = self._layer_input(x_pos), self._layer_input(x_neg)
            h_pos = block(x_pos.detach())
            h_neg = block(x_neg.detach())
            g_pos, g_neg = goodness(h_pos.float()), goodness(h_neg.float())
            losses.append(ff_loss(g_pos, g_neg, self.threshold))
            x_pos, x_neg = h_pos, h_neg
        h_last = self._neutral_encoding(images)
        metrics = {
            "goodness_pos": g_pos.mean().item(),
            "goodness_neg": g_neg.mean().item(),
            "accuracy": (g_pos > g_neg).float().mean().item(),
        }
        return losses, h_last, metrics

    def _neutral_encoding(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.normalize(
                neutral_overlay(images, self.patterns, self.label_strength)
            )
            for i, block in enumerate(self.blocks):
                x = block(self._layer_input(x) if i else x)
        return x

    def encode(self, images):
        h_last = self._neutral_encoding(images)
        # NOTE: the overlay arm's own logits come from its local classifier on the
        # neutral-overlay features, because scoring goodness under every label would
        # cost one forward pass per class.
        return h_last, self.head(self.features(h_last))


def build_arm(config, arm_id: int, info) -> LocalArm:
    """Build arm `arm_id` of a run from its config and the dataset's `DatasetInfo`."""
    kind = config.arm_kind(arm_id)
    resolution = config.arm_resolution(arm_id, info.image_size)
    depth = config.depth or default_depth(resolution)
    groups = 1 if kind == "overlay" else info.num_classes
    widths = block_widths(config.width, depth, groups)
    if kind in ("transformer", "lstm"):
        # Tokens and hidden states keep one width in every layer: twice `width`.
        widths = block_widths(2 * config.width, 1, groups) * depth
    common = dict(
        in_channels=info.channels,
        num_classes=info.num_classes,
        resolution=resolution,
        widths=widths,
        bottleneck=config.bottleneck,
        mean=info.mean,
        std=info.std,
        feedback=config.feedback,
    )
    # Conv arms halve between blocks by the `compress` method, per channel group.
    conv = dict(compress=config.compress, groups=groups)
    # Imported here, because these modules import LocalArm from this one and a
    # top-level import would be circular.
    if kind == "residual":
        from arms.residual import ResidualArm

        return ResidualArm(
            goodness_scale=config.goodness_scale,
            goodness_layers=min(
                config.goodness_layers, depth * (1 + config.residual_blocks)
            ),
            residual_blocks=config.residual_blocks,
            **common,
            **conv,
        )
    if kind == "grouped":
        return GroupedArm(
            goodness_scale=config.goodness_scale,
            goodness_layers=min(config.goodness_layers, depth),
            **common,
            **conv,
        )
    if kind == "transformer":
        from arms.transformer import TransformerArm

        return TransformerArm(goodness_scale=config.goodness_scale, **common)
    if kind == "lstm":
        from arms.lstm import LSTMArm

        return LSTMArm(goodness_scale=config.goodness_scale, **common)
    return OverlayArm(
        threshold=config.threshold,
        label_strength=config.label_strength,
        **common,
        **conv,
    )
