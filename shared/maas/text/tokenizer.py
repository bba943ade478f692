"""Text -> token-id rows, with the HF ``tokenizers`` library and a model's ``tokenizer.json``.

One behaviour everywhere (import, training data, the server, the bench): every text is encoded
with the model's special tokens, truncated to ``max_length`` tokens (the model's
``max_seq_length``; longer texts lose their tail, as sentence-transformers does), and a batch is
right-padded with the pad id to its longest row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from maas.config import MiB
from maas.errors import FailedPrecondition, InvalidArgument
from maas.events import clip

TOKENIZER_FILE = "tokenizer.json"
# The largest tokenizer file parsed. Parsing costs about five times the file's size in memory,
# on whatever loads the model; real ones are far smaller (MiniLM's is 0.7 MB, large multilingual
# vocabularies under 40 MB). ``maas models import`` refuses every side file above this cap too.
TOKENIZER_MAX_BYTES = 64 * MiB


class TextTokenizer:
    def __init__(self, tokenizer_json: bytes | str, *, max_length: int, pad_id: int = 0) -> None:
        if max_length < 2:
            raise InvalidArgument(f"max_length={max_length} must be >= 2 (the special tokens)")
        self._tok = _parse(tokenizer_json)
        # The file may carry its own padding/truncation settings (MiniLM's pads to 128): ours
        # replace them so every caller gets the behaviour documented above.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.max_length = max_length
        self.pad_id = pad_id

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], *, max_length: int, pad_id: int = 0
    ) -> TextTokenizer:
        if TOKENIZER_FILE not in files:
            raise InvalidArgument(
                f"the artifact has no {TOKENIZER_FILE}; text models need one (maas models import "
                "copies it from the model directory)"
            )
        return cls(files[TOKENIZER_FILE], max_length=max_length, pad_id=pad_id)

    @property
    def max_id(self) -> int:
        """The highest token id this tokenizer can emit (added tokens included): the model's
        vocabulary must be larger, or that token has no embedding."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=0)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, truncated to ``max_length``.

        FailedPrecondition when the tokenizer cannot encode them: the text is not at fault (any
        string is text), the file is — a WordPiece vocabulary without its unknown token fails on
        every word outside it."""
        try:
            return [e.ids for e in self._tok.encode_batch(list(texts))]
        except Exception as exc:  # the library raises plain Exceptions
            raise FailedPrecondition(
                f"this model's {TOKENIZER_FILE} cannot encode the text ({clip(str(exc), 200)}); "
                "import the model again with a tokenizer whose vocabulary has its unknown token"
            ) from None

    def pad(self, rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
        """int64 [N, width] (default: the longest row), right-padded with the pad id."""
        width = max((len(r) for r in rows), default=0) if width is None else width
        out = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row[:width]
        return out

    def encode(self, texts: Sequence[str], width: int | None = None) -> np.ndarray:
        return self.pad(self.ids(texts), width)


def _parse(tokenizer_json: bytes | str) -> Tokenizer:
    """The library's tokenizer; a file too large, not UTF-8 or not a tokenizers file is refused
    (the artifact may come from an older version or another tool, so the loader checks too)."""
    if len(tokenizer_json) > TOKENIZER_MAX_BYTES:  # checked before any copy or decode
        unit = "bytes" if isinstance(tokenizer_json, bytes) else "characters"
        raise InvalidArgument(
            f"{TOKENIZER_FILE} is {len(tokenizer_json):,} {unit}; a tokenizer file may have at "
            f"most {TOKENIZER_MAX_BYTES:,} bytes"
        )
    try:
        text = tokenizer_json.decode() if isinstance(tokenizer_json, bytes) else tokenizer_json
        return Tokenizer.from_str(text)
    except Exception as exc:  # the library raises plain Exceptions for a malformed file
        raise InvalidArgument(f"{TOKENIZER_FILE} is not a tokenizers file: {exc}") from None
