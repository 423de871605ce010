"""The brain's competition between arms and its masking of dead arms.

Run: pytest tests/test_brain_model.py
"""

from __future__ import annotations

import itertools

import pytest
import torch

from brain.model import Brain, compete
from common.config import COMPETITIONS

ARMS = 4
DIM = 8
CLASSES = 5
BATCH = 3

# Every non-empty set of live arms out of four.
LIVE_SETS = [
    live_arms
    for count in range(1, ARMS + 1)
    for live_arms in itertools.combinations(range(ARMS), count)
]


def live_mask(live_arms: tuple[int, ...], batch: int = BATCH) -> torch.Tensor:
    live = torch.zeros(batch, ARMS, dtype=torch.bool)
    live[:, list(live_arms)] = True
    return live


def assert_one_hot(weights: torch.Tensor) -> None:
    assert ((weights == 0) | (weights == 1)).all()
    assert (weights.sum(1) == 1).all()


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kind", COMPETITIONS)
@pytest.mark.parametrize("live_arms", [(0, 1, 2, 3), (1, 3), (2,)], ids=str)
def test_compete_weights_sum_to_one(kind, training, live_arms):
    torch.manual_seed(0)
    scores = torch.randn(BATCH, ARMS)

    weights = compete(scores, live_mask(live_arms), kind, 2, 0.5, training)

    assert weights.shape == (BATCH, ARMS)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(BATCH))


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_compete_topk_count(top_k):
    torch.manual_seed(0)
    scores = torch.randn(BATCH, ARMS)

    weights = compete(scores, live_mask((0, 1, 2, 3)), "topk", top_k, 0.5, False)

    assert ((weights > 0).sum(1) == top_k).all()
    chosen = weights > 0
    for row in range(BATCH):
        best = scores[row].topk(top_k).indices
        assert set(chosen[row].nonzero().flatten().tolist()) == set(best.tolist())


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("live_arms", [(0, 2, 3), (1,)], ids=str)
def test_compete_topk_dead_arms(top_k, live_arms):
    torch.manual_seed(0)
    live = live_mask(live_arms)

    weights = compete(torch.randn(BATCH, ARMS), live, "topk", top_k, 0.5, False)

    assert ((weights > 0).sum(1) == min(top_k, len(live_arms))).all()
    assert (weights[~live] == 0).all()


def test_compete_gumbel_eval_argmax():
    torch.manual_seed(0)
    scores = torch.randn(BATCH, ARMS)
    live = live_mask((0, 1, 3))

    first = compete(scores, live, "gumbel", 2, 0.5, training=False)
    second = compete(scores, live, "gumbel", 2, 0.5, training=False)

    assert torch.equal(first, second)
    assert_one_hot(first)
    best_live = scores.masked_fill(~live, float("-inf")).argmax(1)
    assert torch.equal(first.argmax(1), best_live)


@pytest.mark.parametrize("live_arms", [(0, 1, 2, 3), (0, 2)], ids=str)
def test_compete_gumbel_training_one_hot(live_arms):
    torch.manual_seed(0)
    live = live_mask(live_arms, batch=64)
    scores = torch.zeros(64, ARMS)  # equal scores: the Gumbel noise decides

    weights = compete(scores, live, "gumbel", 2, 0.5, training=True)

    assert_one_hot(weights)
    assert (weights[~live] == 0).all()
    # Each live arm wins about 1 / len(live_arms) of the 64 samples, so at least one.
    assert set(weights.argmax(1).tolist()) == set(live_arms)


def test_compete_unknown_kind():
    with pytest.raises(ValueError, match="invalid competition 'vote'"):
        compete(
            torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "vote", 1, 1.0, False
        )


def build_brain(competition: str, nerve_ring: bool = True) -> Brain:
    torch.manual_seed(0)
    brain = Brain(
        arms=ARMS,
        dim=DIM,
        num_classes=CLASSES,
        heads=2,
        nerve_ring=nerve_ring,
        competition=competition,
        top_k=2,
    )
    return brain.eval()


def arm_outputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random arm features (B, N, D) and logits (B, N, C)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, ARMS, DIM, generator=generator)
    logits = torch.randn(BATCH, ARMS, CLASSES, generator=generator)
    return features, logits


@pytest.mark.parametrize("competition", COMPETITIONS)
@pytest.mark.parametrize("live_arms", LIVE_SETS, ids=str)
def test_dead_arms_zero_attention(competition, live_arms):
    brain = build_brain(competition)
    features, logits = arm_outputs(seed=1)
    live = live_mask(live_arms)

    with torch.no_grad():
        _, attention = brain(features, logits, live)

    assert (attention[~live] == 0).all()
    torch.testing.assert_close(attention.sum(1), torch.ones(BATCH))


@pytest.mark.parametrize("nerve_ring", [True, False])
@pytest.mark.parametrize("competition", COMPETITIONS)
@pytest.mark.parametrize("live_arms", LIVE_SETS, ids=str)
def test_dead_arms_ignored(competition, nerve_ring, live_arms):
    brain = build_brain(competition, nerve_ring)
    features, logits = arm_outputs(seed=1)
    live = live_mask(live_arms)

    # Replace the dead arms' outputs with other random values, not zeros: a brain
    # that fed dead arms in as zeros would pass a zero-replacement test.
    other_features, other_logits = arm_outputs(seed=2)
    swapped_features = torch.where(live[..., None], features, other_features)
    swapped_logits = torch.where(live[..., None], logits, other_logits)

    with torch.no_grad():
        brain_logits, attention = brain(features, logits, live)
        swapped_brain_logits, swapped_attention = brain(
            swapped_features, swapped_logits, live
        )

    # Masked arms get exactly zero weight, so the outputs match bit for bit.
    assert torch.equal(swapped_brain_logits, brain_logits)
    assert torch.equal(swapped_attention, attention)


def test_dead_arms_ignored_per_sample():
    brain = build_brain("soft")
    features, logits = arm_outputs(seed=1)
    other_features, other_logits = arm_outputs(seed=2)
    live = torch.tensor(
        [
            [True, False, True, False],
            [False, False, False, True],
            [True, True, True, True],
        ]
    )

    with torch.no_grad():
        brain_logits, _ = brain(features, logits, live)
        swapped_brain_logits, _ = brain(
            torch.where(live[..., None], features, other_features),
            torch.where(live[..., None], logits, other_logits),
            live,
        )

    assert torch.equal(swapped_brain_logits, brain_logits)


def test_live_arms_change_output():
    # The counterpart of the tests above: a live arm's output does reach the logits.
    brain = build_brain("soft")
    features, logits = arm_outputs(seed=1)
    other_features, _ = arm_outputs(seed=2)
    live = live_mask((0, 1, 2, 3))

    with torch.no_grad():
        brain_logits, _ = brain(features, logits, live)
        features[:, 1] = other_features[:, 1]
        changed_brain_logits, _ = brain(features, logits, live)

    assert not torch.allclose(changed_brain_logits, brain_logits)


@pytest.mark.parametrize("competition", COMPETITIONS)
def test_brain_no_live_arm(competition):
    brain = build_brain(competition)
    features, logits = arm_outputs(seed=1)
    live = live_mask((0, 1, 2, 3))
    live[1] = False

    with pytest.raises(ValueError, match="at least one live arm"):
        brain(features, logits, live)
