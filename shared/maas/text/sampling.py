"""Sampling parameters, choosing the next token, stop sequences, and the in-process generate loop.

The loop (``generate``) is the reference the server is held to: it decodes one sequence with a
KV cache, and the inference service's continuous-batching engine uses the same pieces
(``Sampler``, ``TextStream``) per stream, so a request gets the same tokens either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from maas.errors import InvalidArgument
from maas.events import is_utf8, shown
from maas.text import byte_tokenizer
from maas.text.gpt import GPT, KVCache

MAX_STOP_SEQUENCES = 4
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it
FINISH_STOP = "stop"  # end-of-text token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached or the context is full


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for; ``temperature=0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    # (token id, added to its logit) pairs; OpenAI's ``logit_bias`` map, sorted by token id.
    logit_bias: tuple[tuple[int, float], ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidArgument(f"max_tokens={shown(self.max_tokens)} must be an integer >= 1")
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens={self.max_tokens} must be at least 1")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 2:
            raise InvalidArgument(
                f"temperature={shown(self.temperature)} must be a number in [0, 2]"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p={shown(self.top_p)} must be a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgument(f"top_k={shown(self.top_k)} must be an integer >= 0 (0 = off)")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not -(2**63) <= self.seed < 2**64
        ):
            raise InvalidArgument(f"seed={shown(self.seed)} must be an integer in [-2**63, 2**64)")
        if len(self.stop) > MAX_STOP_SEQUENCES or not all(
            isinstance(s, str) and s and is_utf8(s) for s in self.stop
        ):
            raise InvalidArgument(
                f"stop={shown(list(self.stop))} must be at most {MAX_STOP_SEQUENCES} "
                "non-empty strings of text (a lone surrogate can never be generated)"
            )
        for token, bias in self.logit_bias:
            _check_bias(token, bias)

    @classmethod
    def from_request(cls, body: dict[str, Any], **defaults: Any) -> SamplingParams:
        """Build from a request map (OpenAI field names); unknown keys are the caller's concern."""
        values = {**defaults, **{k: body[k] for k in _FIELDS if body.get(k) is not None}}
        stop = values.get("stop", ())
        if not isinstance(stop, str | list | tuple):
            raise InvalidArgument(f"stop={shown(stop)} must be a string or a list of strings")
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if "logit_bias" in values:
            values["logit_bias"] = _bias_pairs(values["logit_bias"])
        return cls(**values)


_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logit_bias")


def _is_number(value: object) -> bool:
    """An int or a float, not a bool (``True`` is an int to Python, not a temperature)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


_BIAS_RULE = (
    f"logit_bias maps token ids (0..{byte_tokenizer.VOCAB_SIZE - 1}; bytes are 0..255, "
    f"end-of-text is {byte_tokenizer.EOT}) to numbers in "
    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
)


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"256": -100}`` (JSON keys are strings) -> sorted (token, bias) pairs."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"logit_bias={shown(value)}: {_BIAS_RULE}")
    biases: dict[int, object] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidArgument(f"logit_bias key {shown(key)}: {_BIAS_RULE}") from None
        if token in biases:  # "5" and " 5": one token named twice
            raise InvalidArgument(f"logit_bias names token {token} twice: {_BIAS_RULE}")
        biases[token] = bias
    # Sorted by token alone: the values are not checked yet and may not compare.
    return tuple(sorted(biases.items(), key=lambda pair: pair[0]))  # type: ignore[arg-type]


def _check_bias(token: object, bias: object) -> None:
    if (
        isinstance(token, bool)
        or not isinstance(token, int)
        or not 0 <= token < byte_tokenizer.VOCAB_SIZE
    ):
        raise InvalidArgument(f"logit_bias token {shown(token)}: {_BIAS_RULE}")
    if (
        isinstance(bias, bool)
        or not isinstance(bias, int | float)
        or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS
    ):
        raise InvalidArgument(f"logit_bias[{token}]={shown(bias)}: {_BIAS_RULE}")


MIN_TEMPERATURE = 1e-6


class Sampler:
    """Chooses one sequence's next tokens; seeded, it repeats itself whatever else runs."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is not None:
            self._generator.manual_seed(params.seed)
        else:
            self._generator.seed()
        tokens, biases = zip(*params.logit_bias, strict=True) if params.logit_bias else ((), ())
        self._biased = torch.tensor(tokens, dtype=torch.long)
        self._bias = torch.tensor(biases, dtype=torch.float32)

    def pick(self, logits: torch.Tensor) -> int:
        """The next token for one row of logits (vocab,)."""
        p = self.params
        if self.params.logit_bias:
            logits = logits.float().index_add(0, self._biased, self._bias)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        # Below MIN_TEMPERATURE a logit divided by the temperature can leave float32's range
        # (inf - inf is NaN, and the draw fails); that close to 0 the draw is greedy anyway.
        logits = logits.float() / max(p.temperature, MIN_TEMPERATURE)
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            ordered, order = torch.sort(logits, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token once the ones before it already reach top_p (the first always stays).
            drop = torch.cumsum(probs, dim=-1) - probs >= p.top_p
            drop[0] = False  # a top_p below float32's smallest value compares as 0
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -torch.inf)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))


class TextStream:
    """Token ids -> text pieces, ending at end-of-text or a stop sequence (never emitted).

    Text that could be the start of a stop sequence is held back until it is known not to be.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = byte_tokenizer.TextDecoder()
        self._stop = tuple(stop)
        self._held = ""
        self.finished = False

    def feed(self, token: int) -> str:
        """The text this token releases ("" while held back); sets ``finished`` at a stop."""
        if token == byte_tokenizer.EOT:
            self.finished = True
            return self.flush()
        text = self._held + self._decoder.feed(token)
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.finished = True
            self._held = ""
            return text[: min(hits)]
        keep = _longest_stop_prefix(text, self._stop)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What is still held back, once the sequence ends for any other reason."""
        text, self._held = self._held + self._decoder.flush(), ""
        return text


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@dataclass(frozen=True)
class Token:
    """One generated token and the text it released; ``finish`` is set on the last one."""

    id: int
    text: str
    finish: str | None = None


def prompt_ids(prompt: str, block_size: int) -> list[int]:
    """The prompt's tokens, left-truncated so at least one new token fits the context."""
    return byte_tokenizer.encode_tail(prompt, block_size - 1) or [byte_tokenizer.EOT]


def finish_of(
    stream: TextStream, generated: int, position: int, params: SamplingParams, block_size: int
) -> str | None:
    if stream.finished:
        return FINISH_STOP
    if generated >= params.max_tokens or position >= block_size:
        return FINISH_LENGTH
    return None


@torch.inference_mode()
def generate(model: GPT, prompt: str, params: SamplingParams) -> Iterator[Token]:
    """Decode one sequence token by token (the in-process loop the server is measured against)."""
    ids = prompt_ids(prompt, model.config.block_size)
    cache = KVCache(model.config, slots=1)
    slot = torch.zeros(1, dtype=torch.long)
    sampler, stream = Sampler(params), TextStream(params.stop)
    logits = model.step(torch.tensor([ids]), cache, slot, torch.zeros(1, dtype=torch.long))
    position, generated = len(ids), 0
    while True:
        token = sampler.pick(logits[0])
        generated += 1
        text = stream.feed(token)
        finish = finish_of(stream, generated, position + 1, params, model.config.block_size)
        if finish is not None:
            yield Token(token, text + ("" if stream.finished else stream.flush()), finish)
            return
        yield Token(token, text)
        logits = model.step(
            torch.tensor([[token]]), cache, slot, torch.tensor([position], dtype=torch.long)
        )
        position += 1
