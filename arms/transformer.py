"""Transformer arm: a patch embedding and pre-norm encoder blocks, each trained locally.

Every block takes a detached token input and has its own class-grouped loss, as the
conv blocks of `GroupedArm` do. The ReLU of the block's output tokens is split into
one channel group per class, and per-class goodness is the group's mean over its
channels and all tokens. The block minimises cross-entropy over the scaled goodness.
The patch embedding belongs to the first block and learns from its loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arms.goodness import class_goodness, grouped_loss, separation
from arms.model import LocalArm

TOKEN_GRID = 8  # preferred tokens per image side: 4x4 patches at 32 px, 2x2 at 16 px
MLP_RATIO = 2


def patch_size(resolution: int) -> int:
    """Side of the square patches: the divisor of `resolution` whose token grid side
    is closest to `TOKEN_GRID`, the smaller patch on a tie (28 px gives 4, 14 px 2).
    """
    divisors = [p for p in range(1, resolution + 1) if resolution % p == 0]
    return min(divisors, key=lambda p: (abs(resolution // p - TOKEN_GRID), p))


def attention_heads(dim: int) -> int:
    """Heads for a token width: 4, or 2 or 1 when 4 does not divide it."""
    return next(heads for heads in (4, 2, 1) if dim % heads == 0)


class PatchEmbedding(nn.Module):
    """Non-overlapping patches to tokens (B, T, D), plus a learned position embedding."""

    def __init__(self, in_channels: int, dim: int, resolution: int):
        super().__init__()
        patch = patch_size(resolution)
        self.grid = resolution // patch
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, self.grid**2, dim) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2) + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention. The key projection has no bias: softmax over keys
    ignores it, so it could never receive a gradient.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            # (B, T, D) -> (B, heads, T, D / heads)
            return t.view(batch, tokens, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, dim))


class EncoderBlock(nn.Module):
    """Pre-norm encoder block. The first block of an arm also embeds the image."""

    def __init__(self, dim: int, heads: int, embedding: PatchEmbedding | None = None):
        super().__init__()
        self.embedding = embedding
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, MLP_RATIO * dim),
            nn.GELU(),
            nn.Linear(MLP_RATIO * dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerArm(LocalArm):
    """Patch embedding and encoder blocks with class-grouped token channels.

    `widths` gives one token width per block and all must be equal, a multiple of
    the class count. The last block's tokens reach `features` as a (B, D, g, g) map.
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
        dim = widths[0]
        if any(width != dim for width in widths) or dim % self.num_classes:
            raise ValueError(
                f"transformer widths {widths} must be equal and a multiple of the "
                f"{self.num_classes} classes"
            )
        self.goodness_scale = goodness_scale
        heads = attention_heads(dim)
        embedding = PatchEmbedding(in_channels, dim, self.resolution)
        self.grid = embedding.grid
        # Replaces the conv blocks that LocalArm builds.
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, embedding if i == 0 else None)
            for i in range(len(widths))
        )

    def _goodness(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, D, T): class groups are contiguous channel ranges.
        return class_goodness(F.relu(tokens.float()).transpose(1, 2), self.num_classes)

    def readout(self, h):
        # Pass 2 of a feedback run: the goodness of the gained token map (B, D, g, g).
        return class_goodness(F.relu(h.float()), self.num_classes) * self.goodness_scale

    def _token_map(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, D, g, g), the layout `LocalArm.features` pools.
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)

    def block_losses(self, images, labels):
        x = self.normalize(images)
        losses = []
        for block in self.blocks:
            x = block(x.detach())
            g = self._goodness(x)
            losses.append(grouped_loss(g, labels, self.goodness_scale))
        g_pos, g_neg = separation(g.detach(), labels)
        accuracy = (g.argmax(1) == labels).float().mean().item()
        metrics = {"goodness_pos": g_pos, "goodness_neg": g_neg, "accuracy": accuracy}
        return losses, self._token_map(x), metrics

    def encode(self, images):
        x = self.normalize(images)
        for block in self.blocks:
            x = block(x)
        logits = self._goodness(x) * self.goodness_scale
        return self._token_map(x), logits
