"""meshserve: the composition root (CLI, settings, telemetry, one-machine launcher)."""

__version__ = "0.1.0"
