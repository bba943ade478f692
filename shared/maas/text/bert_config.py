"""The BERT encoder's hyperparameters, its shapes and its parameter count, in plain Python (no
torch): the zoo judges a ``bert`` job and sizes it before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

from maas.errors import InvalidArgument

# The accepted range of each size field. The maxima sit far above any published BERT (BERT-large:
# 24 layers, hidden 1024; multilingual vocabularies reach ~250k tokens), so no real model is
# refused, yet a typo such as ``layers: 300000000`` is refused by name at once instead of being
# sized, built or looped over. MAAS_MAX_MODEL_PARAMS still judges the whole model afterwards.
MAX_LAYERS = 1024
FIELD_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden": (1, 1 << 16),
    "layers": (1, MAX_LAYERS),
    "heads": (1, 1024),
    "intermediate": (1, 1 << 18),
    "max_positions": (1, 1 << 20),
    "type_vocab_size": (1, 1024),  # at least 1: every token gets segment 0's embedding
    "num_classes": (0, 1 << 20),
}
# Per-layer widths after pruning: a layer may lose every head or channel (0), never exceed the
# field's own maximum.
WIDTH_FIELDS = {"layer_heads": "heads", "layer_intermediate": "intermediate"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    max_seq_length: int = 256  # longest input row in tokens (the tokenizer truncates to it)
    dropout: float = 0.1
    num_classes: int = 0  # 0: the module returns normalised embeddings; >0: class logits
    # Per-layer widths after structured pruning (empty = every layer has `heads`/`intermediate`).
    layer_heads: tuple[int, ...] = ()
    layer_intermediate: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Types first: every later check compares numbers, and a string must be named, not
        # crash a comparison.
        self._check_integers()
        self._check_ranges()
        if self.hidden % self.heads:
            raise InvalidArgument(
                f"bert config: hidden={self.hidden} must be a multiple of heads={self.heads}"
            )
        if not 2 <= self.max_seq_length <= self.max_positions:
            raise InvalidArgument(
                f"bert config: max_seq_length={self.max_seq_length} must be in "
                f"2..max_positions ({self.max_positions}); max_seq_length (default "
                f"{BertConfig.max_seq_length}) is the longest input row in tokens: set it with "
                "max_positions"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise InvalidArgument(
                f"bert config: pad_token_id={self.pad_token_id} must be a token id, in "
                f"0..vocab_size-1 ({self.vocab_size - 1})"
            )
        self._check_widths()

    def _check_integers(self) -> None:
        for name in [*FIELD_RANGES, "pad_token_id", "max_seq_length"]:
            value = getattr(self, name)
            if not _is_int(value):
                raise InvalidArgument(f"bert config: {name}={value!r} must be an integer")
        for name in WIDTH_FIELDS:
            widths = getattr(self, name)
            if not isinstance(widths, tuple) or not all(_is_int(w) for w in widths):
                raise InvalidArgument(
                    f"bert config: {name}={widths!r} must be a list of integers, one per layer"
                )

    def _check_ranges(self) -> None:
        for name, (low, high) in FIELD_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise InvalidArgument(f"bert config: {name}={value} must be in {low}..{high}")

    def _check_widths(self) -> None:
        for name, scalar in WIDTH_FIELDS.items():
            widths = getattr(self, name)
            if widths and len(widths) != self.layers:
                raise InvalidArgument(
                    f"bert config: {name} has {len(widths)} entries; give one per layer "
                    f"({self.layers}) or none"
                )
            high = FIELD_RANGES[scalar][1]
            if not all(0 <= w <= high for w in widths):
                raise InvalidArgument(
                    f"bert config: {name}={list(widths)} must hold widths in 0..{high}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def heads_of(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.heads

    def intermediate_of(self, layer: int) -> int:
        return self.layer_intermediate[layer] if self.layer_intermediate else self.intermediate


def bert_parameters(c: BertConfig) -> list[tuple[str, int]]:
    """Parameters of ``Bert(c)`` per config field that sizes them, computed from the config.

    In closed form: each layer's parameters are linear in its attention width and FFN width, so
    the encoder's total needs only the sums of those widths (a product when every layer has the
    same), never a loop over the layers.
    """
    h = c.hidden
    embeddings = (c.vocab_size + c.max_positions + c.type_vocab_size) * h + 2 * h
    heads = sum(c.layer_heads) if c.layer_heads else c.layers * c.heads
    attention_width = heads * c.head_dim
    ffn_width = sum(c.layer_intermediate) if c.layer_intermediate else c.layers * c.intermediate
    # Per layer: q/k/v (3 * (h*w + w)) and the output projection (w*h + h) with its LayerNorm
    # (2h); the FFN in (h*i + i) and out (i*h + h) with its LayerNorm (2h).
    layers = (4 * h + 3) * attention_width + (2 * h + 1) * ffn_width + 6 * h * c.layers
    head = h * c.num_classes + c.num_classes
    return [("vocab_size", embeddings), ("layers", layers), ("num_classes", head)]


def bert_output_shape(c: BertConfig) -> tuple[int, ...]:
    """Class logits with a head, else the sentence embedding."""
    return (c.num_classes or c.hidden,)
