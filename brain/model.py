"""The brain: nerve ring, coordinator and classifier over the arms' detached outputs.

Shapes: B batch, N arms, D bottleneck, C classes. `live` (B, N) is True where an
arm's output is present. Missing arms are masked out of the nerve ring's keys and
the coordinator's attention, never fed in as zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class NerveRing(nn.Module):
    """Multi-head self-attention across the arm vectors, with residual and LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(
            dim, heads, dropout=dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.attention(x, x, x, key_padding_mask=~live, need_weights=False)
        return self.norm(x + self.dropout(mixed))


def compete(
    scores: torch.Tensor,
    live: torch.Tensor,
    kind: str,
    top_k: int,
    tau: float,
    training: bool,
) -> torch.Tensor:
    """Turn per-arm scores (B, N) into attention weights that sum to 1 over live arms.

    soft: softmax. topk: softmax over the k highest live scores. gumbel: a hard
    Gumbel-softmax sample while training (straight-through gradient), the argmax
    at evaluation, so evaluation is deterministic.
    """
    scores = scores.masked_fill(~live, float("-inf"))
    if kind == "soft":
        return torch.softmax(scores, dim=1)
    if kind == "topk":
        k = min(top_k, scores.shape[1])
        kth = scores.topk(k, dim=1).values[:, -1:]
        return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=1)
    if kind == "gumbel":
        if training:
            return F.gumbel_softmax(scores, tau=tau, hard=True, dim=1)
        return F.one_hot(scores.argmax(1), scores.shape[1]).to(scores.dtype)
    raise ValueError(f"invalid competition {kind!r}: choose soft, topk or gumbel")


class Coordinator(nn.Module):
    """Attention over arms: a query from all arm vectors, one score per arm."""

    def __init__(self, arms: int, dim: int, competition: str, top_k: int, tau: float):
        super().__init__()
        self.query = nn.Linear(arms * dim, dim)
        self.competition = competition
        self.top_k = top_k
        self.tau = tau

    def forward(
        self, x: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The query is a fixed-size map of all arms, so missing arms enter it as zeros;
        # their own scores are masked below.
        present = x * live.unsqueeze(-1)
        query = self.query(present.flatten(1))  # (B, D)
        scores = torch.einsum("bnd,bd->bn", x, query) / math.sqrt(x.shape[-1])
        attention = compete(
            scores, live, self.competition, self.top_k, self.tau, self.training
        )
        return torch.einsum("bn,bnd->bd", attention, x), attention


class Brain(nn.Module):
    """Per-arm input maps, nerve ring, coordinator and an MLP classifier."""

    def __init__(
        self,
        arms: int,
        dim: int,
        num_classes: int,
        heads: int = 4,
        nerve_ring: bool = True,
        competition: str = "soft",
        top_k: int = 2,
        tau: float = 0.5,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.arms = arms
        self.num_classes = num_classes
        self.inputs = nn.ModuleList(
            nn.Linear(dim + num_classes, dim) for _ in range(arms)
        )
        self.nerve_ring = NerveRing(dim, heads, dropout) if nerve_ring else None
        self.coordinator = Coordinator(arms, dim, competition, top_k, tau)
        self.classifier = nn.Sequential(
            nn.Linear(dim, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(
        self, features: torch.Tensor, arm_logits: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (B, C), attention (B, N)) from (B, N, D), (B, N, C), (B, N)."""
        if not live.any(1).all():
            raise ValueError("every sample needs at least one live arm")
        arm_inputs = torch.cat([features, F.log_softmax(arm_logits, dim=-1)], dim=-1)
        x = torch.stack(
            [proj(arm_inputs[:, i]) for i, proj in enumerate(self.inputs)], 1
        )
        if self.nerve_ring is not None:
            x = self.nerve_ring(x, live)
        pooled, attention = self.coordinator(x, live)
        return self.classifier(pooled), attention


class LogitCoordinator(nn.Module):
    """Softmax weights over the arms' log-probabilities: learned, or uniform (ensemble)."""

    def __init__(self, arms: int, learned: bool):
        super().__init__()
        self.num_classes = 0  # set by build_brain
        if learned:
            self.arm_scores = nn.Parameter(torch.zeros(arms))
        else:
            self.register_buffer("arm_scores", torch.zeros(arms))

    def forward(
        self, features: torch.Tensor, arm_logits: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log-probabilities (B, C), arm weights (B, N)); features are unused."""
        if not live.any(1).all():
            raise ValueError("every sample needs at least one live arm")
        scores = self.arm_scores.expand(live.shape).masked_fill(~live, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        log_probs = F.log_softmax(arm_logits, dim=-1)
        return torch.einsum("bn,bnc->bc", weights, log_probs), weights


def arm_dropout_mask(
    batch: int, arms: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Module dropout: a live mask (B, N) with a random 1 to N-1 arms masked in a
    share `p` of the samples. No sample loses every arm.
    """
    live = torch.ones(batch, arms, dtype=torch.bool)
    if arms < 2 or p <= 0:
        return live
    chosen = torch.rand(batch, generator=generator) < p
    dropped = torch.randint(1, arms, (batch, 1), generator=generator)
    rank = torch.rand(batch, arms, generator=generator).argsort(1).argsort(1)
    return ~((rank < dropped) & chosen[:, None])


def build_brain(config, num_classes: int) -> nn.Module:
    if config.brain_mode != "attention":
        brain = LogitCoordinator(config.arms, learned=config.brain_mode == "logit")
        brain.num_classes = num_classes
        return brain
    return Brain(
        arms=config.arms,
        dim=config.bottleneck,
        num_classes=num_classes,
        heads=config.heads,
        nerve_ring=config.nerve_ring,
        competition=config.competition,
        top_k=config.top_k,
        tau=config.gumbel_tau,
        dropout=config.dropout,
    )
