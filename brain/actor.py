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
from brain.liveness import Liveness
from brain.model import arm_dropout_mask, build_brain
from brain.serving import BrainServer
from common import wire
from common.checkpoint import (
    check_same_run,
    load_checkpoint,
    load_state,
    save_checkpoint,
)
from common.config import RunConfig
from common.datasets import DATASET_INFO
from common.logs import setup_logging
from common.restarts import reconstructed
from common.telemetry import BrainTelemetry

log = logging.getLogger(__name__)

POLL_MS = 200


class StreamAbortedError(RuntimeError):
    """The launcher abandoned a stream because an arm died while streaming it."""


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
        token: str,
        threads: int = 1,
        serve: dict | None = None,
    ):
        """`serve` turns this brain into the inference service: a dict with the
        `pull_port`, `pub_port` and `client_port` to bind and the checkpoint `tag`.
        """
        self.config = RunConfig.from_dict(config)
        setup_logging(os.environ.get("OCTOPUSNET_LOG_LEVEL", "INFO"))
        torch.set_num_threads(threads)
        torch.manual_seed(self.config.seed)
        self.rng = random.Random(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.labels = labels
        self.token = token
        self.run_dir = Path(run_dir)
        self.model = build_brain(self.config, num_classes)
        parameters = list(self.model.parameters())
        # The ensemble mode has nothing to train: it averages the arms' logits.
        self.optimizer = (
            torch.optim.AdamW(parameters, lr=self.config.brain_lr)
            if parameters
            else None
        )
        # Feedback runs: a second brain classifies the arms' pass-2 outputs. It
        # starts as a copy of the first when it first trains, since pass 2 starts
        # equal to pass 1.
        self.feedback_model = None
        self.feedback_optimizer = None
        self.feedback_started = False
        if self.config.feedback:
            # A forked RNG leaves the random numbers of pass 1's training (dropout)
            # as in a run without feedback; these initial weights are replaced.
            with torch.random.fork_rng():
                self.feedback_model = build_brain(self.config, num_classes)
            if parameters:
                self.feedback_optimizer = torch.optim.AdamW(
                    self.feedback_model.parameters(), lr=self.config.brain_lr
                )
        self.epoch = 0
        self.aborted_streams: set[str] = set()
        self.dropped_messages = 0
        self._progress = {"epoch": 0, "phase": "ready", "step": 0, "total": 0}
        self.telemetry = BrainTelemetry()

        self.context = zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        host = self.config.brain_host
        port = serve["pull_port"] if serve else self.config.brain_port
        try:
            if port:
                self.pull.bind(f"tcp://{host}:{port}")
            else:
                port = self.pull.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as err:
            self.pull.close()
            self.context.term()
            raise PortInUseError(
                f"the brain cannot bind tcp://{host}:{port} ({err}): "
                "pass another --brain-port, or 0 to let the OS pick one"
            ) from err
        self._endpoint = f"tcp://{host}:{port}"
        log.info("brain listening on %s, pid %d", self._endpoint, os.getpid())
        self.server = None
        if serve:
            self._start_serving(serve, reconstructed())

    def _start_serving(self, serve: dict, restarted: bool) -> None:
        self.load(serve["tag"])
        info = DATASET_INFO[self.config.dataset]
        liveness = Liveness(
            self.config.arms, self.config.heartbeat_timeout_s, self.config.miss_limit
        )
        self.server = BrainServer(
            self.model,
            self.config.arms,
            self.config.bottleneck,
            (info.image_size, info.image_size, info.channels),
            self.token,
            self.context,
            self.pull,
            self.config.brain_host,
            serve["pub_port"],
            serve["client_port"],
            self.config.deadline_s,
            liveness,
            self.telemetry,
            seed=self.config.seed,
            client_token=serve["client_token"],
        )
        self.server.start()
        if restarted:
            self.telemetry.restarts.inc()
        log.info(
            "brain %sserving %s checkpoints: clients on port %d, deadline %.0f ms, "
            "heartbeat timeout %.0f ms",
            "restarted and " if restarted else "",
            serve["tag"],
            serve["client_port"],
            self.config.deadline_s * 1000,
            self.config.heartbeat_timeout_s * 1000,
        )

    def stats(self) -> dict:
        """The inference service's counters and arm states, with this process's pid."""
        if self.server is None:
            raise RuntimeError("this brain is training, not serving")
        return {**self.server.stats(), "pid": os.getpid()}

    def endpoint(self) -> str:
        return self._endpoint

    def process_id(self) -> int:
        return os.getpid()

    def progress(self) -> dict:
        """Return the current phase and gathered batch count, also while the brain gathers."""
        return dict(self._progress)

    def _receive(self, stream_id: str, arm_ids: tuple[int, ...], expected: int = 0):
        """Yield complete batches of `stream_id` until every arm ends its stream.

        `expected` is the batch count shown by the progress bar (0 if unknown).
        """
        gatherer = BatchGatherer(stream_id, arm_ids)
        self.telemetry.live_arms.set(len(arm_ids))
        timeout_s = self.config.stream_timeout_s
        last_message = time.monotonic()
        gathered = 0
        while not gatherer.done:
            if stream_id in self.aborted_streams:
                raise StreamAbortedError(f"stream {stream_id} was aborted")
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
            if not wire.token_matches(message, self.token):
                self._drop(f"{message['type']} from outside this run (wrong token)")
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
                self._check_output(message, stream_id)
                batch = gatherer.add(message)
            except GatherError as err:
                self._drop(str(err))
                continue
            if batch is not None:
                gathered += 1
                self._progress = {
                    "epoch": self.epoch,
                    "phase": f"gather {stream_id.split(':')[0]}",
                    "step": gathered,
                    "total": expected,
                }
                yield batch
                latency_ms = (time.monotonic() - batch.first_arrival_s) * 1000
                self.telemetry.answered(
                    stream_id.split(":")[0], latency_ms, degraded=False
                )
        gatherer.check_complete(gathered)

    def abort(self, stream_id: str) -> None:
        """Make the gather of `stream_id` stop (called from a second Ray thread)."""
        self.aborted_streams.add(stream_id)

    def _drop(self, reason: str) -> None:
        self.dropped_messages += 1
        if self.dropped_messages <= 10 or self.dropped_messages % 1000 == 0:
            log.warning(
                "brain dropped a message (%d so far): %s", self.dropped_messages, reason
            )

    def _check_output(self, message: dict, stream_id: str) -> None:
        """Raise GatherError unless an arm output's shapes and indices fit this run."""
        indices, features, logits = (
            message["indices"],
            message["features"],
            message["logits"],
        )
        rows = len(indices)
        expected = {
            "indices": (rows,),
            "features": (rows, self.config.bottleneck),
            "logits": (rows, self.model.num_classes),
        }
        for name, shape in expected.items():
            if message[name].shape != shape:
                raise GatherError(
                    f"arm {message['arm_id']} batch {message['batch_id']}: {name} has "
                    f"shape {message[name].shape}, expected {shape}"
                )
        if (
            indices.dtype.kind != "i"
            or features.dtype.kind != "f"
            or logits.dtype.kind != "f"
        ):
            raise GatherError(
                f"arm {message['arm_id']} batch {message['batch_id']}: dtypes "
                f"{indices.dtype}/{features.dtype}/{logits.dtype}, expected integer "
                "indices and floating-point features and logits"
            )
        split = stream_id.split(":")[0]
        count = len(self.labels["y_test" if split == "test" else "y_train"])
        if rows == 0 or indices.min() < 0 or indices.max() >= count:
            raise GatherError(
                f"arm {message['arm_id']} batch {message['batch_id']}: image indices "
                f"outside 0..{count - 1} of the {split} split, or an empty batch"
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

    def _brain(self, feedback_pass: bool):
        """Return the brain and optimizer of pass 1, or those of pass 2."""
        if not feedback_pass:
            return self.model, self.optimizer
        if self.feedback_model is None:
            raise RuntimeError(
                "this brain has no pass-2 brain: pass 2 needs a run with "
                "feedback=True (--feedback)"
            )
        return self.feedback_model, self.feedback_optimizer

    def _train_batch(self, batch: Batch, model, optimizer) -> tuple[float, int]:
        features, logits, live, labels = self._tensors(batch, "train")
        live = arm_dropout_mask(
            len(labels), live.shape[1], self.config.arm_dropout, self.generator
        )
        model.train()
        brain_logits, _ = model(features, logits, live)
        loss = F.cross_entropy(brain_logits, labels)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        correct = (brain_logits.argmax(1) == labels).sum().item()
        return loss.item() * len(labels), correct

    def train_stream(
        self,
        stream_id: str,
        arm_ids: list[int],
        epoch: int,
        expected: int = 0,
        feedback_pass: bool = False,
    ) -> dict:
        """Train on one streamed pass of the training set, then `brain_passes - 1` more.

        `feedback_pass` trains the pass-2 brain on the arms' pass-2 outputs. In a
        feedback run, pass 1 also returns the trained brain's class probabilities
        for the streamed images under `feedback`, for the arms' feedback gains.
        """
        self.epoch = epoch
        model, optimizer = self._brain(feedback_pass)
        if feedback_pass and not self.feedback_started:
            model.load_state_dict(self.model.state_dict())
            self.feedback_started = True
        prefix = "feedback_brain" if feedback_pass else "brain"
        start = time.perf_counter()
        batches: list[Batch] = []
        loss_sum, correct = 0.0, 0
        for batch in self._receive(stream_id, tuple(arm_ids), expected):
            batches.append(batch)
            batch_loss, batch_correct = self._train_batch(batch, model, optimizer)
            loss_sum += batch_loss
            correct += batch_correct
        samples = sum(len(b.indices) for b in batches)
        if not samples:
            raise RuntimeError(f"stream {stream_id} delivered no batches to the brain")
        for _ in range(self.config.brain_passes - 1):
            self.rng.shuffle(batches)
            loss_sum, correct = 0.0, 0
            for batch in batches:
                batch_loss, batch_correct = self._train_batch(batch, model, optimizer)
                loss_sum += batch_loss
                correct += batch_correct
        result = {
            f"{prefix}_loss": loss_sum / samples,
            f"{prefix}_train_accuracy": correct / samples,
            f"{prefix}_samples": samples,
            f"{prefix}_seconds": time.perf_counter() - start,
        }
        log.info(
            "%s epoch %d: loss %.3f, train accuracy %.3f on %d samples, %.1f s",
            "pass-2 brain" if feedback_pass else "brain",
            epoch,
            result[f"{prefix}_loss"],
            result[f"{prefix}_train_accuracy"],
            samples,
            result[f"{prefix}_seconds"],
        )
        if self.config.feedback and not feedback_pass:
            result["feedback"] = self._probabilities(batches, "train")
        return result

    @torch.no_grad()
    def _probabilities(self, batches: list[Batch], split: str) -> dict:
        """Pass-1 class probabilities (N, C) of the batches' images, all arms live.

        In eval mode each image's probabilities depend on its own arm outputs only.
        """
        self.model.eval()
        probs = []
        for batch in batches:
            features, logits, live, _ = self._tensors(batch, split)
            brain_logits, _ = self.model(features, logits, live)
            probs.append(torch.softmax(brain_logits.float(), dim=1))
        return {
            "indices": np.concatenate([b.indices for b in batches]).astype(np.int64),
            "probs": torch.cat(probs).numpy(),
        }

    @torch.no_grad()
    def evaluate_stream(
        self,
        stream_id: str,
        split: str,
        arm_ids: list[int],
        expected: int = 0,
        feedback_pass: bool = False,
    ) -> dict:
        """Score the brain and each arm's own logits on one streamed split.

        Besides accuracies, returns per-class accuracy of every arm (N x C) and the
        coordinator's mean attention per true class (C x N), for the run report.
        `feedback_pass` scores the pass-2 brain on pass-2 outputs. In a feedback
        run, pass 1 also returns the brain's class probabilities under `feedback`.
        """
        model, _ = self._brain(feedback_pass)
        model.eval()
        keep = self.config.feedback and not feedback_pass
        pass1_batches: list[Batch] = []
        arms, classes = len(arm_ids), self.model.num_classes
        correct = 0
        arm_correct = torch.zeros(arms, classes)
        attention_sum = torch.zeros(classes, arms)
        class_count = torch.zeros(classes)
        for batch in self._receive(stream_id, tuple(arm_ids), expected):
            if keep:
                pass1_batches.append(batch)
            features, logits, live, labels = self._tensors(batch, split)
            brain_logits, attention = model(features, logits, live)
            correct += (brain_logits.argmax(1) == labels).sum().item()
            hits = (logits.argmax(2) == labels[:, None]).float()  # (B, N)
            arm_correct.index_add_(1, labels, hits.T)
            attention_sum.index_add_(0, labels, attention.float())
            class_count += torch.bincount(labels, minlength=classes)
        samples = int(class_count.sum())
        if not samples:
            raise RuntimeError(f"stream {stream_id} delivered no batches to the brain")
        per_class = class_count.clamp_min(1)
        result = {
            "accuracy": correct / samples,
            "arm_accuracy": (arm_correct.sum(1) / samples).tolist(),
            "arm_class_accuracy": (arm_correct / per_class).tolist(),
            "mean_attention": (attention_sum.sum(0) / samples).tolist(),
            "class_attention": (attention_sum / per_class[:, None]).tolist(),
            "samples": samples,
        }
        if keep:
            result["feedback"] = self._probabilities(pass1_batches, split)
        return result

    def checkpoint_path(self, tag: str) -> Path:
        return self.run_dir / "checkpoints" / f"brain-{tag}.pt"

    def save(self, tag: str) -> str:
        path = self.checkpoint_path(tag)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
        }
        if self.feedback_model is not None:
            state["feedback_model"] = self.feedback_model.state_dict()
            state["feedback_optimizer"] = (
                self.feedback_optimizer.state_dict() if self.feedback_optimizer else {}
            )
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
        check_same_run(payload, self.config.to_dict(), str(path))
        load_state(self.model, payload["state"]["model"], str(path))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(payload["state"]["optimizer"])
        if self.feedback_model is not None:
            load_state(
                self.feedback_model, payload["state"]["feedback_model"], str(path)
            )
            if self.feedback_optimizer is not None:
                self.feedback_optimizer.load_state_dict(
                    payload["state"]["feedback_optimizer"]
                )
            self.feedback_started = True
        self.epoch = int(payload["epoch"])
        log.info("brain loaded %s (epoch %d)", path, self.epoch)
        return self.epoch

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.pull.close(linger=0)
        self.context.term()
