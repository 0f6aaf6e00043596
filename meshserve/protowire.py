"""Protobuf wire-format primitives shared by the code that writes messages by hand
(`gateway.wire` on the request path, `meshserve.otlp` for spans): building a few bytes
directly is several times cheaper than a message object and `SerializeToString`."""

from __future__ import annotations

_U64 = 1 << 64
# One-byte varints cover nearly every tag, length and count; a lookup beats the loop.
_SMALL_VARINTS: tuple[bytes, ...] = tuple(bytes((n,)) for n in range(0x80))


def encode_varint(value: int) -> bytes:
    """A base-128 varint; a negative value as its 64-bit two's complement (int64 fields)."""
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]
    if value < 0:
        value += _U64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
