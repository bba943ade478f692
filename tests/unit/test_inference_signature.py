"""What a served model's signature says to a request that does not fit it."""

from __future__ import annotations

import numpy as np
import pytest

from maas.errors import InvalidArgument
from services.inference.signature import Signature

GPT = {"block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 8}


def test_text_sent_to_a_text_generator_is_told_where_generation_is_served() -> None:
    signature = Signature.for_zoo("gpt", GPT)
    with pytest.raises(InvalidArgument) as refused:
        signature.check_inputs({"text": np.array([b"def "], dtype=object)}, model="'pygpt' v2")
    message = refused.value.message
    assert "expects exactly one input 'input' (FP32, shape [-1, 16])" in message
    assert "token ids below 257" in message and "POST /v1/completions" in message


def test_a_model_of_plain_numbers_gets_no_note_on_generation() -> None:
    signature = Signature.for_zoo("mlp", {"in_features": 4, "hidden": [8], "num_classes": 3})
    with pytest.raises(InvalidArgument) as refused:
        signature.check_inputs({"text": np.array([b"x"], dtype=object)}, model="'m' v1")
    assert "OpenAI" not in refused.value.message
