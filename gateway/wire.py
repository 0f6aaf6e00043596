"""Hand-written protobuf wire scanning for the forwarding path.

The gateway forwards requests and responses as bytes. Routing needs three
strings from a `ModelInferRequest` (model name, version, id) and the hop needs a
few parameters of a `ModelInferResponse`; a full parse would decode (copy) every
tensor, so these functions walk only the top-level fields and skip the rest by
their length prefix.

Protobuf's parser merges concatenated messages (last scalar wins, map entries
are added), so `id` and extra `parameters` are set by appending bytes.

The batched hop (`meshserve.v1.WorkerHop`) wraps several such messages in one
`InferBatch` / `InferBatchResponse`: a `repeated bytes` field 1, so the
envelope is a tag and a length in front of each message, written here by hand.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from meshserve.protowire import encode_varint

# Field numbers shared by ModelInferRequest and ModelInferResponse.
_MODEL_NAME = 1
_MODEL_VERSION = 2
_ID = 3
_PARAMETERS = 4
# ModelStreamInferResponse.
_ERROR_MESSAGE = 1
_INFER_RESPONSE = 2
# InferBatch.requests / InferBatchResponse.responses.
_BATCH_ENTRY = 1
_BATCH_ENTRY_TAG = bytes((_BATCH_ENTRY << 3 | 2,))
_CANCEL_TAG = bytes((2 << 3 | 2,))  # InferBatch.cancelled
# InferParameter's oneof.
_BOOL_PARAM = 1
_INT64_PARAM = 2
_STRING_PARAM = 3
_DOUBLE_PARAM = 4
_UINT64_PARAM = 5

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LEN = 2
_WIRE_FIXED32 = 5

ParamValue = bool | int | str | float


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


class RequestHead(NamedTuple):
    model_name: str
    model_version: str
    id: bytes


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    """Position after a field value of `wire_type` starting at `pos`."""
    if wire_type == _WIRE_VARINT:
        return _varint(data, pos)[1]
    if wire_type == _WIRE_LEN:
        length, pos = _varint(data, pos)
        end = pos + length
        if end > len(data):
            raise WireError("truncated length-delimited field")
        return end
    if wire_type == _WIRE_FIXED64:
        end = pos + 8
    elif wire_type == _WIRE_FIXED32:
        end = pos + 4
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if end > len(data):
        raise WireError("truncated fixed-width field")
    return end


def _fields(data: bytes, start: int = 0, stop: int | None = None) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) for the top level of a message.

    For length-delimited fields the span excludes the length prefix; for the
    others it is the raw encoded value. Runs once per request and response, so
    one-byte keys and lengths (the common case) take a fast path.
    """
    fields: list[tuple[int, int, int, int]] = []
    pos = start
    end = len(data) if stop is None else stop
    try:
        while pos < end:
            key = data[pos]
            if key < 0x80:
                pos += 1
            else:
                key, pos = _varint(data, pos)
            field = key >> 3
            wire_type = key & 7
            if field == 0:
                raise WireError("field number 0")
            if wire_type == _WIRE_LEN:
                length = data[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = _varint(data, pos)
                value_end = pos + length
                if value_end > end:
                    raise WireError("truncated length-delimited field")
                fields.append((field, wire_type, pos, value_end))
                pos = value_end
            else:
                value_start = pos
                pos = _skip(data, pos, wire_type)
                if pos > end:
                    raise WireError("truncated field")
                fields.append((field, wire_type, value_start, pos))
    except IndexError as exc:
        raise WireError("truncated message") from exc
    return fields


def scan_request(data: bytes) -> RequestHead:
    """Model name, version and id of a serialized `ModelInferRequest` (last occurrence wins)."""
    name = version = b""
    request_id = b""
    for field, wire_type, start, end in _fields(data):
        if field <= _ID:
            if wire_type != _WIRE_LEN:
                raise WireError(f"field {field} has wire type {wire_type}")
            if field == _MODEL_NAME:
                name = data[start:end]
            elif field == _MODEL_VERSION:
                version = data[start:end]
            else:
                request_id = data[start:end]
    try:
        return RequestHead(name.decode(), version.decode(), request_id)
    except UnicodeDecodeError as exc:
        raise WireError("model name or version is not UTF-8") from exc


def _len_field(field: int, payload: bytes) -> bytes:
    return encode_varint(field << 3 | _WIRE_LEN) + encode_varint(len(payload)) + payload


def encode_id(request_id: bytes) -> bytes:
    """The `id` field (3) of a ModelInferRequest/Response, to append."""
    return _len_field(_ID, request_id)


def _encode_param_value(value: ParamValue) -> bytes:
    if isinstance(value, bool):
        return encode_varint(_BOOL_PARAM << 3 | _WIRE_VARINT) + encode_varint(int(value))
    if isinstance(value, int):
        return encode_varint(_INT64_PARAM << 3 | _WIRE_VARINT) + encode_varint(value)
    if isinstance(value, str):
        return _len_field(_STRING_PARAM, value.encode())
    raise TypeError(f"unsupported parameter type {type(value).__name__}")


def encode_parameter(key: str, value: ParamValue) -> bytes:
    """One `parameters` map entry (field 4) of a ModelInferRequest/Response, to append."""
    entry = _len_field(1, key.encode()) + _len_field(2, _encode_param_value(value))
    return _len_field(_PARAMETERS, entry)


def parameter_key(key: str) -> bytes:
    """The encoded key of a parameters entry, prepared once for `encode_int64_parameter`."""
    return _len_field(1, key.encode())


def encode_int64_parameter(key_field: bytes, value: int) -> bytes:
    """An int64 `parameters` entry (per-request deadline) from a key prepared by `parameter_key`."""
    value_bytes = b"\x10" + encode_varint(value)
    entry = key_field + b"\x12" + bytes((len(value_bytes),)) + value_bytes
    return b"\x22" + encode_varint(len(entry)) + entry


def _decode_param_value(data: bytes, start: int, end: int) -> ParamValue | None:
    value: ParamValue | None = None
    for field, wire_type, vstart, vend in _fields(data, start, end):
        if wire_type == _WIRE_VARINT:
            number = _varint(data, vstart)[0]
            if field == _BOOL_PARAM:
                value = bool(number)
            elif field == _INT64_PARAM:
                value = number - (1 << 64) if number >= 1 << 63 else number
            elif field == _UINT64_PARAM:
                value = number
        elif field == _STRING_PARAM and wire_type == _WIRE_LEN:
            value = data[vstart:vend].decode(errors="replace")
        elif field == _DOUBLE_PARAM and wire_type == _WIRE_FIXED64:
            value = struct.unpack_from("<d", data, vstart)[0]
    return value


def _parameter_entry(data: bytes, start: int, end: int) -> tuple[str, ParamValue | None]:
    # Fast path for what workers send: one-byte lengths, key then an int64/bool value.
    if end - start >= 6 and data[start] == 0x0A and data[start + 1] < 0x80:
        key_end = start + 2 + data[start + 1]
        if key_end + 3 <= end and data[key_end] == 0x12 and key_end + 2 + data[key_end + 1] == end:
            tag = data[key_end + 2]
            if tag == 0x10 or tag == 0x08:  # int64_param / bool_param
                number, stop = _varint(data, key_end + 3)
                if stop == end:
                    key = data[start + 2 : key_end].decode(errors="replace")
                    if tag == 0x08:
                        return key, bool(number)
                    return key, number - (1 << 64) if number >= 1 << 63 else number
    key = ""
    value: ParamValue | None = None
    for field, wire_type, vstart, vend in _fields(data, start, end):
        if field == 1 and wire_type == _WIRE_LEN:
            key = data[vstart:vend].decode(errors="replace")
        elif field == 2 and wire_type == _WIRE_LEN:
            value = _decode_param_value(data, vstart, vend)
    return key, value


class ResponseHead(NamedTuple):
    """What the hop needs from a `ModelStreamInferResponse`."""

    error_message: str
    response: bytes  # the serialized ModelInferResponse (b"" when absent)
    id: bytes
    parameters: dict[str, ParamValue | None]


def scan_response(data: bytes, begin: int = 0, stop: int | None = None) -> ResponseHead:
    """Splits a serialized `ModelStreamInferResponse` (`data[begin:stop]`) into error, response bytes, id
    and parameters."""
    error = b""
    response = b""
    for field, wire_type, start, end in _fields(data, begin, stop):
        if wire_type != _WIRE_LEN:
            continue
        if field == _ERROR_MESSAGE:
            error = data[start:end]
        elif field == _INFER_RESPONSE:
            # Repeated occurrences of an embedded message merge; workers send one.
            response = data[start:end] if not response else response + data[start:end]
    request_id = b""
    parameters: dict[str, ParamValue | None] = {}
    for field, wire_type, start, end in _fields(response):
        if wire_type != _WIRE_LEN:
            continue
        if field == _ID:
            request_id = response[start:end]
        elif field == _PARAMETERS:
            key, value = _parameter_entry(response, start, end)
            parameters[key] = value
    return ResponseHead(error.decode(errors="replace"), response, request_id, parameters)


def encode_model_version(version: str) -> bytes:
    """The `model_version` field (2) of a ModelInferRequest/ModelMetadataRequest/ModelReadyRequest, to append."""
    return _len_field(_MODEL_VERSION, version.encode())


def encode_stream_response(response: bytes) -> bytes:
    """A `ModelStreamInferResponse` wrapping a serialized `ModelInferResponse`."""
    return _len_field(_INFER_RESPONSE, response)


def encode_stream_error(message: str, request_id: bytes) -> bytes:
    """A `ModelStreamInferResponse` that reports a failed request (its id kept for the client)."""
    return _len_field(_ERROR_MESSAGE, message.encode()) + _len_field(_INFER_RESPONSE, encode_id(request_id))


def batch_entry_header(length: int) -> bytes:
    """What precedes one `length`-byte message in an `InferBatch` (or `InferBatchResponse`)."""
    return _BATCH_ENTRY_TAG + encode_varint(length)


def cancel_entry(hop_id: bytes) -> bytes:
    """An `InferBatch.cancelled` entry: the worker drops the request with this hop id."""
    return _CANCEL_TAG + encode_varint(len(hop_id)) + hop_id


def batch_entries(data: bytes) -> list[tuple[int, int]]:
    """The (start, end) spans of the messages in a serialized `InferBatchResponse` (or `InferBatch`)."""
    spans = []
    for field, wire_type, start, end in _fields(data):
        if field == _BATCH_ENTRY:
            if wire_type != _WIRE_LEN:
                raise WireError(f"batch entry has wire type {wire_type}")
            spans.append((start, end))
    return spans
