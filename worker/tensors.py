"""KServe v2 tensors <-> numpy: datatypes, raw and typed contents, BYTES framing, validation.

Validation happens here, before a request joins a batch, so a bad request is
refused alone. Messages name the tensor and say what was expected and what came.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.errors import invalid

# KServe datatype -> numpy dtype (BYTES is an object array of bytes/str).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# ONNX Runtime's type strings -> KServe datatype.
ONNX_TO_KSERVE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def onnx_numpy_dtype(onnx_type: str) -> np.dtype | None:
    """The NumPy dtype of a numeric ONNX Runtime tensor type (`tensor(float)`); None for strings and unknowns."""
    datatype = ONNX_TO_KSERVE.get(onnx_type)
    if datatype is None or datatype == "BYTES":
        return None
    return NUMPY_DTYPES[datatype]


# Which `InferTensorContents` field carries each datatype when sent typed.
# FP16 has no field of its own; like other v2 servers we accept fp32_contents.
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model: -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_shape(spec: TensorSpec, shape: Sequence[int]) -> None:
    """Raises INVALID_ARGUMENT unless `shape` fits `spec.shape` (-1 matches any size)."""
    if len(shape) != len(spec.shape) or any(
        got < 0 or (want != -1 and got != want) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise invalid(f"input '{spec.name}': expected shape {format_shape(spec.shape)}, got {format_shape(shape)}")


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """BYTES raw contents: each element is a 4-byte little-endian length, then that many bytes."""
    items: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if offset + 4 > size:
            raise invalid(f"input '{name}': BYTES element {len(items)} has a truncated 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise invalid(
                f"input '{name}': BYTES element {len(items)} declares {length} bytes, only {size - offset} remain"
            )
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise invalid(f"input '{name}': expected {count} BYTES elements for its shape, got {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def serialize_bytes(array: np.ndarray) -> bytes:
    """The inverse of `deserialize_bytes`; str elements are UTF-8 encoded."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_raw(spec: TensorSpec, shape: Sequence[int], raw: bytes) -> np.ndarray:
    count = element_count(shape)
    if spec.datatype == "BYTES":
        return deserialize_bytes(spec.name, raw, count).reshape(shape)
    expected = count * spec.dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"input '{spec.name}': expected {expected} bytes for shape {format_shape(shape)} {spec.datatype}, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=spec.dtype).reshape(shape)


def decode_typed(spec: TensorSpec, shape: Sequence[int], contents: object) -> np.ndarray:
    field = CONTENTS_FIELDS[spec.datatype]
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise invalid(
            f"input '{spec.name}': expected {count} values in contents.{field} for shape {format_shape(shape)}, "
            f"got {len(values)}"
        )
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        # Out-of-range ints (e.g. 300 as INT8) are refused rather than wrapped.
        with np.errstate(over="raise", invalid="raise"):
            wide = np.asarray(values)
            array = wide.astype(spec.dtype)
            if spec.dtype.kind in "iu" and count and not np.array_equal(array, wide):
                raise OverflowError
    except (OverflowError, FloatingPointError, ValueError):
        raise invalid(f"input '{spec.name}': a value in contents.{field} does not fit {spec.datatype}") from None
    return array.reshape(shape)


def to_onnx_strings(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX Runtime takes str elements for string tensors; it would str() bytes into "b'..'"."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape[0], dtype=object)
    try:
        out[:] = [item.decode() if isinstance(item, bytes) else item for item in flat]
    except UnicodeDecodeError:
        raise invalid(f"input '{name}': BYTES elements must be UTF-8 text for an ONNX string tensor") from None
    return out.reshape(array.shape)


def encode_output(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    return array.tobytes()
