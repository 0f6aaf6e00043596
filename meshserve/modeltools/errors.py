"""The one error type model tooling raises: its message tells the user what to do next."""

from __future__ import annotations


class ModelToolError(Exception):
    """A model tooling step failed; `str(error)` is the message to show the user."""
