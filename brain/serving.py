"""The brain's inference loop: client requests in, fan-out to the arms, answers back.

Sockets, all bound by the brain: `router` for clients (DEALER), `pub` to publish each
request to the arms (SUB), and the arms' `pull` (PUSH), which carries their replies
and heartbeats. A request is answered when every arm that was live at fan-out has
replied, or at its deadline, from the arms that did reply. Arms that are dead or
late are masked out of the nerve ring and the coordinator, never fed as zeros.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from brain.liveness import DEAD, LIVE, Change, Liveness
from common import wire

log = logging.getLogger(__name__)

MAX_REQUEST_IMAGES = 256
MAX_CLIENT_FRAME_BYTES = 4 * 1024 * 1024
PER_IMAGE_S = 0.002  # deadline allowance per image: the 32-px arm infers ~1 ms each
MAX_PENDING = 64  # requests in progress; more are refused as retryable
ANSWER_CACHE = 20_000  # answers kept for retried request ids
CHECK_INTERVAL_S = 0.01
PROBE_INTERVAL_S = 0.5
PROBE_IMAGES = 8
PROBE_TOLERANCE = 1e-3  # the same checkpoint gives the same features up to fp noise
DRAIN = 256  # messages read per socket per loop turn


@dataclass
class Pending:
    """A request fanned out to the arms, waiting for their replies."""

    identities: list[bytes]  # every client that sent this id
    images: int
    started_s: float
    deadline_s: float
    expected: set[int]
    replies: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class Counters:
    requests: int = 0
    answered: int = 0
    degraded: int = 0
    refused: int = 0
    duplicates: int = 0
    dropped: int = 0


class BrainServer:
    """Serve classification requests with the brain `model` until `stop()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        arms: int,
        dim: int,
        image_shape: tuple[int, int, int],
        token: str,
        context: zmq.Context,
        pull: zmq.Socket,
        host: str,
        pub_port: int,
        client_port: int,
        deadline_s: float,
        liveness: Liveness,
        telemetry=None,
        seed: int = 0,
        client_token: str | None = None,
    ):
        """`token` authenticates the arms' frames and never leaves the brain;
        clients present `client_token` (the same as `token` when not given).
        """
        self.model = model.eval()
        self.arms = arms
        self.dim = dim
        self.image_shape = image_shape
        self.token = token
        self.client_token = token if client_token is None else client_token
        self.deadline_s = deadline_s
        self.liveness = liveness
        self.telemetry = telemetry
        self.pull = pull
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 1000)
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # The largest valid request is MAX_REQUEST_IMAGES images of 32x32x3 bytes
        # plus a header: larger frames end the client's connection unread.
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_FRAME_BYTES)
        self.pub.bind(f"tcp://{host}:{pub_port}")
        self.router.bind(f"tcp://{host}:{client_port}")

        self.pending: dict[str, Pending] = {}
        self.answers: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.counters = Counters()
        self.changes: collections.deque[dict] = collections.deque(maxlen=1000)
        rng = np.random.default_rng(seed)
        self.probe_images = rng.integers(
            0, 256, (PROBE_IMAGES, *image_shape), dtype=np.uint8
        )
        self.probe_reference: dict[int, np.ndarray] = {}
        self.probe_sent_s: dict[int, float] = {}
        self.probe_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="brain-serve", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pub.close(linger=0)
        self.router.close(linger=0)

    def stats(self) -> dict:
        """Counters, each arm's state and the recent state changes (wall-clock times)."""
        return {
            **self.counters.__dict__,
            "pending": len(self.pending),
            "live_arms": list(self.liveness.live_arms()),
            "arms": self.liveness.summary(),
            "changes": list(self.changes),
        }

    # The loop: poll both sockets, then apply timeouts, probes and deadlines.

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                self._turn(poller)
            except Exception:  # one bad turn must not end the service
                log.exception("brain serving loop error; continuing")

    def _turn(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        wait_s = CHECK_INTERVAL_S
        if self.pending:
            next_deadline = min(p.deadline_s for p in self.pending.values())
            wait_s = max(0.0, min(wait_s, next_deadline - now))
        events = dict(poller.poll(int(wait_s * 1000)))
        if self.pull in events:
            for _ in range(DRAIN):
                try:
                    frame = self.pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_arm_message(frame, time.monotonic())
        if self.router in events:
            for _ in range(DRAIN):
                try:
                    identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 1:
                    self._drop(f"client sent {len(frames)} frames, expected 1")
                    continue
                self._on_request(identity, frames[0], time.monotonic())
        now = time.monotonic()
        self._apply(self.liveness.check(now))
        self._probe(now)
        for request_id in [r for r, p in self.pending.items() if now >= p.deadline_s]:
            self._finish(request_id, now, at_deadline=True)

    # Arms: heartbeats and replies.

    def _on_arm_message(self, frame: bytes, now: float) -> None:
        message = self._decode(frame, "arm")
        if message is None:
            return
        arm_id = message.get("arm_id", -1)
        if arm_id >= self.arms:
            self._drop(
                f"{message['type']} from arm {arm_id}, but this run has {self.arms}"
            )
            return
        if message["type"] == wire.HEARTBEAT:
            if message["state"] == "exiting":
                self._apply(self.liveness.leave(arm_id, now, message["pid"]))
            else:
                self._apply(self.liveness.heartbeat(arm_id, now, message["pid"]))
            return
        if message["type"] != wire.ARM_REPLY:
            self._drop(f"{message['type']} message while serving")
            return
        request_id = message["request_id"]
        if request_id.startswith("probe:"):
            self._on_probe_reply(message, now)
            return
        pending = self.pending.get(request_id)
        if pending is None or arm_id not in pending.expected:
            return  # late, or from an arm that was not live at fan-out
        problem = self._check_reply(message, pending.images)
        if problem:
            self._drop(problem)
            return
        pending.replies[arm_id] = (message["features"], message["logits"])
        self.liveness.replied(arm_id)
        if pending.expected <= pending.replies.keys():
            self._finish(request_id, now, at_deadline=False)

    def _check_reply(self, message: dict, rows: int) -> str:
        features, logits = message["features"], message["logits"]
        expected = {
            "features": (rows, self.dim),
            "logits": (rows, self.model.num_classes),
        }
        if features.shape != expected["features"] or logits.shape != expected["logits"]:
            return (
                f"arm {message['arm_id']} replied to {message['request_id']} with "
                f"features {features.shape} and logits {logits.shape}, expected "
                f"{expected['features']} and {expected['logits']}"
            )
        if features.dtype.kind != "f" or logits.dtype.kind != "f":
            return f"arm {message['arm_id']} replied with non-float outputs"
        return ""

    def _on_probe_reply(self, message: dict, now: float) -> None:
        arm_id = message["arm_id"]
        _, target, _ = (message["request_id"].split(":") + ["", ""])[:3]
        if target != str(arm_id) or arm_id not in self.liveness.probing_arms():
            return
        problem = self._check_reply(message, PROBE_IMAGES)
        if problem:
            self._apply(self.liveness.reject(arm_id, now, f"health check: {problem}"))
            return
        features = np.asarray(message["features"], dtype=np.float32)
        reference = self.probe_reference.get(arm_id)
        if reference is not None:
            difference = float(np.abs(features - reference).max())
            if difference > PROBE_TOLERANCE:
                self._apply(
                    self.liveness.reject(
                        arm_id,
                        now,
                        f"health check: features differ by {difference:.3g} from "
                        "this arm's earlier answer (another checkpoint?)",
                    )
                )
                return
        self.probe_reference[arm_id] = features
        waited_ms = (now - self.probe_sent_s.get(arm_id, now)) * 1000
        self._apply(
            self.liveness.admit(
                arm_id, now, f"passed the health check ({waited_ms:.0f} ms)"
            )
        )

    def _probe(self, now: float) -> None:
        for arm_id in self.liveness.probing_arms():
            if now - self.probe_sent_s.get(arm_id, -1e9) < PROBE_INTERVAL_S:
                continue
            self.probe_count += 1
            self.probe_sent_s[arm_id] = now
            self._publish(
                f"probe:{arm_id}:{self.probe_count}",
                self.probe_images,
                PROBE_INTERVAL_S,
            )

    def _publish(self, request_id: str, images: np.ndarray, lifetime_s: float) -> None:
        """Send a request to every arm; arms skip it after `lifetime_s`."""
        # Any local process may subscribe to the PUB socket, so these frames carry no
        # secret. Arms need none: they take requests only from the brain's socket.
        frame = wire.encode(
            wire.ARM_REQUEST,
            token="",
            request_id=request_id,
            images=images,
            expires_s=time.time() + lifetime_s,
        )
        try:
            self.pub.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # not expected with PUB, which drops at its high-water mark
            self.counters.dropped += 1

    # Clients: requests, duplicates and answers.

    def _on_request(self, identity: bytes, frame: bytes, now: float) -> None:
        message = self._decode(frame, "client")
        if message is None:
            return
        if message["type"] != wire.REQUEST:
            self._drop(f"client sent a {message['type']} message, expected request")
            return
        request_id = message["request_id"]
        if request_id.startswith("probe:"):
            self._refuse(
                identity, request_id, "request ids may not start with 'probe:'"
            )
            return
        cached = self.answers.get(request_id)
        if cached is not None or request_id in self.pending:
            # A retry: answer once, from the cache or when the pending request ends.
            self.counters.duplicates += 1
            if cached is not None:
                self.router.send_multipart([identity, cached])
            elif identity not in self.pending[request_id].identities:
                self.pending[request_id].identities.append(identity)
            return
        images = message["images"]
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or tuple(images.shape[1:]) != self.image_shape
            or not 1 <= len(images) <= MAX_REQUEST_IMAGES
        ):
            shape = ", ".join(map(str, self.image_shape))
            self._refuse(
                identity,
                request_id,
                f"images have shape {images.shape} and dtype {images.dtype}; this "
                f"service takes uint8 (B, {shape}) with 1 <= B <= {MAX_REQUEST_IMAGES}",
            )
            return
        self.counters.requests += 1
        live = set(self.liveness.live_arms())
        if not live:
            self._refuse(
                identity, request_id, "no live arm to answer from", retryable=True
            )
            return
        if len(self.pending) >= MAX_PENDING:
            # Load shedding: a burst (clients resending after a brain restart) would
            # make every arm miss its deadlines; the client retries after a backoff.
            self._refuse(
                identity,
                request_id,
                f"overloaded: {len(self.pending)} requests in progress",
                retryable=True,
            )
            return
        deadline_s = self.deadline_s + PER_IMAGE_S * len(images)
        self.pending[request_id] = Pending(
            [identity], len(images), now, now + deadline_s, live
        )
        self._publish(request_id, images, deadline_s)

    @torch.no_grad()
    def _finish(self, request_id: str, now: float, at_deadline: bool) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is None:  # already ended by a state change in this turn
            return
        if at_deadline:
            for arm_id in sorted(pending.expected - pending.replies.keys()):
                self._apply(self.liveness.missed(arm_id, now))
        arm_ids = sorted(pending.replies)
        if not arm_ids:
            self._refuse(
                pending.identities,
                request_id,
                f"no arm answered within the {self.deadline_s * 1000:.0f} ms deadline",
                retryable=True,
            )
            return
        rows = pending.images
        classes = self.model.num_classes
        features = torch.zeros(rows, self.arms, self.dim)
        arm_logits = torch.zeros(rows, self.arms, classes)
        live = torch.zeros(rows, self.arms, dtype=torch.bool)
        for arm_id in arm_ids:
            arm_features, logits = pending.replies[arm_id]
            features[:, arm_id] = torch.tensor(arm_features, dtype=torch.float32)
            arm_logits[:, arm_id] = torch.tensor(logits, dtype=torch.float32)
            live[:, arm_id] = True
        logits, _ = self.model(features, arm_logits, live)
        degraded = len(arm_ids) < self.arms
        latency_ms = (time.monotonic() - pending.started_s) * 1000
        frame = wire.encode(
            wire.ANSWER,
            token="",
            request_id=request_id,
            logits=logits.float().numpy(),
            predictions=logits.argmax(1).numpy().astype(np.int64),
            arm_ids=np.array(arm_ids, dtype=np.int64),
            degraded=degraded,
            latency_ms=latency_ms,
            error="",
            retryable=False,
        )
        self._send_answer(pending.identities, request_id, frame)
        self.counters.answered += 1
        self.counters.degraded += degraded
        if self.telemetry is not None:
            self.telemetry.answered("request", latency_ms, degraded=degraded)

    def _refuse(
        self,
        identity: bytes | list[bytes],
        request_id: str,
        reason: str,
        retryable: bool = False,
    ) -> None:
        """Answer with an error instead of logits; retryable ones are not cached."""
        self.counters.refused += 1
        empty = np.zeros(0, dtype=np.int64)
        frame = wire.encode(
            wire.ANSWER,
            token="",
            request_id=request_id,
            logits=np.zeros((0, self.model.num_classes), dtype=np.float32),
            predictions=empty,
            arm_ids=empty,
            degraded=True,
            latency_ms=0.0,
            error=reason[:256],
            retryable=retryable,
        )
        if retryable:
            for client in [identity] if isinstance(identity, bytes) else identity:
                self.router.send_multipart([client, frame])
        else:
            self._send_answer(identity, request_id, frame)

    def _send_answer(
        self, identity: bytes | list[bytes], request_id: str, frame: bytes
    ) -> None:
        for client in [identity] if isinstance(identity, bytes) else identity:
            self.router.send_multipart([client, frame])
        self.answers[request_id] = frame
        while len(self.answers) > ANSWER_CACHE:
            self.answers.popitem(last=False)

    # Shared helpers.

    def _decode(self, frame: bytes, sender: str) -> dict | None:
        try:
            message = wire.decode(frame)
        except wire.WireError as err:
            self._drop(f"malformed message from a {sender}: {err}")
            return None
        token = self.client_token if sender == "client" else self.token
        if not wire.token_matches(message, token):
            self._drop(f"{message['type']} from outside this run (wrong token)")
            return None
        return message

    def _apply(self, changes: list[Change]) -> None:
        """Log each state change; stop waiting for an arm that is no longer live."""
        for change in changes:
            if change.new != LIVE:
                for request_id, pending in list(self.pending.items()):
                    pending.expected.discard(change.arm_id)
                    if pending.expected <= pending.replies.keys():
                        self._finish(request_id, change.time_s, at_deadline=False)
            live = self.liveness.live_arms()
            log.log(
                logging.WARNING if change.new == DEAD else logging.INFO,
                "arm %d: %s -> %s: %s; answering from %d of %d arms",
                change.arm_id,
                change.old,
                change.new,
                change.reason,
                len(live),
                self.arms,
            )
            self.changes.append(
                {
                    "time": time.time() - (time.monotonic() - change.time_s),
                    "arm_id": change.arm_id,
                    "old": change.old,
                    "new": change.new,
                    "reason": change.reason,
                }
            )
            if self.telemetry is not None:
                self.telemetry.live_arms.set(len(live))

    def _drop(self, reason: str) -> None:
        self.counters.dropped += 1
        if self.counters.dropped <= 10 or self.counters.dropped % 1000 == 0:
            log.warning(
                "brain dropped a message (%d so far): %s", self.counters.dropped, reason
            )
