"""The brain's ZeroMQ socket with real frames: valid outputs gathered, bad ones dropped.

The brain actor class runs in this process (no Ray) behind its real PULL socket on
127.0.0.1; a PUSH socket plays the arms.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from brain.actor import BrainActor
from brain.gather import GatherError
from common import wire
from common.config import RunConfig

CLASSES = 10
ROWS = 8
TOKEN = "run-secret"


@pytest.fixture
def brain(tmp_path):
    config = RunConfig(arms=2, bottleneck=8, heads=4, stream_timeout_s=2.0)
    labels = {"y_train": np.arange(100) % CLASSES, "y_test": np.arange(50) % CLASSES}
    actor = BrainActor(config.to_dict(), CLASSES, labels, str(tmp_path), TOKEN)
    yield actor
    actor.close()


@pytest.fixture
def push(brain):
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(brain.endpoint())
    yield socket
    socket.close()
    context.term()


def output(
    arm_id,
    batch_id,
    stream_id="val:1",
    indices=None,
    dim=8,
    classes=CLASSES,
    token=TOKEN,
):
    rng = np.random.default_rng(arm_id * 100 + batch_id)
    if indices is None:
        indices = np.arange(batch_id * ROWS, (batch_id + 1) * ROWS, dtype=np.int64)
    return wire.encode(
        wire.ARM_OUTPUT,
        token=token,
        arm_id=arm_id,
        stream_id=stream_id,
        batch_id=batch_id,
        indices=indices,
        features=rng.standard_normal((len(indices), dim)).astype(np.float32),
        logits=rng.standard_normal((len(indices), classes)).astype(np.float32),
    )


def end(arm_id, batches, stream_id="val:1"):
    return wire.encode(
        wire.END_OF_STREAM,
        token=TOKEN,
        arm_id=arm_id,
        stream_id=stream_id,
        batches=batches,
    )


BAD_FRAMES = {
    "garbage": b"\x00\xffnot msgpack",
    "non-map": msgpack.packb([1, 2, 3]),
    "wrong version": msgpack.packb({"v": 99, "type": "heartbeat"}),
    "unknown arm": output(7, 0),
    "other stream": output(0, 0, stream_id="val:2"),
    "index out of range": output(0, 5, indices=np.array([0, 1000], dtype=np.int64)),
    "negative index": output(1, 5, indices=np.array([-1, 2], dtype=np.int64)),
    "wrong feature size": output(0, 6, dim=3),
    "wrong class count": output(1, 6, classes=4),
    "forged by another process": output(1, 0, token="guessed"),
    "huge dimension": msgpack.packb(
        {
            "v": wire.PROTOCOL_VERSION,
            "type": wire.ARM_OUTPUT,
            "token": TOKEN,
            "arm_id": 0,
            "stream_id": "val:1",
            "batch_id": 9,
            "indices": {"dtype": "int64", "shape": [0, 2**63], "data": b""},
            "features": {"dtype": "float32", "shape": [0, 8], "data": b""},
            "logits": {"dtype": "float32", "shape": [0, 10], "data": b""},
        }
    ),
}


def test_bad_frames_dropped_stream_scored(brain, push):
    for frame in BAD_FRAMES.values():
        push.send(frame)
    for arm_id in (0, 1):
        for batch_id in (0, 1):
            push.send(output(arm_id, batch_id))
        push.send(end(arm_id, 2))

    result = brain.evaluate_stream("val:1", "val", [0, 1], expected=2)

    assert result["samples"] == 2 * ROWS
    assert brain.dropped_messages == len(BAD_FRAMES)
    assert 0.0 <= result["accuracy"] <= 1.0


def test_missing_batch_raises(brain, push):
    push.send(output(0, 0))
    push.send(output(1, 0))
    push.send(output(0, 1))  # arm 1 never sends batch 1
    push.send(end(0, 2))
    push.send(end(1, 2))

    with pytest.raises(GatherError, match="incomplete"):
        brain.evaluate_stream("val:1", "val", [0, 1])


def test_silent_arm_times_out(brain, push):
    push.send(output(0, 0))
    push.send(end(0, 1))

    with pytest.raises(TimeoutError, match=r"arms \[1\] have not finished"):
        brain.evaluate_stream("val:1", "val", [0, 1])
