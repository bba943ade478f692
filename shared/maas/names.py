"""The spelling rules of what the platform names: models, aliases, versions, artifact files;
and of the whole numbers typed or sent as text beside them (a version, a weight, a count, a
length header), read as ASCII digits within a bound.

Plain Python, imported by the registry's values (``maas.registry.types``), the manifest parser
(``maas.manifest``), the CLI and the inference doors, so all refuse a malformed name or number
with the same message.
"""

from __future__ import annotations

import re

from maas.errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# An alias starts with a letter so `name@3` (version) and `name@prod` (alias) never read alike.
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
# A ref with neither version nor alias means the latest version: an alias of that name would
# make `name@latest` mean something else than it reads.
RESERVED_ALIASES = frozenset({"latest"})


def _shown(value: object) -> str:
    """A bounded rendering of a refused value (it may be huge, or not text at all)."""
    return repr(value[:80]) if isinstance(value, str) else f"of type {type(value).__name__}"


def check_name(name: str, *, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{what} {_shown(name)} is malformed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. 'digits-mlp')"
        )
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgument(
            f"alias {_shown(alias)} is malformed: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter (e.g. 'production')"
        )
    if alias in RESERVED_ALIASES:
        raise InvalidArgument(
            f"alias {alias!r} is reserved: a ref with no version or alias already means the "
            "latest version (write 'digits-mlp', not 'digits-mlp@latest')"
        )
    return alias


MAX_VERSION = 2**63 - 1  # int64, as on the wire and in SQLite


def is_digits(text: str) -> bool:
    """Whether ``text`` is spelled in ASCII digits only, as ``int`` can read it: ``"²".isdigit()``
    is true too (``int`` refuses it), and so is ``"٣".isdigit()`` (``int`` reads it as 3)."""
    return text.isascii() and text.isdigit()


def small_number(text: str, max_digits: int = len(str(MAX_VERSION))) -> int | None:
    """``text`` as a whole number if it is ASCII digits, at most ``max_digits`` of them besides
    leading zeros, else None: ``int`` raises a ValueError past 4300 digits, where a refusal
    naming the field is wanted."""
    if not is_digits(text) or len(text.lstrip("0")) > max_digits:
        return None
    return int(text)


def version_number(text: str, *, what: str = "version") -> int | None:
    """``text`` read as a version number if it is spelled as one, else None (an alias, or
    nothing). More digits than int64 has are refused here, before ``int`` (which raises a
    ValueError past 4300). The number's range is ``check_version``'s."""
    if text[:1] in ("-", "+") and is_digits(text[1:]):  # a number, of a sign no version has
        raise InvalidArgument(
            f"{what} {text[:24]!r} is malformed: versions are integers from 1 to {MAX_VERSION}"
        )
    if not is_digits(text):
        return None
    number = small_number(text)
    if number is None:  # more digits than int64 has
        raise InvalidArgument(
            f"{what} {text[:24]}... ({len(text)} digits) is malformed: "
            f"versions are integers from 1 to {MAX_VERSION}"
        )
    return number


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        if not isinstance(version, int) or isinstance(version, bool):
            shown = f"of type {type(version).__name__}"
        else:
            shown = str(version) if -MAX_VERSION - 1 <= version <= MAX_VERSION else "beyond int64"
        raise InvalidArgument(
            f"version {shown} is malformed: versions are integers from 1 to {MAX_VERSION}"
        )
    return version
