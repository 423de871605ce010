"""The arm's side of the inference service: heartbeats, and replies to requests.

Two threads per arm. One pushes a heartbeat every `heartbeat_interval_s`. The other
reads requests from the brain's PUB socket, runs every queued request through the
arm in one batch, and pushes one reply per request. Sends never block: while the
brain is down, heartbeats and replies are dropped, and ZeroMQ reconnects by itself
when a restarted brain binds its ports again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from common import wire

log = logging.getLogger(__name__)

POLL_MS = 100
SERVING, EXITING = "serving", "exiting"  # heartbeat states
MAX_BATCH_IMAGES = 2048  # images run through the arm in one forward pass

InferFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ArmServer:
    """Answer the brain's requests with `infer` (uint8 images -> features, logits)."""

    def __init__(
        self,
        arm_id: int,
        infer: InferFn,
        token: str,
        image_shape: tuple[int, int, int],
        context: zmq.Context,
        pull_endpoint: str,
        pub_endpoint: str,
        heartbeat_interval_s: float,
        epoch: int,
    ):
        self.arm_id = arm_id
        self.infer = infer
        self.token = token
        self.image_shape = image_shape
        self.context = context
        self.pull_endpoint = pull_endpoint
        self.pub_endpoint = pub_endpoint
        self.heartbeat_interval_s = heartbeat_interval_s
        self.epoch = epoch
        self.replies = 0
        self.expired = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._heartbeats, name="arm-heartbeat", daemon=True
            ),
            threading.Thread(target=self._serve, name="arm-serve", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def halt(self) -> None:
        """Stop, and tell the brain this arm is exiting while the process shuts down.

        A graceful shutdown (SIGTERM, ray.kill) can take a second. The brain leaves
        the arm out as soon as this heartbeat arrives, not at its timeout.
        """
        self._stop.set()
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 200)  # ms to deliver it before the process ends
        push.connect(self.pull_endpoint)
        push.send(self._heartbeat(EXITING), zmq.NOBLOCK)
        push.close()

    def _heartbeat(self, state: str) -> bytes:
        return wire.encode(
            wire.HEARTBEAT,
            token=self.token,
            arm_id=self.arm_id,
            time_s=time.time(),
            epoch=self.epoch,
            state=state,
            pid=os.getpid(),
        )

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _push_socket(self, hwm: int) -> zmq.Socket:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, hwm)
        push.setsockopt(zmq.LINGER, 0)
        # Queue only on a live connection: nothing stale reaches a restarted brain.
        push.setsockopt(zmq.IMMEDIATE, 1)
        push.connect(self.pull_endpoint)
        return push

    def _heartbeats(self) -> None:
        push = self._push_socket(hwm=4)
        try:
            while not self._stop.is_set():
                try:
                    push.send(self._heartbeat(SERVING), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # no brain connected: the next heartbeat tries again
                self._stop.wait(self.heartbeat_interval_s)
        finally:
            push.close(linger=0)

    def _serve(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.pub_endpoint)
        push = self._push_socket(hwm=1000)
        try:
            while not self._stop.is_set():
                if not sub.poll(POLL_MS):
                    continue
                requests = self._read_requests(sub)
                if requests:
                    try:
                        self._reply(push, requests)
                    except Exception:  # a failed batch must not end the arm's service
                        log.exception(
                            "arm %d failed to reply to requests %s",
                            self.arm_id,
                            [request_id for request_id, _ in requests],
                        )
        finally:
            sub.close(linger=0)
            push.close(linger=0)

    def _read_requests(self, sub: zmq.Socket) -> list[tuple[str, np.ndarray]]:
        """Read every queued request, up to MAX_BATCH_IMAGES images in all."""
        requests, images = [], 0
        while images < MAX_BATCH_IMAGES:
            try:
                frame = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                message = wire.decode(frame)
            except wire.WireError as err:
                log.warning("arm %d dropped a malformed request: %s", self.arm_id, err)
                continue
            # Requests come from the brain's PUB socket, which only the brain binds;
            # they carry no token, so a subscriber learns no secret from them.
            if message["type"] != wire.ARM_REQUEST:
                continue
            # NOTE: compares wall clocks of the brain's host and this one; across
            # nodes, clock skew beyond the deadline would drop or keep requests.
            if time.time() > message["expires_s"]:
                self.expired += 1  # the brain has answered without this arm already
                continue
            batch = message["images"]
            if batch.dtype != np.uint8 or tuple(batch.shape[1:]) != self.image_shape:
                log.warning(
                    "arm %d dropped request %s: images %s %s, expected uint8 (B, %s)",
                    self.arm_id,
                    message["request_id"],
                    batch.shape,
                    batch.dtype,
                    self.image_shape,
                )
                continue
            requests.append((message["request_id"], batch))
            images += len(batch)
        return requests

    def _reply(self, push: zmq.Socket, requests: list[tuple[str, np.ndarray]]) -> None:
        features, logits = self.infer(np.concatenate([b for _, b in requests]))
        start = 0
        for request_id, batch in requests:
            end = start + len(batch)
            frame = wire.encode(
                wire.ARM_REPLY,
                token=self.token,
                arm_id=self.arm_id,
                request_id=request_id,
                features=features[start:end],
                logits=logits[start:end],
            )
            start = end
            try:
                push.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                log.debug("arm %d: no brain to reply to %s", self.arm_id, request_id)
            self.replies += 1
