"""The GPT's tokenizer: one token per UTF-8 byte, plus an end-of-text token.

Bytes need no training, no vocabulary file and no unknown token: every string encodes, and the
artifact needs nothing beside its weights. Decoding is incremental (``TextDecoder``) because a
stream emits one byte at a time and a character may span several of them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

EOT = 256  # end of text: separates corpus documents, ends a generation
VOCAB_SIZE = 257


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


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
