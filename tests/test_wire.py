"""Wire protocol: round trips of every message type and rejection of malformed frames.

Malformed frames are built with msgpack.packb directly, as a faulty or hostile peer
would send them. Run: pytest tests/test_wire.py
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common.wire import (
    ALLOWED_DTYPES,
    ANSWER,
    ARM_OUTPUT,
    ARM_REPLY,
    ARM_REQUEST,
    END_OF_STREAM,
    HEARTBEAT,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REQUEST,
    SCHEMAS,
    WireError,
    decode,
    encode,
)


def sample_fields(message_type: str) -> dict:
    """Valid fields of one message of each type."""
    rng = np.random.default_rng(0)
    samples = {
        ARM_OUTPUT: {
            "token": "0123abcd",
            "arm_id": 2,
            "stream_id": "val:3",
            "batch_id": 7,
            "indices": np.arange(4, dtype=np.int64),
            "features": rng.standard_normal((4, 8)).astype(np.float32),
            "logits": rng.standard_normal((4, 10)).astype(np.float16),
        },
        END_OF_STREAM: {
            "token": "0123abcd",
            "arm_id": 1,
            "stream_id": "train:0",
            "batches": 12,
        },
        HEARTBEAT: {
            "token": "0123abcd",
            "arm_id": 0,
            "time_s": 12.5,
            "epoch": 3,
            "state": "training",
            "pid": 4242,
        },
        REQUEST: {
            "token": "0123abcd",
            "request_id": "c0ffee-17",
            "images": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        },
        ARM_REQUEST: {
            "token": "0123abcd",
            "request_id": "c0ffee-17",
            "images": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
            "expires_s": 1796418434.5,
        },
        ARM_REPLY: {
            "token": "0123abcd",
            "arm_id": 3,
            "request_id": "c0ffee-17",
            "features": rng.standard_normal((2, 8)).astype(np.float32),
            "logits": rng.standard_normal((2, 10)).astype(np.float32),
        },
        ANSWER: {
            "token": "0123abcd",
            "request_id": "c0ffee-17",
            "logits": rng.standard_normal((2, 10)).astype(np.float32),
            "predictions": np.array([3, 1], dtype=np.int64),
            "arm_ids": np.array([0, 2, 3], dtype=np.int64),
            "degraded": True,
            "latency_ms": 12.5,
            "error": "",
            "retryable": False,
        },
    }
    return samples[message_type]


def raw_array(array: np.ndarray) -> dict:
    """An array field in its wire form: dtype name, shape and raw bytes."""
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": array.tobytes(),
    }


def raw_body(message_type: str) -> dict:
    """A valid message body before packing, which each test then corrupts."""
    body = {"v": PROTOCOL_VERSION, "type": message_type}
    for name, value in sample_fields(message_type).items():
        body[name] = raw_array(value) if isinstance(value, np.ndarray) else value
    return body


def pack(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("message_type", sorted(SCHEMAS))
def test_round_trip(message_type):
    fields = sample_fields(message_type)

    decoded = decode(encode(message_type, **fields))

    assert decoded["type"] == message_type
    assert set(decoded) == set(SCHEMAS[message_type]) | {"type"}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            assert decoded[name].dtype == value.dtype, name
            assert decoded[name].shape == value.shape, name
            assert np.array_equal(decoded[name], value), name
            assert not decoded[name].flags.writeable, name
        else:
            assert decoded[name] == value, name
            assert type(decoded[name]) is type(value), name


def test_samples_cover_schemas():
    for message_type in SCHEMAS:
        assert set(sample_fields(message_type)) == set(SCHEMAS[message_type])


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_round_trip_dtype(dtype):
    fields = sample_fields(ARM_OUTPUT)
    fields["features"] = (np.arange(12) % 3).reshape(4, 3).astype(dtype)

    decoded = decode(encode(ARM_OUTPUT, **fields))

    assert decoded["features"].dtype == np.dtype(dtype)
    assert np.array_equal(decoded["features"], fields["features"])


def test_round_trip_big_endian():
    fields = sample_fields(ARM_OUTPUT)
    fields["features"] = np.array([[1.5, -2.0]], dtype=">f4")

    decoded = decode(encode(ARM_OUTPUT, **fields))

    assert np.array_equal(decoded["features"], [[1.5, -2.0]])


@pytest.mark.parametrize("stream_id", ["train", "train:0", "val:12", "test:1:2"])
def test_stream_id_valid(stream_id):
    fields = sample_fields(END_OF_STREAM)
    fields["stream_id"] = stream_id

    assert decode(encode(END_OF_STREAM, **fields))["stream_id"] == stream_id


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"\xc1", "not valid msgpack"),  # 0xc1 is never used by msgpack
        (b"\x93\x01", "not valid msgpack"),  # an array of 3 with 1 element
        (pack({"v": 1}) + b"\x00", "not valid msgpack"),  # trailing bytes
        (b"", "not valid msgpack"),
    ],
)
def test_decode_rejects_non_msgpack(frame, match):
    with pytest.raises(WireError, match=match):
        decode(frame)


@pytest.mark.parametrize("body", [[1, 2, 3], "heartbeat", 7, None])
def test_decode_rejects_non_map(body):
    with pytest.raises(WireError, match="must be a map"):
        decode(pack(body))


def test_decode_rejects_non_bytes():
    with pytest.raises(WireError, match="must be bytes"):
        decode("not bytes")


@pytest.mark.parametrize("version", [0, 1, 3, "2", None, True, 2.0])
def test_decode_rejects_version(version):
    body = raw_body(HEARTBEAT)
    body["v"] = version

    with pytest.raises(WireError, match="protocol version"):
        decode(pack(body))


def test_decode_rejects_missing_version():
    body = raw_body(HEARTBEAT)
    del body["v"]

    with pytest.raises(WireError, match="protocol version"):
        decode(pack(body))


@pytest.mark.parametrize("message_type", ["shutdown", "", 3, None, [1], {"a": 1}])
def test_decode_rejects_unknown_type(message_type):
    body = raw_body(HEARTBEAT)
    body["type"] = message_type

    with pytest.raises(WireError, match="unknown message type"):
        decode(pack(body))


@pytest.mark.parametrize(
    ("message_type", "field"),
    [(t, name) for t in sorted(SCHEMAS) for name in SCHEMAS[t]],
)
def test_decode_rejects_missing_field(message_type, field):
    body = raw_body(message_type)
    del body[field]

    with pytest.raises(WireError, match=repr(field)):
        decode(pack(body))


@pytest.mark.parametrize("message_type", sorted(SCHEMAS))
def test_decode_rejects_extra_field(message_type):
    body = raw_body(message_type)
    body["debug"] = 1

    with pytest.raises(WireError, match="debug"):
        decode(pack(body))


@pytest.mark.parametrize(
    ("message_type", "field", "value"),
    [
        (HEARTBEAT, "arm_id", "0"),
        (HEARTBEAT, "arm_id", 1.0),
        (HEARTBEAT, "epoch", None),
        (HEARTBEAT, "time_s", "now"),
        (HEARTBEAT, "state", 5),
        (HEARTBEAT, "state", "x" * 257),
        (END_OF_STREAM, "batches", [3]),
        (END_OF_STREAM, "stream_id", 0),
        (ARM_OUTPUT, "batch_id", {"id": 1}),
        (ARM_OUTPUT, "features", [[0.0, 1.0]]),
        (ARM_OUTPUT, "indices", b"\x00" * 8),
    ],
)
def test_decode_rejects_field_type(message_type, field, value):
    body = raw_body(message_type)
    body[field] = value

    with pytest.raises(WireError, match=repr(field)):
        decode(pack(body))


@pytest.mark.parametrize(
    ("message_type", "field"),
    [(HEARTBEAT, "arm_id"), (HEARTBEAT, "epoch"), (END_OF_STREAM, "batches")],
)
def test_decode_rejects_bool_as_int(message_type, field):
    body = raw_body(message_type)
    body[field] = True

    with pytest.raises(WireError, match="must be int"):
        decode(pack(body))


def test_decode_rejects_bool_as_float():
    body = raw_body(HEARTBEAT)
    body["time_s"] = False

    with pytest.raises(WireError, match="must be float"):
        decode(pack(body))


@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_decode_rejects_non_bool_flag(value):
    body = raw_body(ANSWER)
    body["degraded"] = value

    with pytest.raises(WireError, match="'degraded' must be bool"):
        decode(pack(body))


@pytest.mark.parametrize(
    ("message_type", "field"),
    [(HEARTBEAT, "arm_id"), (END_OF_STREAM, "batches"), (ARM_OUTPUT, "batch_id")],
)
def test_decode_rejects_negative_int(message_type, field):
    body = raw_body(message_type)
    body[field] = -1

    with pytest.raises(WireError, match=">= 0"):
        decode(pack(body))


@pytest.mark.parametrize("time_s", [float("nan"), float("inf")])
def test_decode_rejects_non_finite_time(time_s):
    body = raw_body(HEARTBEAT)
    body["time_s"] = time_s

    with pytest.raises(WireError, match="finite"):
        decode(pack(body))


@pytest.mark.parametrize("dtype", ["float64", "object", "complex64", "<f4", 4])
def test_decode_rejects_dtype(dtype):
    body = raw_body(ARM_OUTPUT)
    body["features"]["dtype"] = dtype

    with pytest.raises(WireError, match="dtype"):
        decode(pack(body))


@pytest.mark.parametrize("extra_bytes", [-4, -1, 1, 4])
def test_decode_rejects_byte_count(extra_bytes):
    body = raw_body(ARM_OUTPUT)
    data = body["features"]["data"]
    body["features"]["data"] = (
        data[:extra_bytes] if extra_bytes < 0 else data + bytes(extra_bytes)
    )

    with pytest.raises(WireError, match="bytes, but dtype"):
        decode(pack(body))


@pytest.mark.parametrize("shape", [[4, -8], [4, 8.0], [4, True], "4x8", [1] * 9, None])
def test_decode_rejects_shape(shape):
    body = raw_body(ARM_OUTPUT)
    body["features"]["shape"] = shape

    with pytest.raises(WireError, match="invalid shape"):
        decode(pack(body))


@pytest.mark.parametrize(
    "array",
    [
        {"dtype": "float32", "shape": [1]},
        {"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "extra": 1},
        {"dtype": "float32", "shape": [1], "data": "text"},
    ],
)
def test_decode_rejects_array_map(array):
    body = raw_body(ARM_OUTPUT)
    body["features"] = array

    with pytest.raises(WireError, match="'features'"):
        decode(pack(body))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_decode_rejects_non_finite_array(dtype, bad_value):
    features = np.zeros((2, 3), dtype=dtype)
    features[1, 2] = bad_value
    body = raw_body(ARM_OUTPUT)
    body["features"] = raw_array(features)

    with pytest.raises(WireError, match="NaN or infinity"):
        decode(pack(body))


def test_decode_rejects_oversized_frame():
    body = raw_body(HEARTBEAT)
    body["padding"] = bytes(MAX_MESSAGE_BYTES)
    frame = pack(body)

    assert len(frame) > MAX_MESSAGE_BYTES
    with pytest.raises(WireError, match="over the limit"):
        decode(frame)


@pytest.mark.parametrize(
    ("message_type", "stream_id"),
    [
        (ARM_OUTPUT, "training:0"),
        (ARM_OUTPUT, ""),
        (END_OF_STREAM, "bogus:1"),
        (END_OF_STREAM, " val:1"),
        (END_OF_STREAM, "Test:1"),
    ],
)
def test_decode_rejects_stream_id(message_type, stream_id):
    body = raw_body(message_type)
    body["stream_id"] = stream_id

    with pytest.raises(WireError, match="stream id"):
        decode(pack(body))


@pytest.mark.parametrize("value", [[[0.0, 1.0]], 1.0, None, b"\x00" * 4])
def test_encode_rejects_non_array(value):
    fields = sample_fields(ARM_OUTPUT)
    fields["features"] = value

    with pytest.raises(WireError, match="'features'"):
        encode(ARM_OUTPUT, **fields)


def test_encode_rejects_dtype():
    fields = sample_fields(ARM_OUTPUT)
    fields["features"] = fields["features"].astype(np.float64)

    with pytest.raises(WireError, match="dtype float64"):
        encode(ARM_OUTPUT, **fields)


def test_encode_rejects_unknown_type():
    with pytest.raises(WireError, match="unknown message type"):
        encode("shutdown", arm_id=0)


def test_encode_rejects_missing_field():
    fields = sample_fields(HEARTBEAT)
    del fields["state"]

    with pytest.raises(WireError, match="lacks \\['state'\\]"):
        encode(HEARTBEAT, **fields)


def test_encode_rejects_extra_field():
    fields = sample_fields(HEARTBEAT)

    with pytest.raises(WireError, match="extra fields \\['debug'\\]"):
        encode(HEARTBEAT, debug=1, **fields)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("arm_id", True, "must be int"),
        ("arm_id", -2, ">= 0"),
        ("time_s", float("nan"), "finite"),
        ("state", 3, "must be str"),
    ],
)
def test_encode_rejects_field_value(field, value, match):
    fields = sample_fields(HEARTBEAT)
    fields[field] = value

    with pytest.raises(WireError, match=match):
        encode(HEARTBEAT, **fields)


def test_encode_rejects_stream_id():
    fields = sample_fields(END_OF_STREAM)
    fields["stream_id"] = "training:0"

    with pytest.raises(WireError, match="stream id"):
        encode(END_OF_STREAM, **fields)
