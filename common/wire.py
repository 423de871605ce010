"""Wire protocol between arms and the brain: one msgpack map per ZeroMQ frame.

Every message has `v` (protocol version), `type` and the fields of its type.
Arrays travel as `{"dtype", "shape", "data"}` with raw little-endian bytes.
Decoding checks the size, the version, the type, every field's type and every
array's dtype, shape and byte count; nothing is ever unpickled.
"""

from __future__ import annotations

import hmac
import math
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_DIMENSION = 2**31 - 1  # per axis; NumPy rejects far larger shapes with ValueError
ALLOWED_DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")

ARM_OUTPUT = "arm_output"
END_OF_STREAM = "end_of_stream"
HEARTBEAT = "heartbeat"
REQUEST = "request"
ARM_REQUEST = "arm_request"
ARM_REPLY = "arm_reply"
ANSWER = "answer"

SPLITS = ("train", "val", "test")

# Field name -> expected kind, per message type. "array" fields are NumPy arrays.
# Every message carries the run's token, a random secret the launcher hands to its
# actors, so the brain can drop frames that another process on the host sends.
SCHEMAS: dict[str, dict[str, str]] = {
    ARM_OUTPUT: {
        "token": "str",
        "arm_id": "int",
        "stream_id": "str",
        "batch_id": "int",
        "indices": "array",
        "features": "array",
        "logits": "array",
    },
    END_OF_STREAM: {
        "token": "str",
        "arm_id": "int",
        "stream_id": "str",
        "batches": "int",
    },
    HEARTBEAT: {
        "token": "str",
        "arm_id": "int",
        "time_s": "float",
        "epoch": "int",
        "state": "str",
        "pid": "int",
    },
    # Inference: a client sends REQUEST to the brain, the brain publishes it to the
    # arms, each arm sends an ARM_REPLY, and the brain sends the client an ANSWER.
    REQUEST: {
        "token": "str",
        "request_id": "str",
        "images": "array",
    },
    # The brain's copy of a request for the arms: an arm skips it once `expires_s`
    # (wall clock) has passed, as the brain has answered without it by then.
    ARM_REQUEST: {
        "token": "str",
        "request_id": "str",
        "images": "array",
        "expires_s": "float",
    },
    ARM_REPLY: {
        "token": "str",
        "arm_id": "int",
        "request_id": "str",
        "features": "array",
        "logits": "array",
    },
    # `error` is empty for an answer; otherwise it says why the request was refused,
    # and `retryable` whether the same request may succeed later.
    ANSWER: {
        "token": "str",
        "request_id": "str",
        "logits": "array",
        "predictions": "array",
        "arm_ids": "array",
        "degraded": "bool",
        "latency_ms": "float",
        "error": "str",
        "retryable": "bool",
    },
}


class WireError(ValueError):
    """A message could not be encoded or decoded. The error names the field that failed."""


def token_matches(message: dict[str, Any], token: str) -> bool:
    """Constant-time check of a decoded message's token (any characters allowed)."""
    return hmac.compare_digest(message["token"].encode(), token.encode())


def encode(message_type: str, **fields: Any) -> bytes:
    """Encode one message; raises WireError if a field is missing, extra or mistyped."""
    _check_fields(message_type, fields)
    body = {"v": PROTOCOL_VERSION, "type": message_type}
    for name, kind in SCHEMAS[message_type].items():
        value = fields[name]
        body[name] = _encode_array(name, value) if kind == "array" else value
    frame = msgpack.packb(body, use_bin_type=True)
    if len(frame) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"{message_type} message is {len(frame)} bytes, over the limit of "
            f"{MAX_MESSAGE_BYTES}: send smaller batches"
        )
    return frame


