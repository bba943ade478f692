"""How one setting is declared, read from the environment and shown (the rows of maas.config).

A setting is a dataclass field whose metadata carries its env name, whether it is a secret, and
its meaning; this module parses the raw env text by the field's type and masks secrets.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from maas.errors import InvalidArgument


def setting(
    env: str,
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
) -> Any:
    """One row of the settings table: its env name, default (or a factory of it) and meaning."""
    metadata = {"env": env, "secret": secret, "doc": doc}
    # A secret stays out of repr(settings): a log line or error message that shows the settings
    # would otherwise carry it.
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "maas")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "maas")


def parse(f: dataclasses.Field[Any], raw: str) -> Any:
    """The value of setting `f` from its env text, by the field's type."""
    name = f.metadata["env"]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise InvalidArgument(f"{name}={raw!r} is not a boolean; use true or false")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgument(f"{name}={raw!r} is not an integer") from None
    return raw


def shown(f: dataclasses.Field[Any], value: Any) -> str:
    """The value as logs and docs may print it: a set secret is masked."""
    return "***" if f.metadata["secret"] and value else str(value)
