"""The arm process: a Ray actor that trains one arm locally and streams its outputs.

The launcher creates one `ArmActor` per arm (`ray.remote(ArmActor)`). It trains
with no communication at all during its local phase, then pushes `features` and
`logits` for each batch to the brain over a ZeroMQ PUSH socket (msgpack frames).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from arms.augment import random_crop_flip, resize, to_tensor
from arms.feedback import feedback_rows
from arms.model import build_arm
from arms.serving import ArmServer
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
from common.telemetry import ArmTelemetry

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0
TELEMETRY_STEPS = 10  # dashboard gauges are set every this many steps


def select_device(requested: str) -> torch.device:
    """cuda when asked for or available (`auto`), else cpu."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda was requested but this process sees no CUDA device: "
            "pass --gpus with a GPU count, or --device cpu"
        )
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or (auto) on CUDA devices that support it.

    On CPU, `auto` stays fp32: on the 2-core AMD EPYC this was developed on (no
    avx512_bf16), bf16 autocast trained the 32-px arm 5x slower than fp32.
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Shuffle `indices` for an epoch, the same way in every process."""
    return indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]


class ArmActor:
    """One arm: local Forward-Forward training, output streaming and checkpoints."""

    def __init__(
        self,
        config: dict,
        arm_id: int,
        data: dict[str, np.ndarray],
        run_dir: str,
        threads: int,
        brain_endpoint: str,
        token: str,
        serve: dict | None = None,
    ):
        """`serve` turns this arm into a part of the inference service: a dict with
        the brain's `pub_endpoint` and the checkpoint `tag` to load (`data` unused).
        """
        self.config = RunConfig.from_dict(config)
        setup_logging(os.environ.get("OCTOPUSNET_LOG_LEVEL", "INFO"))
        torch.set_num_threads(threads)
        self.arm_id = arm_id
        self.token = token
        self.data = data
        self.run_dir = Path(run_dir)
        self.info = DATASET_INFO[self.config.dataset]
        self.device = select_device(self.config.device)
        self.autocast = autocast_dtype(self.config.precision, self.device)
        torch.manual_seed(self.config.seed * 1000 + arm_id)
        self.generator = torch.Generator().manual_seed(self.config.seed * 1000 + arm_id)

        self.model = build_arm(self.config, arm_id, self.info).to(self.device)
        steps = self.config.epochs * self._steps_per_epoch()
        self.model.configure_optimizer(self.config.lr, self.config.weight_decay, steps)
        self.epoch = 0
        self._progress = {"epoch": 0, "phase": "ready", "step": 0, "total": 0}
        self.telemetry = ArmTelemetry(arm_id)
        restarted = reconstructed()
        if restarted:
            self.telemetry.restarted()

        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 64)
        self.push.setsockopt(zmq.SNDTIMEO, int(self.config.stream_timeout_s * 1000))
        self.push.setsockopt(zmq.LINGER, 5000)
        self.push.connect(brain_endpoint)
        self.stream_lock = threading.Lock()
        self.server = None
        if serve:
            self._start_serving(serve, brain_endpoint, restarted)
        elif restarted:
            self._resume()
        log.info(
            "arm %d ready: %s, %d px, %d blocks, %d parameters, %s, %d threads, pid %d",
            arm_id,
            type(self.model).__name__,
            self.model.resolution,
            len(self.model.blocks),
            sum(p.numel() for p in self.model.parameters()),
            self.device,
            threads,
            os.getpid(),
        )

    def _steps_per_epoch(self) -> int:
        if self.data is None:  # serving: no optimizer steps
            return 1
        return len(self.data["train_idx"]) // self.config.batch_size

    def _resume(self) -> None:
        """After a restart mid-training: continue from this arm's newest checkpoint."""
        if self.checkpoint_path("last").is_file():
            epoch = self.load("last")
            log.warning(
                "arm %d restarted (pid %d); resumed from its checkpoint of epoch %d",
                self.arm_id,
                os.getpid(),
                epoch,
            )
        else:
            log.warning(
                "arm %d restarted (pid %d) before its first checkpoint; starting over",
                self.arm_id,
                os.getpid(),
            )

    def _start_serving(self, serve: dict, pull_endpoint: str, restarted: bool) -> None:
        epoch = self.load(serve["tag"])
        info = self.info
        self.server = ArmServer(
            self.arm_id,
            self._infer_images,
            self.token,
            (info.image_size, info.image_size, info.channels),
            self.context,
            pull_endpoint,
            serve["pub_endpoint"],
            self.config.heartbeat_interval_s,
            epoch,
        )
        self.server.start()
        # A process that Ray or a signal shuts down gracefully stops heartbeating at
        # once, so the brain leaves it out without waiting for it to exit.
        atexit.register(self.server.halt)
        log.info(
            "arm %d %sserving its %s checkpoint (epoch %d), pid %d",
            self.arm_id,
            "restarted and " if restarted else "",
            serve["tag"],
            epoch,
            os.getpid(),
        )

    def _infer_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features and logits for uint8 images (B, H, W, C) at this arm's resolution."""
        x = resize(to_tensor(images), self.model.resolution)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        features, logits = self.model.infer(
            x, self.autocast, head_logits=self.config.brain_mode != "attention"
        )
        return features.cpu().numpy(), logits.cpu().numpy()

    def _images(self, split: str, indices: np.ndarray, augment: bool) -> torch.Tensor:
        source = self.data["x_test"] if split == "test" else self.data["x_train"]
        x = to_tensor(source[indices])
        if augment:
            x = random_crop_flip(
                x, pad=max(1, x.shape[-1] // 8), generator=self.generator
            )
        x = resize(x, self.model.resolution)
        return x.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )

    def process_id(self) -> int:
        return os.getpid()

    def progress(self) -> dict:
        """Return the current phase, step and latest metrics, also while the arm trains."""
        return dict(self._progress)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one local epoch; return mean metrics and throughput."""
        self.epoch = epoch
        order = epoch_order(
            self.data["train_idx"], self.config.seed + self.arm_id, epoch
        )
        batch_size = self.config.batch_size
        steps = len(order) // batch_size  # the last partial batch is dropped
        totals: dict[str, float] = {}
        start = last_log = time.perf_counter()
        for step in range(steps):
            batch = np.sort(order[step * batch_size : (step + 1) * batch_size])
            images = self._images("train", batch, augment=self.config.augment)
            labels = torch.from_numpy(self.data["y_train"][batch]).to(self.device)
            metrics = self.model.train_step(images, labels, self.autocast)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value
            self._progress = {
                "epoch": epoch,
                "phase": "local",
                "step": step + 1,
                "total": steps,
                "metrics": {"ff_loss": metrics["ff_loss"]},
            }
            now = time.perf_counter()
            if step % TELEMETRY_STEPS == 0:
                self.telemetry.record(
                    {
                        **metrics,
                        "epoch": epoch,
                        "images_per_s": (step + 1) * batch_size / (now - start),
                    }
                )
            if now - last_log >= LOG_INTERVAL_S:
                last_log = now
                log.info(
                    "arm %d epoch %d step %d/%d: ff_loss %.3f, goodness pos %.3f / neg "
                    "%.3f, %.0f img/s",
                    self.arm_id,
                    epoch,
                    step + 1,
                    steps,
                    metrics["ff_loss"],
                    metrics["goodness_pos"],
                    metrics["goodness_neg"],
                    (step + 1) * batch_size / (now - start),
                )
        seconds = time.perf_counter() - start
        result = {name: value / max(1, steps) for name, value in totals.items()}
        result.update(
            arm_id=self.arm_id,
            epoch=epoch,
            seconds=seconds,
            images_per_s=steps * batch_size / seconds,
            lr=self.model.optimizer.param_groups[0]["lr"],
        )
        self.telemetry.record(result)
        # A restart from here on resumes with this epoch's training done.
        self.save("last")
        log.info(
            "arm %d epoch %d done: ff_loss %.3f, goodness pos %.3f / neg %.3f, local "
            "accuracy %.3f, %.0f img/s, %.1f s",
            self.arm_id,
            epoch,
            result.get("ff_loss", float("nan")),
            result.get("goodness_pos", float("nan")),
            result.get("goodness_neg", float("nan")),
            result.get("accuracy", float("nan")),
            result["images_per_s"],
            seconds,
        )
        return result

    def train_feedback(self, epoch: int, feedback: dict) -> dict[str, float]:
        """Train the feedback gain for one pass over the training images.

        `feedback` contains the brain's class probabilities (`probs`, (N, C)) for the
        dataset `indices` of the training images. The images are not augmented,
        because the probabilities are the brain's for the plain images.
        """
        self.epoch = epoch
        order = epoch_order(
            self.data["train_idx"], self.config.seed + self.arm_id, 20_000 + epoch
        )
        batch_size = self.config.batch_size
        steps = len(order) // batch_size
        totals: dict[str, float] = {}
        start = time.perf_counter()
        for step in range(steps):
            batch = np.sort(order[step * batch_size : (step + 1) * batch_size])
            images = self._images("train", batch, augment=False)
            labels = torch.from_numpy(self.data["y_train"][batch]).to(self.device)
            probs = self._probs(feedback, batch)
            metrics = self.model.train_feedback_step(
                images, labels, probs, self.autocast
            )
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value
            self._progress = {
                "epoch": epoch,
                "phase": "feedback",
                "step": step + 1,
                "total": steps,
                "metrics": {"head_loss": metrics["feedback_head_loss"]},
            }
        seconds = time.perf_counter() - start
        result = {name: value / max(1, steps) for name, value in totals.items()}
        result.update(arm_id=self.arm_id, feedback_seconds=seconds)
        # A restart from here on resumes with the trained gain.
        self.save("last")
        log.info(
            "arm %d epoch %d feedback done: readout loss %.3f, head loss %.3f, "
            "head accuracy %.3f, %.1f s",
            self.arm_id,
            epoch,
            result.get("feedback_readout_loss", float("nan")),
            result.get("feedback_head_loss", float("nan")),
            result.get("feedback_accuracy", float("nan")),
            seconds,
        )
        return result

    def _probs(self, feedback: dict, batch: np.ndarray) -> torch.Tensor:
        rows = feedback_rows(feedback["indices"], feedback["probs"], batch)
        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)

    def stream(self, split: str, stream_id: str, feedback: dict | None = None) -> int:
        """Push outputs for every batch of `split` to the brain; return the batch count.

        With `feedback` (the brain's `probs` for the dataset `indices` of `split`),
        the outputs are those of pass 2. One stream at a time: a retried stream
        waits until an abandoned one has been sent (the brain reads and drops it),
        as both use the one PUSH socket.
        """
        with self.stream_lock:
            return self._stream(split, stream_id, feedback)

    def _stream(self, split: str, stream_id: str, feedback: dict | None) -> int:
        if split == "train":
            indices = epoch_order(
                self.data["train_idx"], self.config.seed, 10_000 + self.epoch
            )
        elif split == "val":
            indices = self.data["val_idx"]
        elif split == "test":
            indices = self.data["test_idx"]
        else:
            raise ValueError(f"invalid split {split!r}: choose train, val or test")
        batch_size = self.config.batch_size
        total = -(-len(indices) // batch_size)
        batches = 0
        for start in range(0, len(indices), batch_size):
            self._progress = {
                "epoch": self.epoch,
                "phase": f"stream {split}",
                "step": batches,
                "total": total,
            }
            batch = indices[start : start + batch_size]
            images = self._images(split, batch, False)
            head_logits = self.config.brain_mode != "attention"
            if feedback is None:
                features, logits = self.model.infer(
                    images, self.autocast, head_logits=head_logits
                )
            else:
                features, logits = self.model.infer_feedback(
                    images, self._probs(feedback, batch), self.autocast, head_logits
                )
            frame = wire.encode(
                wire.ARM_OUTPUT,
                token=self.token,
                arm_id=self.arm_id,
                stream_id=stream_id,
                batch_id=batches,
                indices=batch.astype(np.int64),
                features=features.cpu().numpy(),
                logits=logits.cpu().numpy(),
            )
            self._send(frame, stream_id)
            batches += 1
        self._send(
            wire.encode(
                wire.END_OF_STREAM,
                token=self.token,
                arm_id=self.arm_id,
                stream_id=stream_id,
                batches=batches,
            ),
            stream_id,
        )
        return batches

    def _send(self, frame: bytes, stream_id: str) -> None:
        try:
            self.push.send(frame, copy=False)
        except zmq.Again as err:
            raise TimeoutError(
                f"arm {self.arm_id} could not send {stream_id} to the brain within "
                f"{self.config.stream_timeout_s:.0f} s: the brain is not receiving"
            ) from err

    def checkpoint_path(self, tag: str) -> Path:
        return self.run_dir / "checkpoints" / f"arm-{self.arm_id}-{tag}.pt"

    def save(self, tag: str) -> str:
        path = self.checkpoint_path(tag)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.model.optimizer.state_dict(),
            "scheduler": self.model.scheduler.state_dict(),
        }
        if self.model.feedback_optimizer is not None:
            state["feedback_optimizer"] = self.model.feedback_optimizer.state_dict()
        save_checkpoint(
            path,
            {
                "kind": "arm",
                "arm_id": self.arm_id,
                "epoch": self.epoch,
                "config": self.config.to_dict(),
                "state": state,
            },
        )
        return str(path)

    def load(self, tag: str) -> int:
        """Load a checkpoint of this arm; return the epoch it was saved at."""
        path = self.checkpoint_path(tag)
        payload = load_checkpoint(path, "arm", self.arm_id)
        check_same_run(payload, self.config.to_dict(), str(path))
        load_state(self.model, payload["state"]["model"], str(path))
        self.model.optimizer.load_state_dict(payload["state"]["optimizer"])
        self.model.scheduler.load_state_dict(payload["state"]["scheduler"])
        if self.model.feedback_optimizer is not None:
            self.model.feedback_optimizer.load_state_dict(
                payload["state"]["feedback_optimizer"]
            )
        self.epoch = int(payload["epoch"])
        log.info("arm %d loaded %s (epoch %d)", self.arm_id, path, self.epoch)
        return self.epoch

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.push.close(linger=0)
        self.context.term()
