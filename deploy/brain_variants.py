"""Fresh brains trained in-process on a trained run's arms, for brain-only ablations.

Variants that change only the brain (nerve ring, competition, brain mode) leave the
arms' training unchanged, so one distributed run per seed trains the arms. Its arms
compute their outputs once. A fresh brain per variant then trains on them as the
brain actor does: module dropout, AdamW at `brain_lr`, `epochs x brain_passes`
passes of `batch_size`. The pass with the best validation accuracy is kept, and the
test split is scored once with it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from arms.augment import resize, to_tensor
from brain.model import arm_dropout_mask, build_brain
from common.config import RunConfig
from deploy.api import OctopusModel


@dataclass
class ArmOutputs:
    """Every arm's outputs for one split: features (N, A, D), both kinds of logits."""

    features: torch.Tensor
    own_logits: torch.Tensor  # (N, A, C) the arm's own prediction (attention brain)
    head_logits: torch.Tensor  # (N, A, C) its local classifier (logit, ensemble)
    labels: torch.Tensor  # (N,)

    def logits_for(self, config: RunConfig) -> torch.Tensor:
        """Return the logits that the arm actor streams for `config.brain_mode`."""
        return self.own_logits if config.brain_mode == "attention" else self.head_logits


@torch.no_grad()
def arm_outputs(
    model: OctopusModel, images: np.ndarray, labels: np.ndarray, batch_size: int = 500
) -> ArmOutputs:
    """Run every arm once over uint8 images, without augmentation, as arms stream them."""
    features, own, head = [], [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size])
        per_arm = [arm.infer(resize(x, arm.resolution)) for arm in model.arms]
        batch_features = torch.stack([f for f, _ in per_arm], 1)
        features.append(batch_features)
        own.append(torch.stack([lg for _, lg in per_arm], 1))
        head.append(
            torch.stack(
                [arm.head(batch_features[:, i]) for i, arm in enumerate(model.arms)], 1
            )
        )
    return ArmOutputs(
        torch.cat(features),
        torch.cat(own),
        torch.cat(head),
        torch.from_numpy(np.asarray(labels)).long(),
    )


@torch.no_grad()
def accuracy(brain: torch.nn.Module, outputs: ArmOutputs, config: RunConfig) -> float:
    """Score `brain` on a split with every arm live."""
    brain.eval()
    live = torch.ones(outputs.features.shape[:2], dtype=torch.bool)
    logits, _ = brain(outputs.features, outputs.logits_for(config), live)
    return float((logits.argmax(1) == outputs.labels).float().mean())


def train_brain(
    config: RunConfig,
    num_classes: int,
    train: ArmOutputs,
    val: ArmOutputs,
    test: ArmOutputs,
) -> dict:
    """Train a fresh brain for `config` and return its validation and test accuracy.

    The validation split chooses the pass, and the test split is scored once with it.
    The ensemble brain has no parameters, so it is scored as built.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    brain = build_brain(config, num_classes)
    parameters = list(brain.parameters())
    passes = config.epochs * config.brain_passes if parameters else 0
    optimizer = (
        torch.optim.AdamW(parameters, lr=config.brain_lr) if parameters else None
    )
    train_logits = train.logits_for(config)
    best = {"val_accuracy": accuracy(brain, val, config), "pass": 0}
    best_state = copy.deepcopy(brain.state_dict())
    for pass_index in range(1, passes + 1):
        brain.train()
        order = torch.randperm(len(train.labels), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            live = arm_dropout_mask(
                len(index), config.arms, config.arm_dropout, generator
            )
            logits, _ = brain(train.features[index], train_logits[index], live)
            loss = F.cross_entropy(logits, train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_accuracy = accuracy(brain, val, config)
        if val_accuracy > best["val_accuracy"]:
            best = {"val_accuracy": val_accuracy, "pass": pass_index}
            best_state = copy.deepcopy(brain.state_dict())
    brain.load_state_dict(best_state)
    return {
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": accuracy(brain, test, config),
        "chosen_pass": best["pass"],
        "passes": passes,
    }


def brain_config(base: RunConfig, overrides: dict) -> RunConfig:
    """Apply brain-only overrides to the base run's config; options of the arms raise."""
    arm_options = set(overrides) - BRAIN_OPTIONS
    if arm_options:
        raise ValueError(
            f"options {sorted(arm_options)} change the arms: train them in a "
            "distributed run instead of a fresh brain on shared arms"
        )
    return dataclasses.replace(base, **overrides)


# Options that change the brain alone: the arms train the same for any of their values.
BRAIN_OPTIONS = {
    "nerve_ring",
    "competition",
    "top_k",
    "gumbel_tau",
    "brain_mode",
    "brain_lr",
    "brain_passes",
    "arm_dropout",
    "heads",
    "dropout",
}


def failure_cases(arms: int) -> list[tuple[int, ...]]:
    """No arm lost, every single arm lost, every pair lost (with more than 2 arms)."""
    singles = [(a,) for a in range(arms)]
    pairs = list(itertools.combinations(range(arms), 2)) if arms > 2 else []
    return [(), *singles, *pairs]


@torch.no_grad()
def lost_arm_accuracy(model: OctopusModel, outputs: ArmOutputs) -> dict:
    """Score the saved brain with the arms of each failure case masked.

    This is the computation of `OctopusModel.evaluate_subsets` on arm outputs that
    were already computed. Returns the accuracy per case ("none", "0", "0+1", ...)
    and the mean and worst over the single losses and over the pair losses.
    """
    brain = model.brain.eval()
    logits = outputs.logits_for(model.config)
    cases = failure_cases(model.config.arms)
    scores = []
    for dead in cases:
        live = torch.ones(outputs.features.shape[:2], dtype=torch.bool)
        live[:, list(dead)] = False
        brain_logits, _ = brain(outputs.features, logits, live)
        scores.append(float((brain_logits.argmax(1) == outputs.labels).float().mean()))
    by_case = {
        ("+".join(map(str, dead)) or "none"): score
        for dead, score in zip(cases, scores, strict=True)
    }
    single = [s for dead, s in zip(cases, scores, strict=True) if len(dead) == 1]
    pair = [s for dead, s in zip(cases, scores, strict=True) if len(dead) == 2]
    summary = {"all": by_case["none"]}
    summary["single_mean"], summary["single_worst"] = (
        float(np.mean(single)),
        min(single),
    )
    if pair:
        summary["pair_mean"], summary["pair_worst"] = float(np.mean(pair)), min(pair)
    return {"cases": by_case, **summary}
