"""Settings plumbing shared by every command.

Each component declares its own pydantic-settings class (`worker.settings`,
`gateway.settings`, ...) with `env_prefix="MESHSERVE_"`, so every setting has
a `MESHSERVE_<NAME>` variable. The CLI passes only the flags the user actually
gave; pydantic-settings ranks init arguments above the environment, so flags
win over variables, and variables over defaults.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic_settings import BaseSettings, SettingsConfigDict

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

ENV_PREFIX = "MESHSERVE_"


class MeshSettings(BaseSettings):
    """Base class for component settings: `MESHSERVE_*` variables, unknown ones ignored."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)


def load(settings_cls: type[SettingsT], **flags: Any) -> SettingsT:
    """Builds settings from the flags that were given (not None), then env, then defaults."""
    given = {name: value for name, value in flags.items() if value is not None}
    return settings_cls(**given)
