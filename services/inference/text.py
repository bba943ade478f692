"""Serving text models (arch ``bert``): strings in over the protocol, tokenized in the server.

A text model takes one input ``text``: ``BYTES``, shape ``[N]`` or ``[N, 1]``, each element one
UTF-8 text. The encoder returns ``embedding`` (FP32 ``[N, hidden]``, L2-normalised); a
classifier returns ``probabilities`` (FP32 ``[N, classes]``) and ``label`` (BYTES ``[N]``, the
most probable class name). Documented behaviour of edge cases:

- invalid UTF-8 -> INVALID_ARGUMENT naming the element;
- an empty string is a valid text (``[CLS] [SEP]``) and gets its embedding;
- a text longer than the model's ``max_seq_length`` tokens is truncated to it (its tail is not
  read, as in sentence-transformers); the reply is otherwise normal;
- more than ``MAX_TEXTS`` texts, or one over ``MAX_TEXT_BYTES`` bytes -> INVALID_ARGUMENT.

Each request is tokenized on arrival into rows of ``max_seq_length`` token ids (zero-padded), so
the dynamic batcher joins requests as it joins any rows. The module itself (``maas.text.bert``)
runs a batch's rows in groups of similar length and cuts the columns a group leaves padded: a
batch pays for its longest sequence per group, not for 256.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from maas import artifacts
from maas.errors import InvalidArgument
from maas.events import shown
from maas.text import corpus
from maas.text.bert_config import BertConfig
from maas.text.model import ARCH, text_config
from maas.text.tokenizer import TOKENIZER_FILE, TextTokenizer
from maas.text.wire import BYTES
from services.inference.signature import BATCH_DIM, Signature, TensorSpec, datatype_of

if TYPE_CHECKING:
    from services.inference.loading import ModelSource


TEXT_INPUT = "text"
EMBEDDING = "embedding"
PROBABILITIES = "probabilities"
LABEL = "label"
MAX_TEXTS = 256
MAX_TEXT_BYTES = 64 * 1024
MAX_LINEAGE_DEPTH = 16


@dataclass(frozen=True)
class TextSignature(Signature):
    tokenizer: TextTokenizer | None = None
    labels: tuple[str, ...] = ()

    @classmethod
    def for_text(
        cls, config: BertConfig, tokenizer: TextTokenizer, labels: Sequence[str]
    ) -> TextSignature:
        outputs: tuple[TensorSpec, ...]
        if config.num_classes:
            outputs = (
                TensorSpec(PROBABILITIES, "FP32", (BATCH_DIM, config.num_classes)),
                TensorSpec(LABEL, BYTES, (BATCH_DIM,)),
            )
        else:
            outputs = (TensorSpec(EMBEDDING, "FP32", (BATCH_DIM, config.hidden)),)
        return cls(
            inputs=(TensorSpec(TEXT_INPUT, BYTES, (BATCH_DIM,)),),
            outputs=outputs,
            tokenizer=tokenizer,
            labels=tuple(labels),
        )

    def check_inputs(self, inputs: Mapping[str, np.ndarray], *, model: str) -> np.ndarray:
        """The request's texts as token-id rows [N, max_seq_length]."""
        if set(inputs) != {TEXT_INPUT} or self.tokenizer is None:
            raise InvalidArgument(
                f"{model} expects exactly one input {self.inputs[0].describe()} of UTF-8 "
                f"texts; the request has {shown(sorted(inputs), 200) if inputs else 'no inputs'}"
            )
        array = inputs[TEXT_INPUT]
        if array.dtype != np.object_ or not (
            array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)
        ):
            sent = BYTES if array.dtype == np.object_ else datatype_of(array)
            raise InvalidArgument(
                f"input {TEXT_INPUT!r} has datatype {sent} and shape {list(array.shape)}; "
                f"{model} expects BYTES with shape [N] or [N, 1]"
            )
        texts = decode_texts(array.reshape(-1).tolist())
        return self.tokenizer.encode(texts, width=self.tokenizer.max_length)

    def outputs_of(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self.outputs[0].name == EMBEDDING:
            return {EMBEDDING: rows}
        shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
        probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
        labels = np.empty(len(rows), dtype=object)
        labels[:] = [self.labels[i].encode() for i in probabilities.argmax(axis=1)]
        return {PROBABILITIES: probabilities, LABEL: labels}


def decode_texts(items: Sequence[object]) -> list[str]:
    if not 1 <= len(items) <= MAX_TEXTS:
        raise InvalidArgument(
            f"input {TEXT_INPUT!r} has {len(items)} texts; send 1 to {MAX_TEXTS} per request"
        )
    texts: list[str] = []
    for i, item in enumerate(items):
        data = item if isinstance(item, bytes) else str(item).encode()
        if len(data) > MAX_TEXT_BYTES:
            raise InvalidArgument(
                f"input {TEXT_INPUT!r} element {i} has {len(data)} bytes; at most "
                f"{MAX_TEXT_BYTES} per text (longer texts are truncated to the model's "
                "max_seq_length tokens anyway)"
            )
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"input {TEXT_INPUT!r} element {i} is not valid UTF-8 ({exc.reason} at byte "
                f"{exc.start}); send each text UTF-8 encoded"
            ) from None
    return texts


def labels_for(config: BertConfig, dataset_uri: str | None) -> tuple[str, ...]:
    if dataset_uri == f"builtin:{corpus.NAME}" and config.num_classes == len(corpus.LABELS):
        return corpus.LABELS
    return tuple(str(i) for i in range(config.num_classes))


def is_text(manifest: artifacts.Manifest) -> bool:
    return manifest.arch == ARCH


async def lineage_extras(
    manifest: artifacts.Manifest, files: Mapping[str, bytes], source: ModelSource
) -> tuple[dict[str, bytes], str | None]:
    """The tokenizer files and the training dataset of a text version, looked up its lineage.

    Fine-tuned and compressed versions do not copy the tokenizer of the encoder they descend
    from; the nearest ancestor that has one (the imported version) provides it.
    """
    tokenizer: dict[str, bytes] = {}
    dataset: str | None = None
    for _ in range(MAX_LINEAGE_DEPTH):
        if not tokenizer and TOKENIZER_FILE in files:
            tokenizer = {TOKENIZER_FILE: files[TOKENIZER_FILE]}
        found = manifest.settings.get("dataset")
        if dataset is None and isinstance(found, Mapping):
            dataset = str(found.get("uri", "")) or None
        if (tokenizer and dataset) or manifest.parent is None:
            break
        parent = manifest.parent
        manifest, files = await source.fetch(str(parent["name"]), int(parent["version"]))
    if not tokenizer:
        raise InvalidArgument(
            f"no {TOKENIZER_FILE} in this text model or its ancestors; register it with "
            "maas models import"
        )
    return tokenizer, dataset


async def text_signature(
    manifest: artifacts.Manifest, files: Mapping[str, bytes], source: ModelSource
) -> TextSignature:
    """A text version's signature, with its tokenizer and its label names."""
    config = text_config(manifest)
    tokenizer_files, dataset = await lineage_extras(manifest, files, source)
    tokenizer = TextTokenizer.from_files(
        tokenizer_files, max_length=config.max_seq_length, pad_id=config.pad_token_id
    )
    return TextSignature.for_text(config, tokenizer, labels_for(config, dataset))
