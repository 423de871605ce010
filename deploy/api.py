"""Python API: train a distributed run, then load, predict and evaluate in-process.

from deploy.api import RunConfig, load_run, train

config = RunConfig(dataset="cifar10", data_dir="../shared/data", epochs=1)
model, history = train(config, use_sff=True)
predictions = model.predict(images)  # uint8 (B, H, W, C) -> class ids
accuracy = model.evaluate(images, labels)
same_model = load_run(history["run_dir"])
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from arms.augment import resize, to_tensor
from arms.model import LocalArm, build_arm
from brain.model import build_brain
from common.checkpoint import check_same_run, load_checkpoint, load_state
from common.config import RunConfig
from common.datasets import DATASET_INFO
from deploy import training

__all__ = ["OctopusModel", "RunConfig", "load_run", "train"]


class OctopusModel:
    """All arms and the brain of a run, loaded in this process for inference."""

    def __init__(
        self,
        config: RunConfig,
        arms: list[LocalArm],
        brain: torch.nn.Module,
        feedback_brain: torch.nn.Module | None = None,
    ):
        """`feedback_brain` is the pass-2 brain of a feedback run (config.feedback)."""
        if config.feedback != (feedback_brain is not None):
            raise ValueError(
                f"config.feedback is {config.feedback} but feedback_brain is "
                f"{'given' if feedback_brain is not None else 'missing'}: a feedback "
                "run needs its pass-2 brain, and only a feedback run takes one"
            )
        self.config = config
        self.arms = arms
        self.brain = brain.eval()
        self.feedback_brain = feedback_brain.eval() if feedback_brain else None
        self.info = DATASET_INFO[config.dataset]

    @torch.no_grad()
    def predict_logits(
        self, images: np.ndarray, live: list[int] | None = None, batch_size: int = 500
    ) -> torch.Tensor:
        """Brain logits (B, C) for uint8 images (B, H, W[, C]); `live` lists the arms used."""
        return self.predict_subsets(images, [live], batch_size)[0]

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        expected = (self.info.image_size, self.info.image_size, self.info.channels)
        if images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(
                f"images have shape {images.shape} and dtype {images.dtype}; this "
                f"{self.config.dataset} model takes uint8 (B, {', '.join(map(str, expected))})"
            )
        return images

    @torch.no_grad()
    def predict_subsets(
        self, images: np.ndarray, subsets: list, batch_size: int = 500
    ) -> list[torch.Tensor]:
        """Brain logits for each subset of live arms (None: all).

        The arms run once, and in a feedback run once more per subset: the pass-1
        brain's probabilities for an image, which depend on the live arms, scale
        each arm's last output for that image, and the pass-2 brain classifies them.
        """
        images = self._check_images(images)
        everyone = list(range(len(self.arms)))
        masks = []
        for live in subsets:
            live_ids = everyone if live is None else list(live)
            if not live_ids or not set(live_ids) <= set(everyone):
                raise ValueError(
                    f"live arms {live} must be a non-empty subset of 0..{everyone[-1]}"
                )
            masks.append(live_ids)
        head_logits = self.config.brain_mode != "attention"
        outputs: list[list[torch.Tensor]] = [[] for _ in masks]
        for start in range(0, len(images), batch_size):
            x = to_tensor(images[start : start + batch_size])
            per_arm = [
                arm.infer(resize(x, arm.resolution), head_logits=head_logits)
                for arm in self.arms
            ]
            features = torch.stack([f for f, _ in per_arm], 1)
            arm_logits = torch.stack([lg for _, lg in per_arm], 1)
            for output, live_ids in zip(outputs, masks, strict=True):
                mask = torch.zeros(features.shape[:2], dtype=torch.bool)
                mask[:, live_ids] = True
                logits, _ = self.brain(features, arm_logits, mask)
                if self.feedback_brain is not None:
                    logits = self._second_pass(x, logits, mask, head_logits)
                output.append(logits)
        return [torch.cat(output) for output in outputs]

    def _second_pass(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        live: torch.Tensor,
        head_logits: bool,
    ) -> torch.Tensor:
        """Pass-2 brain logits for images `x` from the pass-1 brain's `logits`."""
        probs = torch.softmax(logits.float(), dim=1)
        per_arm = [
            arm.infer_feedback(
                resize(x, arm.resolution), probs, head_logits=head_logits
            )
            for arm in self.arms
        ]
        features = torch.stack([f for f, _ in per_arm], 1)
        arm_logits = torch.stack([lg for _, lg in per_arm], 1)
        logits, _ = self.feedback_brain(features, arm_logits, live)
        return logits

    def predict(self, images: np.ndarray, live: list[int] | None = None) -> np.ndarray:
        """Predicted class ids (B,) for uint8 images."""
        return self.predict_logits(images, live).argmax(1).numpy()

    def evaluate(
        self, images: np.ndarray, labels: np.ndarray, live: list[int] | None = None
    ) -> float:
        """Accuracy on (images, labels), optionally from a subset of live arms."""
        return self.evaluate_subsets(images, labels, [live])[0]

    def evaluate_subsets(
        self, images: np.ndarray, labels: np.ndarray, subsets: list
    ) -> list[float]:
        """Accuracy for each subset of live arms (None: all), arms run once."""
        labels = torch.from_numpy(np.asarray(labels))
        return [
            float((logits.argmax(1) == labels).float().mean())
            for logits in self.predict_subsets(images, subsets)
        ]


def load_run(run_dir: str | Path, tag: str = "best") -> OctopusModel:
    """Build every arm and the brain of a saved run from its `tag` checkpoints."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: load_run needs a run directory"
        )
    config = RunConfig.from_dict(json.loads(config_path.read_text()))
    info = DATASET_INFO[config.dataset]
    arms = []
    for arm_id in range(config.arms):
        path = run_dir / "checkpoints" / f"arm-{arm_id}-{tag}.pt"
        arm = build_arm(config, arm_id, info)
        payload = load_checkpoint(path, "arm", arm_id)
        check_same_run(payload, config.to_dict(), str(path))
        load_state(arm, payload["state"]["model"], str(path))
        arms.append(arm.eval())
    path = run_dir / "checkpoints" / f"brain-{tag}.pt"
    brain = build_brain(config, info.num_classes)
    payload = load_checkpoint(path, "brain")
    check_same_run(payload, config.to_dict(), str(path))
    load_state(brain, payload["state"]["model"], str(path))
    feedback_brain = None
    if config.feedback:
        feedback_brain = build_brain(config, info.num_classes)
        load_state(feedback_brain, payload["state"]["feedback_model"], str(path))
    return OctopusModel(config, arms, brain, feedback_brain)


def train(
    config: RunConfig, use_sff: bool = False, show_progress: bool = False
) -> tuple[OctopusModel, dict]:
    """Train `config` on a local Ray cluster; return the best model and the history.

    `use_sff` trains the fully local mode: the brain is a learned softmax weighting
    of the arms' local-classifier logits. The history contains the per-epoch metrics
    (`epochs`), the results and `run_dir`.
    """
    if use_sff:
        config = dataclasses.replace(config, brain_mode="logit")
    if not config.run_name:
        config = dataclasses.replace(
            config, run_name=time.strftime("%Y%m%d-%H%M%S-api")
        )
    if not config.git_revision:
        config = dataclasses.replace(config, git_revision=training.git_revision())
    run_dir = Path(config.output_dir) / config.run_name
    results = training.train(config, run_dir, show_progress)
    epochs = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    history = {"epochs": epochs, **results, "run_dir": str(run_dir)}
    return load_run(run_dir), history
