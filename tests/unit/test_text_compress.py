"""Compressing BERT encoders: int8 through the stored format, head/FFN pruning, layer students."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from maas import artifacts, zoo
from maas.compression import measure, pipeline, quant
from maas.compression.train import FitConfig, Tensors
from maas.text import compress, corpus
from maas.text.model import TextModel
from maas.text.pretrained import MINILM_PACKAGE, read_package

SMALL = {"hidden": 64, "heads": 4, "layers": 4, "intermediate": 128, "max_seq_length": 32}


def small(**extra: object) -> torch.nn.Module:
    return zoo.build("bert", {**SMALL, **extra}, seed=5).eval()


def token_rows(n: int = 8, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, 32), dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(3, 32))
        rows[i, :length] = rng.integers(1000, 30000, size=length)
    return torch.from_numpy(rows)


def stored(variant: pipeline.Variant) -> torch.nn.Module:
    fmt, tensors = variant.encode()
    files = {artifacts.WEIGHTS_FILE: st_save(tensors)}
    sha = {k: artifacts.sha256_hex(v) for k, v in files.items()}
    return artifacts.materialize(
        artifacts.Manifest(variant.arch, variant.config, fmt, files=sha), files
    )


def data_of(rows: torch.Tensor, classes: int = 3) -> Tensors:
    labels = torch.arange(len(rows)) % classes
    return Tensors(rows.float(), labels, rows.float(), labels, "classification")


def run_job(model: torch.nn.Module, config: dict[str, object], method: dict[str, object]):
    parent = pipeline.parent_variant(model, "bert", config)
    return pipeline.run(pipeline.parse_method(method), parent, data_of(token_rows()), FitConfig(2))


def test_int8_minilm_embeds_held_out_texts_within_cosine_0_99_of_fp32() -> None:
    minilm = TextModel.from_pretrained(read_package(MINILM_PACKAGE))
    config = zoo.config_to_dict(minilm.config)
    int8 = stored(run_job(minilm.module, config, {"quantize": {"dtype": "int8"}}))
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    assert any(isinstance(m, quant.Int8Linear) for m in int8.modules())
    texts = corpus.texts()[0]
    picked = np.random.default_rng(0).permutation(len(texts))[-64:]  # one batch, mixed lengths
    ids = torch.from_numpy(minilm.tokenizer.encode([texts[i] for i in picked]))
    with torch.inference_mode():
        # Full-range activations on 7-bit weights (quant.LINEAR_MAX); with 127-weights the AVX2
        # kernels need 7-bit activations and the cosine drops to about 0.975.
        assert compress.mean_cosine(minilm.module(ids), int8(ids)) >= 0.99


def test_an_int8_berts_query_key_and_value_run_as_one_layer_with_the_same_results() -> None:
    model = small()
    int8 = stored(run_job(model, SMALL, {"quantize": {}}))
    attention = int8.encoder.layer[0].attention.self
    x = torch.randn(3, 5, SMALL["hidden"])
    with torch.inference_mode():
        together = attention._projections(x)
        apart = (attention.query(x), attention.key(x), attention.value(x))
    assert attention._int8_qkv is not None  # the joined layer was built and used
    for joined, alone in zip(together, apart, strict=True):
        assert torch.equal(joined, alone)


def test_pruning_nothing_changes_nothing() -> None:
    model = small()
    pruned, config = compress.prune_structured(model, 0.0)
    assert config["layer_heads"] == [4] * 4 and config["layer_intermediate"] == [128] * 4
    with torch.inference_mode():
        torch.testing.assert_close(pruned(token_rows()), model(token_rows()), atol=1e-6, rtol=0)


def test_structured_pruning_removes_heads_and_channels_per_layer() -> None:
    model = small(num_classes=3)
    pruned, config = compress.prune_structured(model, 0.5)
    assert config["layer_heads"] == [2] * 4 and config["layer_intermediate"] == [64] * 4
    assert zoo.count_parameters(pruned) == zoo.parameter_count("bert", config)
    assert zoo.count_parameters(pruned) < zoo.count_parameters(model)
    with torch.inference_mode():
        assert pruned(token_rows()).shape == (8, 3)


def test_a_prune_job_on_bert_runs_through_the_compression_pipeline() -> None:
    variant = run_job(small(), {**SMALL}, {"prune": {"sparsity": 0.25, "structured": True}})
    assert variant.config["layer_heads"] == [3] * 4
    rebuilt = stored(variant)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(token_rows()), variant.model(token_rows()))


def test_spaced_layers_keep_the_first_and_the_last() -> None:
    assert compress.spaced_layers(6, 3) == [0, 2, 5]
    assert compress.spaced_layers(4, 2) == [0, 3]


def test_a_layer_student_copies_the_teachers_layers() -> None:
    teacher = small()
    student = compress.layer_student(teacher, 2)
    assert student.config.layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(
        s["encoder.layer.1.output.dense.weight"], t["encoder.layer.3.output.dense.weight"]
    )
    assert torch.equal(
        s["embeddings.word_embeddings.weight"], t["embeddings.word_embeddings.weight"]
    )


def test_a_distill_job_starts_a_shallower_bert_from_the_teacher() -> None:
    teacher = small(num_classes=3)
    student_config = {**zoo.config_to_dict(teacher.config), "layers": 2}
    method = {"distill": {"student": {"arch": "bert", "config": student_config}, "steps": 1}}
    variant = run_job(teacher, {**SMALL, "num_classes": 3}, method)
    assert variant.config["layers"] == 2
    before = compress.layer_student(teacher, 2).state_dict()["encoder.layer.1.output.dense.bias"]
    after = variant.model.state_dict()["encoder.layer.1.output.dense.bias"]
    assert torch.allclose(before, after, atol=1e-2)  # one small step away from the copy


def test_distilling_embeddings_brings_a_student_closer_to_the_teacher() -> None:
    teacher = small()
    rows = token_rows(32, seed=1)
    student = zoo.build("bert", {**SMALL, "layers": 1}, seed=9)  # its own random weights
    with torch.inference_mode():
        before = compress.mean_cosine(teacher(rows), student(rows))
    compress.distill_embeddings(teacher, student, rows, FitConfig(30, batch_size=16, lr=1e-3))
    with torch.inference_mode():
        assert compress.mean_cosine(teacher(rows), student(rows)) > before


def test_a_headless_encoders_student_is_distilled_to_its_embeddings_not_to_classes() -> None:
    # Scored as classes, MiniLM's 384 embedding dimensions trained a student to cosine 0.13.
    teacher = small()
    student = {"arch": "bert", "config": {**SMALL, "layers": 2}}
    method = pipeline.parse_method({"distill": {"student": student, "steps": 40}})
    rows = token_rows(32, seed=2)
    parent = pipeline.parent_variant(teacher, "bert", SMALL)
    variant = pipeline.run(method, parent, data_of(rows), FitConfig(40, batch_size=16, lr=0.01))
    with torch.inference_mode():
        assert compress.mean_cosine(teacher(rows), variant.model.eval()(rows)) > 0.95


@pytest.mark.parametrize("keep", [0, 5])
def test_a_student_keeps_between_one_and_all_layers(keep: int) -> None:
    with pytest.raises(Exception, match="keeps 1..4"):
        compress.layer_student(small(), keep)


def test_an_encoders_variant_is_measured_by_its_cosine_to_the_parent_not_by_accuracy():
    # Scoring embedding dimensions as class logits gave a headless MiniLM "accuracy 0.003".
    parent = small()
    variant = run_job(parent, SMALL, {"quantize": {"dtype": "int8"}})
    fmt, tensors = variant.encode()
    files, manifest = artifacts.pack(tensors, variant.arch, variant.config, format=fmt)
    metrics = measure.artifact_metrics(
        manifest, files, data_of(token_rows()), latency_repeats=0, parent=parent
    )
    assert "accuracy" not in metrics and "loss" not in metrics
    assert 0.9 < metrics["cosine_to_parent"] <= 1.0 + 1e-6
