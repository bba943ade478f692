"""The GPT module, its byte tokenizer, the corpus and the in-process generate loop."""

from __future__ import annotations

import copy as copy_module

import numpy as np
import pytest
import torch

from maas import artifacts, zoo
from maas.errors import InvalidArgument
from maas.text import byte_tokenizer, gpt_corpus
from maas.text import gpt as gpt_module
from maas.text.gpt import GPT, KVCache
from maas.text.gpt_config import GPTConfig, parameter_count
from maas.text.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    Sampler,
    SamplingParams,
    TextStream,
    generate,
    prompt_ids,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(3)
    return GPT(GPTConfig(**CONFIG)).eval()


def _text(model: GPT, prompt: str, **params: object) -> tuple[str, str | None]:
    tokens = list(generate(model, prompt, SamplingParams(**params)))  # type: ignore[arg-type]
    return "".join(t.text for t in tokens), tokens[-1].finish


def test_kv_cache_decode_equals_full_forward(model: GPT) -> None:
    ids = torch.randint(
        0, byte_tokenizer.VOCAB_SIZE, (1, 20), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        full = model(ids)[0]
        cache = KVCache(model.config, slots=1)
        slot = torch.zeros(1, dtype=torch.long)
        prefill = model.step(ids[:, :8], cache, slot, torch.tensor([0]))
        torch.testing.assert_close(prefill[0], full[7], atol=1e-5, rtol=1e-5)
        for t in range(8, 20):
            step = model.step(ids[:, t : t + 1], cache, slot, torch.tensor([t]))
            torch.testing.assert_close(step[0], full[t], atol=1e-5, rtol=1e-5)


def test_rows_at_different_lengths_decode_as_if_alone(model: GPT) -> None:
    a, b = torch.arange(10)[None], torch.arange(50, 55)[None]
    with torch.inference_mode():
        cache = KVCache(model.config, slots=3)
        model.step(a[:, :-1], cache, torch.tensor([2]), torch.tensor([0]))
        model.step(b[:, :-1], cache, torch.tensor([0]), torch.tensor([0]))
        both = model.step(
            torch.cat([a[:, -1:], b[:, -1:]]), cache, torch.tensor([2, 0]), torch.tensor([9, 4])
        )
        torch.testing.assert_close(both[0], model(a)[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[1], model(b)[0, -1], atol=1e-5, rtol=1e-5)


def test_the_decode_step_runs_as_torchscript_and_equals_the_eager_pass(model: GPT) -> None:
    ids = torch.arange(40, 52)[None]
    with torch.inference_mode():
        scripted = model.step(ids, KVCache(model.config, 2), torch.tensor([1]), torch.tensor([0]))
        eager = gpt_module._Decode(model)(
            ids, *_cache_tensors(model, 2), torch.tensor([1]), torch.tensor([0]), (1, 1, None)
        )
    assert isinstance(gpt_module._decoders[model], torch.jit.ScriptModule)
    torch.testing.assert_close(scripted, eager, atol=1e-6, rtol=1e-6)


def test_a_copy_of_the_model_decodes_with_its_own_weights(model: GPT) -> None:
    ids = torch.arange(10, 20)[None]
    with torch.inference_mode():  # the original's decoder exists before the copy is made
        mine = model.step(ids, KVCache(model.config, 1), torch.tensor([0]), torch.tensor([0]))
    copy = copy_module.deepcopy(model)
    with torch.no_grad():
        copy.ln_f.bias.add_(1.0)
    with torch.inference_mode():
        theirs = copy.step(ids, KVCache(model.config, 1), torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(theirs, copy(ids)[:, -1])
    assert not torch.allclose(mine, theirs)


def _cache_tensors(model: GPT, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    cache = KVCache(model.config, slots)
    return cache.k, cache.v


def test_output_projection_is_the_token_embedding(model: GPT) -> None:
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names and not any("head" in n or "lm_" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(model.config)


def test_byte_tokenizer_round_trips_any_text() -> None:
    text = "déjà vu — 日本 🐍\n"
    assert byte_tokenizer.decode(byte_tokenizer.encode(text)) == text
    decoder = byte_tokenizer.TextDecoder()
    assert "".join(decoder.feed(i) for i in byte_tokenizer.encode(text)) == text


def test_greedy_generation_is_deterministic(model: GPT) -> None:
    first = _text(model, "def f(x):", max_tokens=12, temperature=0)
    assert first == _text(model, "def f(x):", max_tokens=12, temperature=0)
    assert first[1] in (FINISH_LENGTH, FINISH_STOP)


def test_seeded_sampling_repeats_and_seeds_differ(model: GPT) -> None:
    one = _text(model, "import", max_tokens=16, temperature=1.0, seed=7)
    assert one == _text(model, "import", max_tokens=16, temperature=1.0, seed=7)
    assert one != _text(model, "import", max_tokens=16, temperature=1.0, seed=8)


def test_top_k_one_and_tiny_top_p_are_greedy(model: GPT) -> None:
    greedy = _text(model, "class A:", max_tokens=10, temperature=0)
    assert _text(model, "class A:", max_tokens=10, top_k=1, seed=1) == greedy
    assert _text(model, "class A:", max_tokens=10, top_p=1e-6, seed=1) == greedy


@pytest.mark.parametrize(
    "params", [{"temperature": 1.3e-38}, {"temperature": 1e-45}, {"top_p": 1e-300}]
)
def test_values_too_small_for_float32_sample_greedily(model: GPT, params: dict) -> None:
    """A temperature a logit divided by leaves float32's range, and a top_p that rounds to 0,
    are in the accepted ranges: they decode as greedy instead of failing the draw."""
    greedy = _text(model, "class A:", max_tokens=10, temperature=0)
    assert _text(model, "class A:", max_tokens=10, seed=1, **params) == greedy


def test_logit_bias_bans_one_token_and_forces_another(model: GPT) -> None:
    (greedy,) = generate(model, "def", SamplingParams(max_tokens=1, temperature=0))
    banned = SamplingParams(max_tokens=1, temperature=0, logit_bias=((greedy.id, -100.0),))
    (other,) = generate(model, "def", banned)
    assert other.id != greedy.id
    forced = SamplingParams(max_tokens=6, temperature=1.0, seed=5, logit_bias=((ord("q"), 100.0),))
    assert _text(model, "def", **forced.__dict__) == ("qqqqqq", FINISH_LENGTH)


def test_logit_bias_from_a_request_takes_openai_string_keys() -> None:
    params = SamplingParams.from_request({"logit_bias": {"256": -100, "10": 2.5}})
    assert params.logit_bias == ((10, 2.5), (256, -100))


@pytest.mark.parametrize(
    "bias",
    [{"x": 1}, {"257": 1}, {"-1": 1}, {"5": 101}, {"5": "a"}, [5], {"5": 1, " 5": "a"}],
)
def test_a_bad_logit_bias_names_the_field_and_the_accepted_range(bias: object) -> None:
    with pytest.raises(InvalidArgument, match=r"logit_bias.*0\.\.256.*\[-100, 100\]"):
        SamplingParams.from_request({"logit_bias": bias})


def test_max_tokens_and_context_bound_the_length(model: GPT) -> None:
    tokens = list(generate(model, "x", SamplingParams(max_tokens=5, temperature=0)))
    assert len(tokens) <= 5 and tokens[-1].finish is not None
    long_prompt = "a" * 100  # longer than block_size: left-truncated to block_size - 1
    tokens = list(generate(model, long_prompt, SamplingParams(max_tokens=50, temperature=0)))
    assert len(tokens) == 1 and tokens[0].finish == FINISH_LENGTH


def test_a_long_prompt_keeps_its_last_bytes_up_to_one_short_of_the_context() -> None:
    assert prompt_ids("xé" * 1000, block_size=4) == list("xé".encode())
    assert prompt_ids("abc", block_size=8) == list(b"abc")
    assert prompt_ids("", block_size=8) == [byte_tokenizer.EOT]
    assert prompt_ids("abc", block_size=1) == [byte_tokenizer.EOT]  # no room: the model starts


def test_generation_ends_before_a_stop_sequence(model: GPT) -> None:
    sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=11)
    text = "".join(t.text for t in generate(model, "def", sampled))
    stop = text[5:8]
    expected = text[: text.find(stop)]
    stopped = list(generate(model, "def", SamplingParams(**{**sampled.__dict__, "stop": (stop,)})))
    assert "".join(t.text for t in stopped) == expected
    assert stopped[-1].finish == FINISH_STOP


def test_text_stream_holds_back_a_possible_stop_prefix() -> None:
    stream = TextStream(stop=("END",))
    pieces = [stream.feed(i) for i in byte_tokenizer.encode("abEN")]
    assert "".join(pieces) == "ab" and not stream.finished
    assert stream.feed(ord("x")) == "ENx"
    assert stream.feed(ord("E")) == "" and stream.feed(ord("N")) == ""
    assert stream.feed(ord("D")) == "" and stream.finished


def test_end_of_text_token_finishes_the_stream() -> None:
    stream = TextStream()
    assert stream.feed(ord("a")) == "a"
    assert stream.feed(byte_tokenizer.EOT) == "" and stream.finished


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("temperature", 3.0), ("top_p", 0.0), ("top_k", -1), ("stop", ("",))],
)
def test_bad_sampling_parameters_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"stop": 5}, "stop"), ({"stop": {"a": 1}}, "stop"), ({"seed": 2**70}, "seed")],
)
def test_a_request_of_the_wrong_shape_names_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams.from_request(body)


