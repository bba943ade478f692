"""The GPT's tokenizer: one token per UTF-8 byte, plus an end-of-text token.

Bytes need no training, no vocabulary file and no unknown token: every string encodes, and the
artifact needs nothing beside its weights. Decoding is incremental (``TextDecoder``) because a
stream emits one byte at a time and a character may span several of them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from maas.errors import InvalidArgument

EOT = 256  # end of text: separates corpus documents, ends a generation
VOCAB_SIZE = 257


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of ``text``; a lone surrogate (JSON's ``"\\ud800"``, say) has none."""
    return list(_utf8(text))


def encode_tail(text: str, count: int) -> list[int]:
    """The last ``count`` tokens of ``encode(text)``, without a Python int for every byte of a
    long text (a 50 MiB prompt took 2.5 s that way, on the server's event loop)."""
    return list(_utf8(text)[-count:]) if count > 0 else []


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"the text has a character UTF-8 cannot encode at index {exc.start} (a lone "
            "surrogate?); send valid Unicode"
        ) from None


def decode(ids: Iterable[int]) -> str:
    return bytes(i for i in ids if i < EOT).decode("utf-8", errors="replace")


class TextDecoder:
    """Token ids in, text out as soon as each character is complete."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        if token >= EOT:
            return ""
        return self._utf8.decode(bytes((token,)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
