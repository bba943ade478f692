"""A text model in process: a ``bert`` module and its tokenizer, texts in, arrays out.

Built from an artifact (the registry's files: weights + ``tokenizer.json``) or from a pretrained
directory; the server, the bench, the demo and the tests all embed text through this one path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from maas import artifacts, zoo
from maas.errors import InvalidArgument
from maas.text.bert_config import BertConfig
from maas.text.pretrained import Pretrained
from maas.text.tokenizer import TextTokenizer

ARCH = "bert"


def text_config(manifest: artifacts.Manifest) -> BertConfig:
    if manifest.arch != ARCH:
        raise InvalidArgument(
            f"arch {manifest.arch!r} is not a text model; text models are {ARCH!r}"
        )
    config: BertConfig = zoo.parse_config(ARCH, manifest.config)
    return config


@dataclass
class TextModel:
    module: nn.Module
    tokenizer: TextTokenizer
    config: BertConfig

    @classmethod
    def from_artifact(
        cls,
        manifest: artifacts.Manifest,
        files: Mapping[str, bytes],
        tokenizer_files: Mapping[str, bytes] | None = None,
    ) -> TextModel:
        """``tokenizer_files``: where the tokenizer is when the artifact has none (a variant
        whose ancestor was imported)."""
        config = text_config(manifest)
        tokenizer = TextTokenizer.from_files(
            tokenizer_files or files, max_length=config.max_seq_length, pad_id=config.pad_token_id
        )
        return cls(artifacts.materialize(manifest, files), tokenizer, config)

    @classmethod
    def from_pretrained(cls, pretrained: Pretrained) -> TextModel:
        config = pretrained.config
        module = zoo.build_skeleton(ARCH, zoo.config_to_dict(config))
        module.load_state_dict(pretrained.state, strict=True, assign=True)
        tokenizer = TextTokenizer.from_files(
            pretrained.files, max_length=config.max_seq_length, pad_id=config.pad_token_id
        )
        return cls(module.eval(), tokenizer, config)

    def run_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token-id rows -> the module's output rows (embeddings or logits), float32."""
        with torch.inference_mode():
            out: np.ndarray = self.module(torch.from_numpy(ids)).float().numpy()
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.run_ids(self.tokenizer.encode(texts))
