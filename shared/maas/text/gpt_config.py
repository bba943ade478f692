"""The GPT's configuration and its size, without torch (the zoo judges jobs before building)."""

from __future__ import annotations

from dataclasses import dataclass

from maas.errors import InvalidArgument
from maas.text.byte_tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 128  # the longest sequence (prompt + generated tokens)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                raise InvalidArgument(f"model.config.{key}={value} must be at least 1")
        if (
            isinstance(self.n_embd, int)
            and isinstance(self.n_head, int)
            and self.n_embd % self.n_head
        ):
            raise InvalidArgument(
                f"model.config.n_embd={self.n_embd} must be a multiple of n_head={self.n_head}"
            )
        if isinstance(self.dropout, int | float) and not 0 <= self.dropout < 1:
            raise InvalidArgument(f"model.config.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def parameter_breakdown(c: GPTConfig) -> list[tuple[str, int]]:
    """Parameters per config field that sizes them: embeddings, then per block two LayerNorms,
    the qkv and output projections and the 4x MLP, then the final LayerNorm."""
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd
    return [
        ("vocab_size", c.vocab_size * c.n_embd),
        ("block_size", c.block_size * c.n_embd),
        ("n_layer", c.n_layer * per_block),
        ("n_embd", 2 * c.n_embd),
    ]


def parameter_count(c: GPTConfig) -> int:
    return sum(n for _, n in parameter_breakdown(c))
