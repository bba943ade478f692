"""The GPT's configuration and its size, without torch (the zoo judges jobs before building)."""

from __future__ import annotations

from dataclasses import dataclass

from maas.errors import InvalidArgument
from maas.text.byte_tokenizer import VOCAB_SIZE

# The accepted range of each size field: far above any model this byte-level GPT trains, low
# enough that a typo such as ``n_layer: 10**9`` is refused by name before anything is sized or
# allocated (the key/value cache grows with n_layer * block_size * n_embd, beyond the parameters
# MAAS_MAX_MODEL_PARAMS counts).
FIELD_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "block_size": (1, 1 << 16),
    "n_layer": (1, 1024),
    "n_head": (1, 1024),
    "n_embd": (1, 1 << 16),
}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 128  # the longest sequence (prompt + generated tokens)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Values of the wrong type pass here: the zoo's parser names them once this returns.
        for key, (low, high) in FIELD_RANGES.items():
            value = getattr(self, key)
            if isinstance(value, int) and not low <= value <= high:
                raise InvalidArgument(f"model.config.{key}={value} must be in {low}..{high}")
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


def kv_cache_bytes(config: GPTConfig, slots: int) -> int:
    """What decoding ``slots`` streams at once holds beside the weights: float32 keys and values
    of every layer at every position (``maas.text.gpt.KVCache``)."""
    return 2 * config.n_layer * slots * config.block_size * config.n_embd * 4
