"""Reading a text file a user named (a job, a policy, a token): failures name the file and why."""

from __future__ import annotations

from pathlib import Path

from maas.errors import InvalidArgument


def read_text_file(path: str | Path, what: str) -> str:
    """``path``'s text; InvalidArgument naming ``what`` and the file when it cannot be read or
    is not UTF-8 (a binary file given by mistake)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{what} {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "give the text file itself"
        ) from None
