"""The GPT as an ordinary platform job: a train event on builtin:python-stdlib, planned like any
other, trained by the parameter server's own worker and shard cores (vertical split: whole
tensors on shards), evaluated with held-out loss and perplexity; int8 compression applies."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from maas import artifacts, zoo
from maas.compression import formats
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, generate
from maas.training.local import simulate
from maas.training.prepare import Limits, PreparedJob, prepare_job
from maas.training.replica import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = Limits(max_workers=4, max_shards=4, default_deadline_ms=1000)
CONFIG = {"block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 32}


def _job(**training: Any) -> PreparedJob:
    event = {
        "job_id": "gpt-unit",
        "type": "train",
        "model": {"name": "pygpt", "arch": "gpt", "config": CONFIG},
        "dataset": {"uri": "builtin:python-stdlib", "fraction": 0.25},
        "training": {
            "steps": 16,
            "batch_size": 4,
            "optimizer": {"name": "adam", "lr": 0.01},
            **training,
        },
    }
    return prepare_job(event, limits=LIMITS)


def _model(state: dict[str, torch.Tensor]) -> GPT:
    model = zoo.build("gpt", CONFIG)
    model.load_state_dict(state)
    assert isinstance(model, GPT)
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[PreparedJob, dict[str, torch.Tensor]]:
    job = _job(workers=2, shards=2, split="vertical")
    return job, simulate(job.plan, job.state, job.dataset)


def test_vertical_split_puts_whole_tensors_on_the_shards(
    trained: tuple[PreparedJob, dict[str, torch.Tensor]],
) -> None:
    job, _ = trained
    assert job.plan.loss == "cross_entropy" and job.plan.training.split == "vertical"
    assert len(job.plan.partitions) == 2


def test_training_lowers_held_out_loss_and_reports_perplexity(
    trained: tuple[PreparedJob, dict[str, torch.Tensor]],
) -> None:
    job, state = trained
    x, y = job.dataset.x_test[:64], job.dataset.y_test[:64]
    before = evaluate(_model(job.state), x, y, job.plan.loss)
    after = evaluate(_model(state), x, y, job.plan.loss)
    assert before["loss"] == pytest.approx(math.log(257), rel=0.05)  # uniform over bytes
    assert after["loss"] < before["loss"] - 1.0
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert 0 < after["accuracy"] <= 1


def test_an_int8_variant_generates_beside_the_fp32_model(
    trained: tuple[PreparedJob, dict[str, torch.Tensor]],
) -> None:
    _, state = trained
    fp32 = _model(state)
    codec, stored = formats.encode(fp32, {}, "int8")
    files, manifest = artifacts.pack(stored, "gpt", CONFIG, format=codec)
    int8 = artifacts.materialize(manifest, files)
    # Linear weights shrink 4x; embeddings and norms stay fp32.
    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    assert isinstance(int8, GPT) and len(files["weights.safetensors"]) < 0.6 * fp32_bytes
    ids = torch.from_numpy(np.frombuffer(b"import os\ndef main():", np.uint8).astype(np.int64))
    with torch.inference_mode():
        close = torch.nn.functional.cosine_similarity(int8(ids[None]), fp32(ids[None]), dim=-1)
    assert float(close.min()) > 0.99
    tokens = list(generate(int8, "def ", SamplingParams(max_tokens=8, temperature=0)))
    assert 1 <= len(tokens) <= 8 and tokens[-1].finish is not None
