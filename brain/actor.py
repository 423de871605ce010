"""The brain process: a Ray actor that owns the ZeroMQ PULL socket the arms push to.

It gathers arm outputs by batch id, trains the brain on them (the outputs arrive as
plain arrays, so no gradient can reach an arm), evaluates and checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zmq

from brain.gather import Batch, BatchGatherer, GatherError
from brain.model import build_brain
from common import wire
from common.checkpoint import load_checkpoint, load_state, save_checkpoint
from common.config import RunConfig
from common.logs import setup_logging

log = logging.getLogger(__name__)

POLL_MS = 200


class PortInUseError(RuntimeError):
    """The brain's port is taken by another process."""


class BrainActor:
    """Brain: nerve ring, coordinator and classifier, trained on streamed arm outputs."""

    def __init__(
        self,
        config: dict,
        num_classes: int,
        labels: dict[str, np.ndarray],
        run_dir: str,
        threads: int = 1,
    ):
        self.config = RunConfig.from_dict(config)
        setup_logging(os.environ.get("OCTOPUSNET_LOG_LEVEL", "INFO"))
        torch.set_num_threads(threads)
        torch.manual_seed(self.config.seed)
        self.rng = random.Random(self.config.seed)
        self.labels = labels
        self.run_dir = Path(run_dir)
        self.model = build_brain(self.config, num_classes)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.brain_lr
        )
        self.epoch = 0
        self.dropped_messages = 0

        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        host = self.config.brain_host
        try:
            if self.config.brain_port:
                self.pull.bind(f"tcp://{host}:{self.config.brain_port}")
                port = self.config.brain_port
            else:
                port = self.pull.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as err:
            self.pull.close()
            self.context.term()
            raise PortInUseError(
                f"the brain cannot bind tcp://{host}:{self.config.brain_port} ({err}): "
                "pass another --brain-port, or 0 to let the OS pick one"
            ) from err
        self._endpoint = f"tcp://{host}:{port}"
        log.info("brain listening on %s, pid %d", self._endpoint, os.getpid())

    def endpoint(self) -> str:
        return self._endpoint

    def process_id(self) -> int:
        return os.getpid()

    def _receive(self, stream_id: str, arm_ids: tuple[int, ...]):
        """Yield complete batches of `stream_id` until every arm ends its stream."""
        gatherer = BatchGatherer(stream_id, arm_ids)
        timeout_s = self.config.stream_timeout_s
        last_message = time.monotonic()
        gathered = 0
        while not gatherer.done:
            if not self.pull.poll(POLL_MS):
                if time.monotonic() - last_message > timeout_s:
                    missing = sorted(set(arm_ids) - set(gatherer.finished_arms))
                    raise TimeoutError(
                        f"brain received nothing for {timeout_s:.0f} s while gathering "
                        f"{stream_id}; arms {missing} have not finished their stream"
                    )
                continue
            last_message = time.monotonic()
            frame = self.pull.recv(copy=True)
            try:
                message = wire.decode(frame)
            except wire.WireError as err:
                self._drop(f"malformed message: {err}")
                continue
            if message["type"] == wire.HEARTBEAT:
                continue
            if message["stream_id"] != stream_id:
                self._drop(
                    f"message of stream {message['stream_id']!r} while gathering {stream_id!r}"
                )
                continue
            try:
                if message["type"] == wire.END_OF_STREAM:
                    gatherer.finish(message["arm_id"], message["batches"])
                    continue
                batch = gatherer.add(message)
            except GatherError as err:
                self._drop(str(err))
                continue
            if batch is not None:
                gathered += 1
                yield batch
        gatherer.check_complete(gathered)

    def _drop(self, reason: str) -> None:
        self.dropped_messages += 1
        if self.dropped_messages <= 10 or self.dropped_messages % 1000 == 0:
            log.warning(
                "brain dropped a message (%d so far): %s", self.dropped_messages, reason
            )

    def _tensors(self, batch: Batch, split: str):
        labels_source = (
            self.labels["y_test"] if split == "test" else self.labels["y_train"]
        )
        features = torch.from_numpy(batch.features.copy())
        logits = torch.from_numpy(batch.logits.copy())
        live = torch.ones(features.shape[:2], dtype=torch.bool)
        labels = torch.from_numpy(labels_source[batch.indices])
        return features, logits, live, labels

    def _train_batch(self, batch: Batch) -> tuple[float, int]:
        features, logits, live, labels = self._tensors(batch, "train")
        self.model.train()
        brain_logits, _ = self.model(features, logits, live)
        loss = F.cross_entropy(brain_logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = (brain_logits.argmax(1) == labels).sum().item()
        return loss.item() * len(labels), correct

    def train_stream(self, stream_id: str, arm_ids: list[int], epoch: int) -> dict:
        """Train on one streamed pass of the training set, then `brain_passes - 1` more."""
        self.epoch = epoch
        start = time.perf_counter()
        batches: list[Batch] = []
        loss_sum, correct = 0.0, 0
        for batch in self._receive(stream_id, tuple(arm_ids)):
            batches.append(batch)
            batch_loss, batch_correct = self._train_batch(batch)
            loss_sum += batch_loss
            correct += batch_correct
        samples = sum(len(b.indices) for b in batches)
        if not samples:
            raise RuntimeError(f"stream {stream_id} delivered no batches to the brain")
        for _ in range(self.config.brain_passes - 1):
            self.rng.shuffle(batches)
            loss_sum, correct = 0.0, 0
            for batch in batches:
                batch_loss, batch_correct = self._train_batch(batch)
                loss_sum += batch_loss
                correct += batch_correct
        result = {
            "brain_loss": loss_sum / samples,
            "brain_train_accuracy": correct / samples,
            "brain_samples": samples,
            "brain_seconds": time.perf_counter() - start,
        }
        log.info(
            "brain epoch %d: loss %.3f, train accuracy %.3f on %d samples, %.1f s",
            epoch,
            result["brain_loss"],
            result["brain_train_accuracy"],
            samples,
            result["brain_seconds"],
        )
        return result

    @torch.no_grad()
    def evaluate_stream(self, stream_id: str, split: str, arm_ids: list[int]) -> dict:
        """Accuracy of the brain and of each arm's own logits on one streamed split."""
        self.model.eval()
        arms = len(arm_ids)
        correct = 0
        arm_correct = np.zeros(arms, dtype=np.int64)
        attention_sum = torch.zeros(arms)
        samples = 0
        for batch in self._receive(stream_id, tuple(arm_ids)):
            features, logits, live, labels = self._tensors(batch, split)
            brain_logits, attention = self.model(features, logits, live)
            correct += (brain_logits.argmax(1) == labels).sum().item()
            arm_correct += (logits.argmax(2) == labels[:, None]).sum(0).numpy()
            attention_sum += attention.sum(0)
            samples += len(labels)
        if not samples:
            raise RuntimeError(f"stream {stream_id} delivered no batches to the brain")
        return {
            "accuracy": correct / samples,
            "arm_accuracy": (arm_correct / samples).tolist(),
            "mean_attention": (attention_sum / samples).tolist(),
            "samples": samples,
        }

    def checkpoint_path(self, tag: str) -> Path:
        return self.run_dir / "checkpoints" / f"brain-{tag}.pt"

    def save(self, tag: str) -> str:
        path = self.checkpoint_path(tag)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        save_checkpoint(
            path,
            {
                "kind": "brain",
                "arm_id": None,
                "epoch": self.epoch,
                "config": self.config.to_dict(),
                "state": state,
            },
        )
        return str(path)

    def load(self, tag: str) -> int:
        path = self.checkpoint_path(tag)
        payload = load_checkpoint(path, "brain")
        load_state(self.model, payload["state"]["model"], str(path))
        self.optimizer.load_state_dict(payload["state"]["optimizer"])
        self.epoch = int(payload["epoch"])
        log.info("brain loaded %s (epoch %d)", path, self.epoch)
        return self.epoch

    def close(self) -> None:
        self.pull.close(linger=0)
        self.context.term()
