"""Reading a file a user named (a job, a policy, a token, an input): failures name the file and
why. At most ``MAX_FILE_BYTES`` are read: a path linked to /dev/zero or /dev/urandom is refused
once that much arrived, instead of filling memory. A pipe is read like a file, so process
substitution works (``maas jobs submit <(make-job)``, a token from ``<(vault read ...)``)."""

from __future__ import annotations

from pathlib import Path

from maas.errors import InvalidArgument

MAX_FILE_BYTES = 16 * 1024 * 1024  # a job, policy or token is kilobytes; a JSON input, megabytes


def read_file(path: str | Path, what: str, max_bytes: int | None = None) -> bytes:
    """``path``'s bytes, at most ``max_bytes`` (``MAX_FILE_BYTES``); InvalidArgument naming
    ``what`` and the file when it cannot be read or holds more."""
    if max_bytes is None:
        max_bytes = MAX_FILE_BYTES
    try:
        with open(path, "rb") as file:
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
