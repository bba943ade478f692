"""Continuous-batching decode, the plain-Python core: one model, one KV cache, many requests.

``DecodeBatch`` holds a model, a KV cache with ``slots`` rows, and the requests occupying them.
``admit`` prefills a new request's prompt into a free slot and picks its first token; ``step``
runs one batched decode over every active slot (each at its own length) and picks one token per
request. A finished or cancelled request gives its slot back at once. Tokens leave through each
request's ``emit``; what drives the batch (``decode_worker``) decides where they go.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from maas.errors import InvalidArgument
from maas.text.gpt import GPT, KVCache
from maas.text.sampling import Sampler, SamplingParams, TextStream, Token, finish_of

Emit = Callable[[Token | BaseException], None]


@dataclass(eq=False)
class Request:
    """One stream's prompt, parameters and progress; ``emit`` receives each token, then stops."""

    ids: list[int]
    params: SamplingParams
    emit: Emit
    sampler: Sampler = field(init=False)
    text: TextStream = field(init=False)
    slot: int = -1
    position: int = 0  # cache positions filled
    generated: int = 0
    last: int = 0  # the token the next step feeds
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.text = TextStream(self.params.stop)


class DecodeBatch:
    """The slots of one model's KV cache and the requests in them (single-threaded)."""

    def __init__(self, model: GPT, slots: int) -> None:
        if slots < 1:
            raise InvalidArgument(f"generation slots={slots} must be at least 1")
        self.model = model
        self.cache = KVCache(model.config, slots)
        # A heap: the lowest free slot is taken first, so busy slots stay a consecutive run and
        # the decode step reads the cache as a view instead of gathering rows.
        self.free = list(range(slots))
        self.active: dict[int, Request] = {}

    @torch.inference_mode()
    def admit(self, request: Request) -> None:
        """Prefill ``request``'s prompt into a free slot and emit its first token."""
        request.slot = heapq.heappop(self.free)
        self.active[request.slot] = request
        ids = torch.tensor([request.ids])
        logits = self.model.step(
            ids, self.cache, torch.tensor([request.slot]), torch.zeros(1, dtype=torch.long)
        )
        request.position = len(request.ids)
        self._first(request, logits[0])

    @torch.inference_mode()
    def warm(self) -> None:
        """A prefill and a decode step into slot 0, whose rows the next request there
        overwrites (as after any finished request): the first ``GPT.step`` calls compile its
        TorchScript, which a first stream would otherwise wait for (~0.2 s, measured)."""
        slot, start = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        logits = self.model.step(torch.zeros(1, 2, dtype=torch.long), self.cache, slot, start)
        self.model.step(logits.argmax(dim=-1, keepdim=True), self.cache, slot, start + 2)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every active request, then one token to each."""
        requests = [self.active[slot] for slot in sorted(self.active)]
        last = torch.tensor([[r.last] for r in requests])
        slots = torch.tensor([r.slot for r in requests])
        positions = torch.tensor([r.position for r in requests])
        logits = self.model.step(last, self.cache, slots, positions)
        # Greedy rows take one argmax over the whole batch instead of one call per row.
        greedy = logits.argmax(dim=-1).tolist()
        for row, request in enumerate(requests):
            request.position += 1
            if request.params.temperature == 0 and not request.params.logit_bias:
                self._advance(request, greedy[row])
            else:
                self._sample(request, logits[row])

    def _first(self, request: Request, logits: torch.Tensor) -> None:
        self._sample(request, logits)

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        """A draw that fails ends its own request only: the other rows of the step go on."""
        try:
            token = request.sampler.pick(logits)
        except RuntimeError as exc:
            self.release(request)
            request.emit(exc)
            return
        self._advance(request, token)

    def _advance(self, request: Request, token: int) -> None:
        request.generated += 1
        request.last = token
        text = request.text.feed(token)
        finish = finish_of(
            request.text,
            request.generated,
            request.position + 1,
            request.params,
            self.model.config.block_size,
        )
        if finish is None:
            request.emit(Token(token, text))
            return
        if not request.text.finished:
            text += request.text.flush()
        self.release(request)
        request.emit(Token(token, text, finish))

    def release(self, request: Request) -> None:
        """Give ``request``'s slot back (idempotent)."""
        if self.active.get(request.slot) is request:
            del self.active[request.slot]
            heapq.heappush(self.free, request.slot)

    def fail_all(self, error: BaseException) -> None:
        for request in list(self.active.values()):
            self.release(request)
            request.emit(error)