def test_sampler_without_seed_still_samples_valid_tokens() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0))
    assert 0 <= sampler.pick(torch.zeros(byte_tokenizer.VOCAB_SIZE)) < byte_tokenizer.VOCAB_SIZE


def test_corpus_windows_predict_the_next_token() -> None:
    (x, y), (x_test, _) = gpt_corpus.split(block_size=16, max_bytes=20_000)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(x[1:, 0], y[:-1, -1])
    assert len(x_test) >= 1 and len(x) > 8 * len(x_test)
    assert x.dtype == np.int64 and int(x.max()) <= byte_tokenizer.EOT


def test_corpus_is_the_same_every_time() -> None:
    np.testing.assert_array_equal(gpt_corpus.tokens(5_000), gpt_corpus.tokens(5_000))
    assert gpt_corpus.tokens(5_000)[:6].tolist() != [0] * 6


def test_gpt_config_defaults_fit_the_tokenizer() -> None:
    assert GPTConfig().vocab_size == byte_tokenizer.VOCAB_SIZE


def test_config_errors_name_the_field() -> None:
    with pytest.raises(InvalidArgument, match="n_embd=30 must be a multiple of n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(InvalidArgument, match="block_size=0"):
        GPTConfig(block_size=0)


def test_the_zoo_builds_it_and_artifacts_round_trip(model: GPT) -> None:
    assert zoo.parameter_count("gpt", CONFIG) == parameter_count(model.config)
    files, manifest = artifacts.pack(model, "gpt", CONFIG)
    loaded = artifacts.materialize(manifest, files)
    ids = torch.arange(12)[None]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids))
    assert isinstance(zoo.build("gpt", CONFIG), GPT)
