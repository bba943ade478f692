"""A small decoder-only transformer (GPT): config dataclass, causal self-attention, tied weights.

The shape follows nanoGPT: token + position embeddings, ``n_layer`` pre-norm blocks (attention,
then a 4x GELU MLP), a final LayerNorm and logits through the token embedding's own matrix
(weight tying: one tensor, so the stored artifact and the parameter server see it once).

Two ways to run it: ``forward(idx)`` is the full causal pass training uses; ``step`` runs only
new positions against a ``KVCache`` holding the keys and values of earlier ones, for several
sequences at different lengths at once (continuous batching decodes all active streams in one
call). Every projection is an ``nn.Linear``, so int8 compression swaps them without knowing GPT.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from maas import jit
from maas.text.gpt_config import GPTConfig

log = logging.getLogger(__name__)


class KVCache:
    """Keys and values of every layer for ``slots`` sequences of up to ``block_size`` positions.

    Zero-filled, not empty: masked-out positions still enter the attention matmul, and
    uninitialised memory could hold NaN, which a zero attention weight does not cancel.
    """

    def __init__(self, config: GPTConfig, slots: int) -> None:
        shape = (config.n_layer, slots, config.block_size, config.n_head, config.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.slots = slots


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        return q.view(shape), k.view(shape), v.view(shape)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self._out(y)

    def cached(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        read: Rows,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attend new positions ``x`` (B, T, C) over their cached past and themselves.

        ``rows``, ``cols`` = (slot, position) index grids (B, T) saying where the new keys are
        stored; ``read`` names the rows' slots; ``mask`` (B, 1, T, L) lets each row see only
        positions up to its own.
        """
        q, k, v = self._qkv(x)
        k_cache[rows, cols] = k
        v_cache[rows, cols] = v
        span = mask.shape[-1]
        keys = _read(k_cache, read, span).transpose(1, 2)
        values = _read(v_cache, read, span).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self._out(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def cached(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        read: Rows,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.attn.cached(self.ln_1(x), k_cache, v_cache, rows, cols, read, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # Residual projections start smaller so the residual stream's variance does not grow
        # with depth (GPT-2's scaled initialisation).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # The output projection is the token embedding itself (weight tying).
        return F.linear(self.ln_f(x), self.wte.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); position t sees tokens 0..t only."""
        # Rows that arrive as FP32 tensors over ModelInfer carry token ids as numbers.
        idx = idx.long()
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size={self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.h:
            x = block(x)
        return self._logits(x)

    def step(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, vocab) of the last new position of each row, filling the cache.

        Row b holds ``idx[b]`` (T new tokens) for cache slot ``slots[b]``, starting at position
        ``positions[b]``; rows may be at different lengths. Positions past a row's own are
        masked, so what other slots hold never reaches it.
        """
        # Plain interpretation: the optimising executor specialises on the shapes it has seen,
        # and a decode step's span grows by one every step.
        with torch.jit.optimized_execution(False):  # type: ignore[no-untyped-call]
            return _decoder(self)(idx, cache.k, cache.v, slots, positions, _slot_run(slots))


Rows = tuple[int, int, torch.Tensor | None]  # (first slot, count, index or None: a run)


def _read(cache: torch.Tensor, read: Rows, span: int) -> torch.Tensor:
    """The first ``span`` positions of the rows' slots: a view when they are a run of slots (an
    index copies every row it reads; for eight streams that gather was half of a step)."""
    first, count, index = read
    if index is None:
        return cache[first : first + count, :span]
    return cache[index, :span]


def _slot_run(slots: torch.Tensor) -> Rows:
    values = slots.tolist()
    first = values[0]
    consecutive = values == list(range(first, first + len(values)))
    return first, len(values), None if consecutive else slots


class _Decode(nn.Module):
    """``GPT.step``'s pass over the model's own modules (shared, not copied).

    Run as TorchScript, the whole pass is one call that does not come back to Python between
    operations: it skips Python's per-operation dispatch (a one-row step took half the time),
    and a thread running it releases the GIL for nearly all of a step. Eager (the same code)
    where scripting is unavailable.
    """

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.wte, self.wpe, self.h, self.ln_f = model.wte, model.wpe, model.h, model.ln_f

    def forward(
        self,
        idx: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        read: Rows,
    ) -> torch.Tensor:
        b, t = idx.shape[0], idx.shape[1]
        cols = positions[:, None] + torch.arange(t)[None, :]
        rows = slots[:, None].expand(b, t)
        span = int(cols.max()) + 1
        mask = (torch.arange(span)[None, None, :] <= cols[:, :, None]).unsqueeze(1)
        x = self.wte(idx) + self.wpe(cols)
        for layer, block in enumerate(self.h):  # Blocks (TorchScript has no typing.cast)
            x = block.cached(x, k_cache[layer], v_cache[layer], rows, cols, read, mask)  # type: ignore[operator]
        # The output projection is the token embedding itself (weight tying).
        return F.linear(self.ln_f(x[:, -1]), self.wte.weight)


_decoders: weakref.WeakKeyDictionary[GPT, nn.Module] = weakref.WeakKeyDictionary()


def _decoder(model: GPT) -> nn.Module:
    """The model's decode pass, scripted on first use (a copy of the model gets its own)."""
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _Decode(model).eval()
        try:
            decoder = jit.script(decoder)
        except Exception as exc:  # a module TorchScript cannot compile: the same code, eager
            log.warning("GPT decode runs eager (TorchScript refused it: %s)", exc)
        _decoders[model] = decoder
    return decoder
