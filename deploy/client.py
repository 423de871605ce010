"""Client of the inference service: send images, get one answer per request id.

client = ServiceClient.from_run("runs/my-run")
answer = client.classify(images)  # uint8 (B, H, W, C)
answer.predictions, answer.arm_ids, answer.degraded

Requests go over a ZeroMQ DEALER socket to the brain's ROUTER. A request with no
answer after `retry_s`, or refused as retryable, is sent again under the same id;
the brain answers a retried id from its cache, and the client keeps the first
answer only. After `max_attempts` sends that got no answer, or `max_attempts *
retry_s` seconds in all, a request is reported lost. A retryable refusal (no live
arm yet, as just after a brain restart) is an answer: it does not use an attempt.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from common import wire

RECONNECT_RETRY_S = 0.02


class ServiceError(RuntimeError):
    """The service could not be reached, or its description file is wrong."""


@dataclass
class Answer:
    """The outcome of one request: an answer, a refusal or `lost`."""

    request_id: str
    predictions: np.ndarray
    logits: np.ndarray
    arm_ids: list[int]
    degraded: bool
    latency_ms: float
    error: str
    attempts: int
    sent_s: float  # wall-clock time of the first send
    answered_s: float  # wall-clock time the answer arrived (or the client gave up)
    lost: bool = False


@dataclass
class _Request:
    frame: bytes
    sent_s: float
    last_send_s: float
    attempts: int = 0
    refusals: int = 0
    retry_at_s: float = 0.0
    meta: dict = field(default_factory=dict)


class ServiceClient:
    """Send requests to the brain and collect one answer per request id."""

    def __init__(
        self,
        endpoint: str,
        token: str,
        retry_s: float = 2.0,
        max_attempts: int = 10,
    ):
        if retry_s <= 0 or max_attempts < 1:
            raise ValueError(
                f"retry_s {retry_s} must be > 0 and max_attempts {max_attempts} >= 1"
            )
        self.token = token
        self.retry_s = retry_s
        self.max_attempts = max_attempts
        self.context = zmq.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        # Queue only on a live connection; a send to a brain that is down is retried.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.connect(endpoint)
        self.pending: dict[str, _Request] = {}
        self.duplicates = 0
        self._prefix = uuid.uuid4().hex[:12]
        self._count = 0

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> ServiceClient:
        """Connect to the service started by `python -m deploy.serve RUN_DIR`."""
        path = Path(run_dir) / "cluster.json"
        try:
            info = json.loads(path.read_text())
            service = info["service"]
            return cls(service["client_endpoint"], service["token"], **kwargs)
        except FileNotFoundError as err:
            raise ServiceError(
                f"{path} not found: start the service with "
                f"`python -m deploy.serve {run_dir}` first"
            ) from err
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ServiceError(
                f"{path} does not describe a running service ({err!r}): restart "
                f"`python -m deploy.serve {run_dir}`"
            ) from err

    def submit(self, images: np.ndarray, request_id: str = "", **meta) -> str:
        """Send a request without waiting; `meta` comes back in `answer_meta`."""
        if not request_id:
            self._count += 1
            request_id = f"{self._prefix}-{self._count}"
        frame = wire.encode(
            wire.REQUEST, token=self.token, request_id=request_id, images=images
        )
        now = time.time()
        self.pending[request_id] = _Request(frame, now, now, meta=meta)
        self._send(request_id)
        return request_id

    def _send(self, request_id: str) -> None:
        request = self.pending[request_id]
        now = time.time()
        request.last_send_s = now
        try:
            self.dealer.send(request.frame, zmq.NOBLOCK)
        except zmq.Again:
            # Not connected yet, or the brain is down: try again shortly.
            request.retry_at_s = now + RECONNECT_RETRY_S
            return
        request.attempts += 1

    def poll(self, timeout_s: float) -> list[tuple[Answer, dict]]:
        """Wait up to `timeout_s` for answers; return (answer, meta) for each ended request."""
        ended = []
        if self.dealer.poll(int(timeout_s * 1000)):
            while True:
                try:
                    frame = self.dealer.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                result = self._on_answer(frame)
                if result is not None:
                    ended.append(result)
        ended.extend(self._retry())
        return ended

    def _on_answer(self, frame: bytes) -> tuple[Answer, dict] | None:
        message = wire.decode(frame)
        if message["type"] != wire.ANSWER:
            raise ServiceError(f"the brain sent a {message['type']} message")
        request = self.pending.get(message["request_id"])
        if request is None:
            self.duplicates += 1  # an answer to a retry that was answered already
            return None
        if message["error"] and message["retryable"]:
            request.refusals += 1
            # Exponential backoff with jitter, so refused clients do not come back
            # in step: 0.1, 0.2, 0.4 ... seconds, at most retry_s.
            backoff_s = min(self.retry_s, 0.05 * 2**request.refusals)
            request.retry_at_s = time.time() + backoff_s * random.uniform(0.5, 1.0)
            return None
        del self.pending[message["request_id"]]
        answer = Answer(
            request_id=message["request_id"],
            predictions=np.asarray(message["predictions"]),
            logits=np.asarray(message["logits"]),
            arm_ids=[int(a) for a in message["arm_ids"]],
            degraded=bool(message["degraded"]),
            latency_ms=float(message["latency_ms"]),
            error=message["error"],
            attempts=request.attempts,
            sent_s=request.sent_s,
            answered_s=time.time(),
        )
        return answer, request.meta

    def _retry(self) -> list[tuple[Answer, dict]]:
        """Resend overdue requests; give up on those out of attempts."""
        now = time.time()
        ended = []
        for request_id, request in list(self.pending.items()):
            due = request.retry_at_s or request.last_send_s + self.retry_s
            if now < due:
                continue
            request.retry_at_s = 0.0
            waited_s = now - request.sent_s
            if (
                request.attempts - request.refusals >= self.max_attempts
                or waited_s > self.max_attempts * self.retry_s
            ):
                del self.pending[request_id]
                answer = Answer(
                    request_id=request_id,
                    predictions=np.zeros(0, dtype=np.int64),
                    logits=np.zeros((0, 0), dtype=np.float32),
                    arm_ids=[],
                    degraded=True,
                    latency_ms=(now - request.sent_s) * 1000,
                    error=f"no answer after {request.attempts} sends "
                    f"({request.refusals} refused as retryable) in {waited_s:.1f} s",
                    attempts=request.attempts,
                    sent_s=request.sent_s,
                    answered_s=now,
                    lost=True,
                )
                ended.append((answer, request.meta))
            else:
                self._send(request_id)
        return ended

    def classify(self, images: np.ndarray, timeout_s: float = 60.0) -> Answer:
        """Send one request and wait for its answer (with retries)."""
        request_id = self.submit(images)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for answer, _ in self.poll(0.05):
                if answer.request_id == request_id:
                    return answer
        raise ServiceError(f"request {request_id} got no answer within {timeout_s} s")

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.context.term()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
