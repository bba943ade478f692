"""The BERT encoder's hyperparameters, its shapes and its parameter count, in plain Python (no
torch): the zoo judges a ``bert`` job and sizes it before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

from maas.errors import InvalidArgument


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
        if self.heads < 1 or self.hidden % self.heads:
            raise InvalidArgument(
                f"bert config: hidden={self.hidden} must be a multiple of heads={self.heads} >= 1"
            )
        if not 2 <= self.max_seq_length <= self.max_positions:
            raise InvalidArgument(
                f"bert config: max_seq_length={self.max_seq_length} must be in "
                f"2..max_positions ({self.max_positions})"
            )
        for name in ("layer_heads", "layer_intermediate"):
            widths = getattr(self, name)
            if widths and len(widths) != self.layers:
                raise InvalidArgument(
                    f"bert config: {name} has {len(widths)} entries; give one per layer "
                    f"({self.layers}) or none"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def heads_of(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.heads

    def intermediate_of(self, layer: int) -> int:
        return self.layer_intermediate[layer] if self.layer_intermediate else self.intermediate


def bert_parameters(c: BertConfig) -> list[tuple[str, int]]:
    """Parameters of ``Bert(c)`` per config field that sizes them, computed from the config."""
    h = c.hidden
    embeddings = (c.vocab_size + c.max_positions + c.type_vocab_size) * h + 2 * h
    layers = 0
    for layer in range(c.layers):
        width = c.heads_of(layer) * c.head_dim
        inter = c.intermediate_of(layer)
        attention = 3 * (h * width + width) + width * h + h + 2 * h
        ffn = h * inter + inter + inter * h + h + 2 * h
        layers += attention + ffn
    head = h * c.num_classes + c.num_classes
    return [("vocab_size", embeddings), ("layers", layers), ("num_classes", head)]


def bert_output_shape(c: BertConfig) -> tuple[int, ...]:
    """Class logits with a head, else the sentence embedding."""
    return (c.num_classes or c.hidden,)
