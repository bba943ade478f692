"""A BERT encoder as one plain torch module: token ids in, a sentence embedding (or logits) out.

Submodule names follow the published BERT checkpoints (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ...), so a pretrained state dict such as
all-MiniLM-L6-v2's loads by name with ``load_state_dict``. The pooler of those checkpoints is not
part of this module: sentence embeddings are the mean of the token states over the real tokens
(what sentence-transformers computes), then L2-normalised.

Input rows are token ids, right-padded with ``pad_token_id``; the attention mask is derived from
them (the pad id never appears inside a real sequence), so the module keeps the zoo's one-tensor
contract and the training and compression stacks drive it like any other model. Padding costs
little: the rows are run in groups of similar length (``length_groups``), and the columns every
row of a group leaves padded are cut before the encoder runs, so a batch pays for each group's
longest sequence, not for ``max_seq_length`` — the server's dynamic batches, the compressor's
measurements and training alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maas.compression.quant import Int8Linear
from maas.text.bert_config import BertConfig

# A group of rows closes when the next is more than GROUP_RATIO times longer than its shortest
# (and longer than GROUP_MIN_TOKENS: below that, one more pass costs more than the padding).
GROUP_RATIO = 2
GROUP_MIN_TOKENS = 32


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # Single-sentence inputs: every token has segment 0.
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = c.head_dim
        width = heads * c.head_dim
        self.query = nn.Linear(c.hidden, width)
        self.key = nn.Linear(c.hidden, width)
        self.value = nn.Linear(c.hidden, width)
        self.dropout = c.dropout
        self._int8_qkv: tuple[tuple[nn.Module, ...], Int8Linear] | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self._projections(x)
        context = F.scaled_dot_product_attention(
            self._split(q),
            self._split(k),
            self._split(v),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return context.transpose(1, 2).reshape(n, length, self.heads * self.head_dim)

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = (self.query, self.key, self.value)
        if not all(isinstance(part, Int8Linear) for part in parts):
            return tuple(part(x) for part in parts)
        # int8 projections run as one layer, so x is quantized once rather than three times:
        # 7 % of an int8 MiniLM forward at batch 32, bit-identical. (fp32 gains nothing from
        # this.) Built on first use, kept outside the state dict, rebuilt if a part is swapped.
        if self._int8_qkv is None or self._int8_qkv[0] != parts:
            self._int8_qkv = (parts, Int8Linear.side_by_side(parts))  # type: ignore[arg-type]
        return self._int8_qkv[1](x).split(self.heads * self.head_dim, dim=-1)


class DenseNorm(nn.Module):
    """A projection back to the hidden width, added to the block's input, then LayerNorm."""

    def __init__(self, c: BertConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))  # type: ignore[no-any-return]


class Attention(nn.Module):
    def __init__(self, c: BertConfig, heads: int) -> None:
        super().__init__()
        self.self = SelfAttention(c, heads)  # the checkpoints' name: attention.self.query, ...
        self.output = DenseNorm(c, heads * c.head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.self.heads:
            return self.output(self.self(x, mask), x)  # type: ignore[no-any-return]
        # Every head pruned: the block adds only its output bias.
        return self.output.LayerNorm(x + self.output.dense.bias)  # type: ignore[no-any-return]


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, c: BertConfig, heads: int, intermediate: int) -> None:
        super().__init__()
        self.attention = Attention(c, heads)
        self.intermediate = Intermediate(c, intermediate)
        self.output = DenseNorm(c, intermediate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)  # type: ignore[no-any-return]


class Encoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            EncoderLayer(c, c.heads_of(i), c.intermediate_of(i)) for i in range(c.layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask``: [N, 1, 1, L], added to the attention scores (None: no row is padded)."""
        for layer in self.layer:
            x = layer(x, mask)
        return x


def length_groups(lengths: Sequence[int]) -> list[slice]:
    """Consecutive groups of ascending ``lengths`` whose longest is at most GROUP_RATIO times
    the shortest (or at most GROUP_MIN_TOKENS)."""
    groups: list[slice] = []
    start = 0
    for i, length in enumerate(lengths):
        if length > max(GROUP_RATIO * lengths[start], GROUP_MIN_TOKENS):
            groups.append(slice(start, i))
            start = i
    if len(lengths):
        groups.append(slice(start, len(lengths)))
    return groups


def key_mask(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive attention mask of token rows ``real`` ([N, L], True = token), or None when
    no row is padded.

    Made once for every layer (attention would convert a boolean mask on each call). Padding
    gets the dtype's lowest value, not -inf, so a row without tokens stays finite.
    """
    if bool(real.all()):
        return None
    mask = torch.zeros(real.shape, dtype=dtype).masked_fill_(~real, torch.finfo(dtype).min)
    return mask[:, None, None, :]


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the real tokens (``mask`` is [N, L], 1 = token)."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        if config.num_classes:
            self.head = nn.Linear(config.hidden, config.num_classes)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        # BERT's initialisation; a pretrained state dict overwrites it.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean-pooled token states [N, hidden] of token-id rows (before normalisation), the
        rows run in groups of similar length; results in input order."""
        ids = ids.long()
        lengths = (ids != self.config.pad_token_id).sum(1)
        order = torch.argsort(lengths, stable=True)
        groups = length_groups(lengths[order].tolist())
        if len(groups) <= 1:  # one group, or no rows at all
            return self._pooled_group(ids)
        parts = [self._pooled_group(ids[order[group]]) for group in groups]
        return torch.cat(parts)[torch.argsort(order)]

    def _pooled_group(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids != self.config.pad_token_id
        # Columns no row uses are cut: padding costs nothing beyond the longest row.
        used = int(real.any(0).nonzero().max()) + 1 if bool(real.any()) else 1
        ids, real = ids[:, :used], real[:, :used]
        x = self.embeddings(ids)
        states = self.encoder(x, key_mask(real, x.dtype))
        return mean_pool(states, real)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(ids)
        if self.config.num_classes:
            return self.head(pooled)  # type: ignore[no-any-return]
        return F.normalize(pooled, p=2, dim=1)