def decode(frame: bytes) -> dict[str, Any]:
    """Decode and validate one frame; arrays come back as read-only NumPy arrays."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"frame must be bytes, got {type(frame).__name__}")
    if len(frame) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"frame of {len(frame)} bytes is over the limit of {MAX_MESSAGE_BYTES}"
        )
    try:
        body = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_array_len=1024,
            max_map_len=64,
            max_str_len=4096,
        )
    except (msgpack.UnpackException, ValueError, TypeError) as err:
        raise WireError(
            f"frame is not valid msgpack: {err} (starts {bytes(frame[:32])!r})"
        ) from err
    if not isinstance(body, dict):
        raise WireError(
            f"message must be a map, got {type(body).__name__}: {_preview(body)}"
        )
    version = body.get("v")
    # True and 1.0 compare equal to 1, so the type is checked as well.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {version!r} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}): run the same OctopusNet release on every node"
        )
    message_type = body.get("type")
    if not isinstance(message_type, str) or message_type not in SCHEMAS:
        raise WireError(
            f"unknown message type {_preview(message_type)}: expected one of {sorted(SCHEMAS)}"
        )
    fields = {k: v for k, v in body.items() if k not in ("v", "type")}
    extra = sorted(map(repr, set(fields) - set(SCHEMAS[message_type])))
    if extra:
        raise WireError(f"{message_type} message has extra fields {_preview(extra)}")
    decoded = {}
    for name, kind in SCHEMAS[message_type].items():
        if name not in fields:
            raise WireError(f"{message_type} message lacks the field {name!r}")
        value = fields[name]
        decoded[name] = _decode_array(name, value) if kind == "array" else value
    _check_fields(message_type, decoded)
    decoded["type"] = message_type
    return decoded


def _check_fields(message_type: str, fields: dict[str, Any]) -> None:
    schema = SCHEMAS.get(message_type)
    if schema is None:
        raise WireError(
            f"unknown message type {message_type!r}: expected one of {sorted(SCHEMAS)}"
        )
    extra = sorted(set(fields) - set(schema))
    missing = sorted(set(schema) - set(fields))
    if extra or missing:
        raise WireError(
            f"{message_type} message has extra fields {extra} and lacks {missing}"
        )
    for name, kind in schema.items():
        value = fields[name]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str) and len(value) <= 256,
            "bool": isinstance(value, bool),
            "array": isinstance(value, np.ndarray),
        }[kind]
        if not ok:
            raise WireError(
                f"{message_type} field {name!r} must be {kind}, got {_preview(value)}"
            )
        if kind == "int" and value < 0:
            raise WireError(f"{message_type} field {name!r} must be >= 0, got {value}")
        if kind == "float" and not math.isfinite(value):
            raise WireError(
                f"{message_type} field {name!r} must be finite, got {value}"
            )
    if "stream_id" in fields:
        stream = fields["stream_id"].split(":")[0]
        if stream not in SPLITS:
            raise WireError(
                f"{message_type} stream id {fields['stream_id']!r} must start with one "
                f"of {SPLITS}"
            )


def _encode_array(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, np.ndarray):
        raise WireError(
            f"field {name!r} must be a NumPy array, got {type(value).__name__}"
        )
    if value.dtype.name not in ALLOWED_DTYPES:
        raise WireError(
            f"field {name!r} has dtype {value.dtype}, allowed: {ALLOWED_DTYPES}"
        )
    data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": value.dtype.name,
        "shape": list(value.shape),
        "data": data.tobytes(),
    }


def _decode_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise WireError(f"array field {name!r} must be a map of dtype, shape and data")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if dtype not in ALLOWED_DTYPES:
        raise WireError(
            f"array field {name!r} has dtype {_preview(dtype)}, allowed: {ALLOWED_DTYPES}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIMENSION
            for d in shape
        )
    ):
        raise WireError(f"array field {name!r} has an invalid shape {_preview(shape)}")
    if not isinstance(data, bytes):
        raise WireError(
            f"array field {name!r} data must be bytes, got {type(data).__name__}"
        )
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise WireError(
            f"array field {name!r} has {len(data)} bytes, but dtype {dtype} and shape "
            f"{shape} need {expected}"
        )
    try:
        array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    except ValueError as err:
        raise WireError(
            f"array field {name!r} with shape {shape} is invalid: {err}"
        ) from err
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise WireError(f"array field {name!r} contains NaN or infinity")
    return array


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
