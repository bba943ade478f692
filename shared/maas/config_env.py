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
    choices: tuple[str, ...] = (),
    check: Callable[[str, str], str] | None = None,
) -> Any:
    """One row of the settings table: its env name, default (or a factory of it) and meaning.
    ``choices``: the values accepted (read case-insensitively, kept as spelt here); ``check``:
    ``(env name, text) -> value``, raising InvalidArgument for text it refuses."""
    metadata = {"env": env, "secret": secret, "doc": doc, "choices": choices, "check": check}
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
        raise InvalidArgument(
            f"{name}={raw!r} is not a boolean; use true or false (or on/off, yes/no, 1/0)"
        )
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgument(f"{name}={raw!r} is not an integer") from None
    if f.metadata["choices"]:
        return _one_of(name, raw, f.metadata["choices"])
    if f.metadata["check"] is not None:
        return f.metadata["check"](name, raw)
    return raw


def _one_of(name: str, raw: str, choices: tuple[str, ...]) -> str:
    by_case = {choice.casefold(): choice for choice in choices}
    chosen = by_case.get(raw.strip().casefold())
    if chosen is None:
        raise InvalidArgument(f"{name}={raw!r}; use one of {', '.join(choices)}")
    return chosen


def host_port(name: str, raw: str) -> str:
    """``host[:port]`` as written, or InvalidArgument saying how to write it: a URL's scheme or
    path is refused (the S3 client takes neither; TLS has a setting of its own)."""
    text = raw.strip()
    scheme, sep, rest = text.partition("://")
    address = (rest if sep else text).partition("/")[0]
    host, colon, port = address.rpartition(":") if ":" in address else (address, "", "")
    if sep or address != (rest if sep else text) or not host or (colon and not port.isdecimal()):
        example = f"{host or 'HOST'}:{port if port.isdecimal() else 'PORT'}"
        hint = "; for https set MAAS_S3_SECURE=true" if scheme.lower() == "https" else ""
        raise InvalidArgument(
            f"{name}={raw!r}: give host:port, e.g. {example}, without a scheme or path{hint}"
        )
    return text


def shown(f: dataclasses.Field[Any], value: Any) -> str:
    """The value as logs and docs may print it: a set secret is masked."""
    return "***" if f.metadata["secret"] and value else str(value)
