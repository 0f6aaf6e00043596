"""The address a registered process gives others to dial (kept free of the registry client's imports)."""

from __future__ import annotations

import contextlib
import socket


def advertised_address(host: str, advertise: str | None) -> str:
    """What others should dial: the explicit address, else the bind host, else this host's address."""
    if advertise:
        return advertise
    if host not in ("0.0.0.0", "::", ""):
        return host
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"
