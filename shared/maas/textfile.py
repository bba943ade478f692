"""Reading a file a user named (a job, a policy, a token, an input): failures name the file and
why. Only a regular file of at most ``MAX_FILE_BYTES`` is read: a symlink to /dev/zero would
fill memory, a named pipe would wait for ever."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from maas.errors import InvalidArgument

MAX_FILE_BYTES = 16 * 1024 * 1024  # a job, policy or token is kilobytes; a JSON input, megabytes


def check_regular_file(path: str | Path, what: str) -> int:
    """The size of ``path``, a regular file (symlinks followed); InvalidArgument naming ``what``
    and the file otherwise."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(
            f"{what} {path} is not a regular file (a directory, device or pipe); give the file"
        )
    return info.st_size


def read_file(path: str | Path, what: str, max_bytes: int | None = None) -> bytes:
    """``path``'s bytes, at most ``max_bytes`` (``MAX_FILE_BYTES``) of a regular file;
    InvalidArgument otherwise."""
    if max_bytes is None:
        max_bytes = MAX_FILE_BYTES
    size = check_regular_file(path, what)
    too_big = InvalidArgument(f"{what} {path} is over {max_bytes} bytes; is it the right file?")
    if size > max_bytes:
        raise too_big
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)  # it may have grown since
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise too_big
    return data


def read_text_file(path: str | Path, what: str, max_bytes: int | None = None) -> str:
    """``path``'s text; InvalidArgument naming ``what`` and the file when it cannot be read, is
    not a regular file, is over ``max_bytes`` or is not UTF-8 (a binary file given by mistake)."""
    data = read_file(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{what} {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "give the text file itself"
        ) from None
