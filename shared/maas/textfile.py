"""Reading a file a user named (a job, a policy, a token, an input): failures name the file and
why. At most ``MAX_FILE_BYTES`` are read: a path linked to /dev/zero or /dev/urandom is refused
once that much arrived, instead of filling memory. A pipe is read like a file, so process
substitution works (``maas jobs submit <(make-job)``, a token from ``<(vault read ...)``), and
``-`` is standard input (``make-job | maas jobs submit -``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from maas.errors import InvalidArgument
from maas.events import clip

STDIN = "-"
MAX_FILE_BYTES = 16 * 1024 * 1024  # a job, policy or token is kilobytes; a JSON input, megabytes


def read_file(path: str | Path, what: str, max_bytes: int | None = None) -> bytes:
    """``path``'s bytes, at most ``max_bytes`` (``MAX_FILE_BYTES``); InvalidArgument naming
    ``what`` and the file when it cannot be read or holds more."""
    if max_bytes is None:
        max_bytes = MAX_FILE_BYTES
    source = sys.stdin.fileno() if str(path) == STDIN else path
    try:
        with open(source, "rb", closefd=source is path) as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise InvalidArgument(f"{what} {path} holds over {max_bytes} bytes; is it the right file?")
    return data


def read_text_file(path: str | Path, what: str, max_bytes: int | None = None) -> str:
    """``path``'s text; InvalidArgument naming ``what`` and the file when it cannot be read,
    holds over ``max_bytes`` or is not UTF-8 (a binary file given by mistake)."""
    data = read_file(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{what} {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "give the text file itself"
        ) from None


class UserYamlLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, reading a number with an exponent as YAML 1.2 and JSON do:
    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so ``lr: 1e-3`` was
    the string '1e-3' and the job was refused as "not of type 'number'"."""


UserYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, path: str | Path, what: str) -> Any:
    """The YAML document in ``text`` (read from ``path``, a ``what``); InvalidArgument naming
    the file when it does not parse."""
    try:
        return yaml.load(text, Loader=UserYamlLoader)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path} is not valid YAML: {exc}") from None
    except ValueError as exc:  # a scalar PyYAML's constructors refuse outside YAMLError:
        # a date of month 13, an integer of over 4300 digits, `!!int x`
        raise InvalidArgument(
            f"{path} holds a value YAML cannot read: {clip(str(exc), 200)}"
        ) from None
    except RecursionError:
        raise InvalidArgument(f"{path} nests lists or mappings deeper than a {what} can") from None
