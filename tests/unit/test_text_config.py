"""The text models' configs refuse absurd sizes by name, before anything is sized or built."""

from __future__ import annotations

import dataclasses
import time

import pytest

from maas import zoo
from maas.errors import InvalidArgument
from maas.text.bert_config import MAX_LAYERS, BertConfig, bert_parameters
from maas.text.gpt_config import GPTConfig

SMALL = {"hidden": 16, "heads": 2, "layers": 3, "intermediate": 32, "vocab_size": 50}


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("layers", 300_000_000, f"1..{MAX_LAYERS}"),
        ("layers", 0, f"1..{MAX_LAYERS}"),
        ("hidden", 10**30, "1..65536"),
        ("heads", 10**30, "1..1024"),
        ("heads", 0, "1..1024"),
        ("intermediate", 10**30, "1..262144"),
        ("vocab_size", 10**30, "1..4194304"),
        ("max_positions", 10**30, "1..1048576"),
        ("num_classes", 10**30, "0..1048576"),
    ],
)
def test_an_absurd_bert_size_is_refused_at_once_naming_the_field_and_range(
    field: str, value: int, accepted: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidArgument, match=rf"{field}={value} must be in {accepted}"):
        zoo.check_size("bert", {field: value}, limit=10**8)
    assert time.perf_counter() - started < 0.5  # 300 M layers once took 94 s


def test_a_pad_token_id_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(
        InvalidArgument, match=r"pad_token_id=50 must be a token id, in 0\.\.vocab_size-1 \(49\)"
    ):
        BertConfig(**SMALL, pad_token_id=50)  # type: ignore[arg-type]
    assert BertConfig(**SMALL, pad_token_id=49).pad_token_id == 49  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["many", [4], 2.0, True])
def test_a_bert_size_that_is_not_an_integer_is_named(value: object) -> None:
    with pytest.raises(InvalidArgument, match=r"heads=.* must be an integer"):
        zoo.parse_config("bert", {"heads": value})


def test_per_layer_widths_must_be_integers_within_the_fields_range() -> None:
    with pytest.raises(InvalidArgument, match=r"layer_heads=.* must be a list of integers"):
        zoo.parse_config("bert", {**SMALL, "layer_heads": [1, "a", 1]})
    with pytest.raises(
        InvalidArgument, match=r"layer_intermediate=\[1, 300000, 1\] .* 0\.\.262144"
    ):
        zoo.parse_config("bert", {**SMALL, "layer_intermediate": [1, 300_000, 1]})


@pytest.mark.parametrize(
    "widths",
    [{}, {"layer_heads": [2, 1, 1], "layer_intermediate": [32, 5, 1], "num_classes": 3}],
)
def test_the_closed_form_parameter_count_equals_the_built_modules(widths: dict) -> None:
    config = {**SMALL, **widths}
    assert zoo.parameter_count("bert", config) == zoo.count_parameters(zoo.build("bert", config))


def _unchecked(**values: int) -> BertConfig:
    """A config that skipped __post_init__'s bounds, as an older artifact's might have."""
    config = object.__new__(BertConfig)
    for f in dataclasses.fields(BertConfig):
        object.__setattr__(config, f.name, values.get(f.name, f.default))
    return config


def test_the_parameter_count_never_loops_over_the_layers() -> None:
    started = time.perf_counter()
    parts = dict(bert_parameters(_unchecked(layers=10**12)))
    assert time.perf_counter() - started < 0.01
    assert parts["layers"] == 10**12 * dict(bert_parameters(_unchecked(layers=1)))["layers"]


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("n_layer", 10**9, "1..1024"),
        ("block_size", 10**9, "1..65536"),
        ("n_embd", 10**30, "1..65536"),
        ("n_head", 0, "1..1024"),
    ],
)
def test_an_absurd_gpt_size_is_refused_naming_the_field_and_range(
    field: str, value: int, accepted: str
) -> None:
    with pytest.raises(
        InvalidArgument, match=rf"model\.config\.{field}={value} must be in {accepted}"
    ):
        GPTConfig(**{field: value})  # type: ignore[arg-type]
