"""`maas models import` refuses, before registering, what inference could not serve.

Every fixture is a tiny BERT (hidden 8, two layers) with a six-token tokenizer, written to
tmp_path in the sentence-transformers layout, then spoiled one way per test.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from maas import zoo
from maas.cli_import import import_pretrained
from maas.errors import FailedPrecondition, InvalidArgument
from maas.text.bert_config import BertConfig
from maas.text.pretrained import (
    CONFIG_MAX_BYTES,
    POOLING,
    SIDE_FILE_MAX_BYTES,
    WEIGHTS,
    check_weights,
    read_directory,
)
from maas.text.tokenizer import TOKENIZER_MAX_BYTES, TextTokenizer

TINY = {
    "vocab_size": 16,
    "hidden": 8,
    "heads": 2,
    "layers": 2,
    "intermediate": 16,
    "max_positions": 16,
    "max_seq_length": 16,
}
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5}


def tokenizer_json(vocab: dict[str, int] = VOCAB) -> str:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tok.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok.to_str()


def tiny_state(**config: Any) -> dict[str, torch.Tensor]:
    return dict(zoo.build("bert", {**TINY, **config}).state_dict())


def model_dir(
    directory: Path,
    state: dict[str, torch.Tensor] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    save_file(tiny_state() if state is None else state, str(directory / WEIGHTS))
    (directory / "tokenizer.json").write_text(tokenizer_json())
    (directory / "vocab.txt").write_text("\n".join(VOCAB))
    config_json = {"num_attention_heads": 2, "pad_token_id": 0, **(config or {})}
    (directory / "config.json").write_text(json.dumps(config_json))
    (directory / "sentence_bert_config.json").write_text('{"max_seq_length": 16}')
    return directory


def test_a_sound_directory_imports(tmp_path: Path) -> None:
    pretrained = read_directory(model_dir(tmp_path))
    assert (pretrained.config.layers, pretrained.config.heads) == (2, 2)
    assert set(pretrained.files) == {"tokenizer.json", "vocab.txt"}


# --- the config: absurd sizes, wrong types, ids outside the vocabulary (H1, M1, L1) ---------


def test_a_layer_index_beyond_the_bound_is_refused_before_any_loop(tmp_path: Path) -> None:
    state = tiny_state()
    state["encoder.layer.99999999.output.dense.bias"] = torch.zeros(8)
    with pytest.raises(InvalidArgument, match=r"layer '99999999'; a bert model has at most 1024"):
        read_directory(model_dir(tmp_path, state))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("encoder.layer.x.output.dense.bias", r"'encoder\.layer\.x\..*' has no layer number"),
        ("encoder.layer.5.output.dense.bias", r"up to 5 but none numbered 2, 3, 4"),
    ],
)
def test_layer_numbers_must_be_numbers_without_gaps(tmp_path: Path, name: str, match: str) -> None:
    state = {**tiny_state(), name: torch.zeros(8)}
    with pytest.raises(InvalidArgument, match=match):
        read_directory(model_dir(tmp_path, state))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"pad_token_id": 10**9}, r"pad_token_id=1000000000 must be a token id, in 0\.\.vocab"),
        ({"num_attention_heads": 0}, r"heads=0 must be in 1\.\.1024 .*num_attention_heads"),
        ({"num_attention_heads": "many"}, r"config\.json: num_attention_heads='many' must be an"),
        ({"num_attention_heads": [2]}, r"config\.json: num_attention_heads=\[2\] must be an int"),
        ({"layer_norm_eps": "small"}, r"config\.json: layer_norm_eps='small' must be a number"),
        # a computation other than the encoder's
        ({"model_type": "roberta"}, r"model_type='roberta' is not what the platform's encoder"),
        ({"hidden_act": "gelu_new"}, r"hidden_act='gelu_new' .* \(hidden_act 'gelu'\)"),
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key'"),
    ],
)
def test_a_config_json_that_cannot_work_is_refused_naming_the_key(
    tmp_path: Path, config: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        read_directory(model_dir(tmp_path, config=config))


def test_a_config_whose_sizes_are_not_the_weights_is_refused_naming_both(tmp_path: Path) -> None:
    config = {"hidden_size": 8, "num_hidden_layers": 12}  # the weights: 8 wide, 2 layers
    with pytest.raises(InvalidArgument, match=r"num_hidden_layers=12 \(the weights have 2\)"):
        read_directory(model_dir(tmp_path, config=config))


def test_the_config_of_bert_itself_imports(tmp_path: Path) -> None:
    config = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    config |= {"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": TINY["vocab_size"]}
    assert read_directory(model_dir(tmp_path, config=config)).config.layers == 2


def test_a_sentence_transformers_stage_the_encoder_lacks_is_refused(tmp_path: Path) -> None:
    model_dir(tmp_path)
    stages = ["Transformer", "Pooling", "Dense", "Normalize"]
    modules = [{"type": f"sentence_transformers.models.{kind}"} for kind in stages]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        InvalidArgument, match=r"modules\.json lists 'sentence_transformers.models.Dense'"
    ):
        read_directory(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "sentence_bert_config.json", POOLING])
def test_deeply_nested_json_is_invalid_json_not_a_crash(tmp_path: Path, name: str) -> None:
    model_dir(tmp_path)
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidArgument, match=rf"{name} is not valid JSON: .*recursion"):
        read_directory(tmp_path)


# --- the weights file: malformed, or not the model the config describes (L1, M3) -------------


def _spoil_weights(directory: Path, data: bytes) -> None:
    (directory / WEIGHTS).write_bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        os.urandom(4096),
        struct.pack("<Q", 10**12),  # a header length past the end
        b"truncated",  # replaced below by half a real file
    ],
    ids=["empty", "garbage", "header-only", "truncated"],
)
def test_a_malformed_safetensors_file_is_refused(tmp_path: Path, data: bytes) -> None:
    model_dir(tmp_path)
    if data == b"truncated":
        whole = (tmp_path / WEIGHTS).read_bytes()
        data = whole[: len(whole) // 2]
    _spoil_weights(tmp_path, data)
    with pytest.raises(InvalidArgument, match=r"model\.safetensors is not a safetensors file"):
        read_directory(tmp_path)


def test_lying_offsets_in_a_safetensors_header_are_refused(tmp_path: Path) -> None:
    model_dir(tmp_path)
    header = {"embeddings.word_embeddings.weight": {"dtype": "F32", "shape": [10**8, 1000]}}
    header["embeddings.word_embeddings.weight"]["data_offsets"] = [0, 16]
    raw = json.dumps(header).encode()
    _spoil_weights(tmp_path, struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(InvalidArgument, match="is not a safetensors file"):
        read_directory(tmp_path)


def _without(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != name}


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (
            lambda s: {**s, "evil.__class__": torch.zeros(1)},
            r"tensors the model does not have: evil\.__class__",
        ),
        (
            lambda s: _without(s, "encoder.layer.1.output.LayerNorm.bias"),
            r"missing tensors: encoder\.layer\.1\.output\.LayerNorm\.bias",
        ),
        (
            lambda s: {k: (v * 1000).to(torch.int32) for k, v in s.items()},
            r"weights must be floating point \(float16, .*\); these are not: embeddings\.",
        ),
        (
            lambda s: {**s, "encoder.layer.1.attention.self.query.weight": torch.zeros(8, 9)},
            r"attention\.self\.query\.weight is \[8, 9\], the config gives \[8, 8\]",
        ),
        (
            lambda s: {**s, "embeddings.word_embeddings.weight": torch.zeros(16)},
            r"embeddings\.word_embeddings\.weight has shape \[16\]; .* 2 dimensions",
        ),
    ],
    ids=["extra", "missing", "int32", "inner-shape", "1-d-embedding"],
)
def test_weights_that_cannot_build_the_model_are_refused(
    tmp_path: Path, spoil: Any, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        read_directory(model_dir(tmp_path, spoil(tiny_state())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_float_weights_are_accepted(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {k: v.to(dtype) for k, v in tiny_state().items()}
    assert (
        read_directory(model_dir(tmp_path, state)).state["embeddings.LayerNorm.bias"].dtype == dtype
    )


def test_weights_holding_nan_or_infinity_are_refused_naming_the_tensor() -> None:
    state = tiny_state()
    state["embeddings.LayerNorm.bias"][0] = float("nan")
    state["embeddings.LayerNorm.weight"][1] = float("inf")
    named = r"NaN or infinite values: embeddings\.LayerNorm\.bias, embeddings\.LayerNorm\.weight$"
    with pytest.raises(InvalidArgument, match=named):
        check_weights(BertConfig(**TINY), state, "weights")


def test_check_weights_needs_no_files() -> None:
    config = BertConfig(**TINY)
    check_weights(config, tiny_state(), "weights")
    with pytest.raises(InvalidArgument, match=r"^weights does not match"):
        check_weights(config, _without(tiny_state(), "embeddings.LayerNorm.weight"), "weights")


# --- the tokenizer: parsed at import, and it must fit the vocabulary (M1, M3) ----------------


def test_a_tokenizer_of_random_bytes_is_refused_at_import(tmp_path: Path) -> None:
    model_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xb6" + os.urandom(4999))
    with pytest.raises(InvalidArgument, match=r"tokenizer\.json is not a tokenizers file: 'utf-8"):
        read_directory(tmp_path)


def without_unknown_token() -> str:
    return tokenizer_json({k: v for k, v in VOCAB.items() if k != "[UNK]"})


def test_a_tokenizer_without_its_unknown_token_is_refused_at_import(tmp_path: Path) -> None:
    # It imported, then every request with a word outside the vocabulary was an INTERNAL.
    model_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text(without_unknown_token())
    with pytest.raises(InvalidArgument, match=r"tokenizer\.json cannot encode the text \("):
        read_directory(tmp_path)


def test_a_text_the_tokenizer_cannot_encode_is_the_models_failed_precondition() -> None:
    tokenizer = TextTokenizer(without_unknown_token(), max_length=16)
    assert tokenizer.ids(["hello world"]) == [[2, 4, 5, 3]]
    with pytest.raises(FailedPrecondition, match="Missing \\[UNK\\] token"):
        tokenizer.ids(["goodbye"])


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(tmp_path: Path) -> None:
    state = tiny_state(vocab_size=4)  # the tokenizer emits ids up to 5
    with pytest.raises(InvalidArgument, match=r"token ids up to 5 but the model's .* has 4"):
        read_directory(model_dir(tmp_path, state))


# --- sizes and symlinks (H3, L2) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cap"),
    [("vocab.txt", SIDE_FILE_MAX_BYTES), ("config.json", CONFIG_MAX_BYTES)],
)
def test_a_side_file_over_its_cap_is_refused_naming_it_its_size_and_the_cap(
    tmp_path: Path, name: str, cap: int
) -> None:
    model_dir(tmp_path)
    os.truncate(tmp_path / name, cap + 1)  # sparse: no disk used
    with pytest.raises(InvalidArgument, match=rf"{name} is {cap + 1:,} bytes; .* most {cap:,}"):
        read_directory(tmp_path)


def test_a_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("root:x:0:0\n")
    (tmp_path / "model").mkdir()
    directory = model_dir(tmp_path / "model")
    (directory / "vocab.txt").unlink()
    (directory / "vocab.txt").symlink_to(outside)
    with pytest.raises(InvalidArgument, match=r"vocab\.txt resolves to .*secret, outside the"):
        read_directory(directory)


def test_a_symlink_inside_the_directory_is_followed(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    (directory / "vocab.txt").rename(directory / "vocab-copy.txt")
    (directory / "vocab.txt").symlink_to("vocab-copy.txt")
    assert read_directory(directory).files["vocab.txt"].startswith(b"[PAD]")


def test_the_import_registers_nothing_it_refuses(tmp_path: Path) -> None:
    model_dir(tmp_path, config={"pad_token_id": 99})

    class Registry:
        async def register(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("a refused model must not reach the registry")

    with pytest.raises(InvalidArgument, match="pad_token_id=99"):
        asyncio.run(import_pretrained(Registry(), str(tmp_path), "tiny"))


def test_a_name_no_model_can_take_is_refused_before_the_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was refused by the registry after seconds of reading and checking the weights.
    def read_source(source: str) -> None:
        raise AssertionError("the directory must not be read")

    monkeypatch.setattr("maas.text.pretrained.read_source", read_source)
    with pytest.raises(InvalidArgument, match="model name 'bad name'"):
        asyncio.run(import_pretrained(None, str(tmp_path), "bad name"))


# --- the tokenizer loader itself: artifacts registered by older versions or other tools -----


def test_the_loader_refuses_a_tokenizer_over_the_cap_before_parsing() -> None:
    with pytest.raises(InvalidArgument, match=rf"is {TOKENIZER_MAX_BYTES + 1:,} bytes; .* at most"):
        TextTokenizer(b" " * (TOKENIZER_MAX_BYTES + 1), max_length=16)


def test_the_loader_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(InvalidArgument, match=r"^tokenizer\.json is not a tokenizers file: 'utf"):
        TextTokenizer(b"\xb6\x00\xff", max_length=16)


def test_the_loader_knows_the_highest_id_it_emits() -> None:
    assert TextTokenizer(tokenizer_json(), max_length=16).max_id == 5
