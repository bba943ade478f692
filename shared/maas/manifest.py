"""The artifact manifest: what ``manifest.json`` says about a model's files, and its one parser.

An artifact is a set of files under ``maas-models/<name>/<version>/``: one or more
``*.safetensors`` files and ``manifest.json`` (written last). The manifest records the arch and
config to rebuild the module, the sha256 of every file, lineage (parent, method, settings, job)
and metrics; ``format`` says how the stored tensors become a module (see ``maas.artifacts``).

Pure Python (no torch): the registry validates uploads with ``parse_manifest``, the compressor
and the loader read stored manifests with ``Manifest.from_json`` (the same checks, failing as an
IntegrityError), and ``verify`` checks files against the digests the manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from maas import zoo
from maas.errors import IntegrityError, InvalidArgument, ResourceExhausted
from maas.events import clip, json_failure
from maas.names import check_name, check_version

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_VERSION = 1
SHA256_HEX = frozenset("0123456789abcdef")


@dataclass
class Manifest:
    arch: str
    config: dict[str, Any]
    format: str = "dense"
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {dtype, shape}
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    parent: dict[str, Any] | None = None  # {"name", "version"}
    method: str | None = None  # "train", "finetune", "quantize", "prune", "distill", ...
    settings: dict[str, Any] = field(default_factory=dict)  # method settings, for lineage
    job_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """A stored manifest (the registry accepted it): IntegrityError if it is not one."""
        try:
            return parse_manifest(data)
        except (InvalidArgument, ResourceExhausted) as exc:
            raise IntegrityError(f"manifest.json is not a valid manifest: {exc}") from None


def parse_manifest(
    data: bytes | str, *, max_bytes: int | None = None, max_metrics: int | None = None
) -> Manifest:
    """Validate a manifest; InvalidArgument names the field, ResourceExhausted the exceeded bound.

    Fields other than the manifest's own are ignored, so a newer writer's additions do not break
    an older reader.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise ResourceExhausted(
            f"manifest_json is {len(data)} bytes; at most {max_bytes} are accepted "
            "(MAAS_REGISTRY_MAX_MANIFEST_BYTES)"
        )
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"manifest_json is not JSON: {json_failure(exc)}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("manifest_json must be a JSON object (maas.manifest.Manifest)")
    return Manifest(
        arch=_token(obj.get("arch"), "arch", "a zoo architecture name, e.g. 'mlp'"),
        config=_object(obj.get("config", {}), "config"),
        format=_token(obj.get("format", "dense"), "format", "'dense' or a compressed format"),
        tensors=_tensors(obj.get("tensors") or {}),
        files=_files(obj.get("files")),
        parent=_parent(obj.get("parent")),
        method=_optional_text(obj, "method"),
        settings=_object(obj.get("settings") or {}, "settings"),
        job_id=_optional_text(obj, "job_id"),
        metrics=_metrics(obj.get("metrics") or {}, max_metrics),
        manifest_version=_manifest_version(obj.get("manifest_version", MANIFEST_VERSION)),
    )


# The spelling of ``arch`` and ``format``. Which names exist is the reader's question (an
# unknown one is refused when the artifact is built, naming the known ones), so a registry
# accepts a newer writer's format; it refuses what no format could be called.
TOKEN_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _token(value: Any, key: str, meaning: str) -> str:
    if not isinstance(value, str) or not TOKEN_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"manifest.{key} must be {meaning}: 1-64 lowercase letters, digits, '_' or '-'"
        )
    return value


def _object(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"manifest.{key} must be an object")
    return value


def _files(files: Any) -> dict[str, str]:
    if not isinstance(files, dict) or not files:
        raise InvalidArgument("manifest.files must map at least one file name to its sha256")
    for name, digest in files.items():
        check_name(name, what="artifact file name")
        if name == MANIFEST_FILE:
            raise InvalidArgument(f"manifest.files must not list {MANIFEST_FILE} itself")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= SHA256_HEX:
            raise InvalidArgument(f"manifest.files[{name!r}] must be a lowercase sha256 hex")
    return dict(files)


def _parent(parent: Any) -> dict[str, Any] | None:
    if parent is None:
        return None
    if not isinstance(parent, dict) or set(parent) != {"name", "version"}:
        raise InvalidArgument('manifest.parent must be null or {"name": ..., "version": N}')
    return {"name": check_name(parent["name"]), "version": check_version(parent["version"])}


def _optional_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(f"manifest.{key} must be a string or null")
    return value or None


def _metrics(metrics: Any, limit: int | None) -> dict[str, float]:
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise InvalidArgument("manifest.metrics must map names to numbers")
    if limit is not None and len(metrics) > limit:
        raise ResourceExhausted(
            f"manifest.metrics has {len(metrics)} entries; at most {limit} are accepted "
            "(MAAS_REGISTRY_MAX_METRICS)"
        )
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except OverflowError:
        raise InvalidArgument("manifest.metrics holds a number too large for a double") from None


def _tensors(tensors: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(tensors, dict) or not all(
        isinstance(t, dict)
        and isinstance(t.get("dtype"), str)
        and isinstance(t.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
        for t in tensors.values()
    ):
        raise InvalidArgument(
            'manifest.tensors must map tensor names to {"dtype": "float32", "shape": [3, 4]}'
        )
    return tensors


def _manifest_version(version: Any) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidArgument(
            f"manifest.manifest_version must be a positive integer, e.g. {MANIFEST_VERSION}"
        )
    return version


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    """Raise IntegrityError unless every file the manifest lists is present with its sha256."""
    for name, expected in manifest.files.items():
        data = files.get(name)
        if data is None:
            raise IntegrityError(f"artifact file {name!r} listed in the manifest is missing")
        actual = sha256_hex(data)
        if actual != expected:
            raise IntegrityError(
                f"artifact file {name!r} has sha256 {actual[:12]}…, the manifest says "
                f"{expected[:12]}…: refusing a tampered or truncated artifact"
            )


def check_buildable(manifest: Manifest, max_params: int) -> None:
    """InvalidArgument unless the zoo can build ``arch`` + ``config`` within ``max_params``
    (plain Python, nothing allocated): a version no server could load is refused at the door, not
    found out by its first request."""
    try:
        zoo.check_size(manifest.arch, manifest.config, max_params, where="manifest.config")
    except InvalidArgument as exc:
        if exc.message.startswith("manifest."):
            raise
        raise InvalidArgument(f"manifest.arch: {exc.message}") from None


def check_finite_metrics(manifest: Manifest) -> None:
    """InvalidArgument naming the first metric that is NaN or infinite: a registered number
    must compare (promotion policies rank by them) and print as JSON."""
    for name, value in manifest.metrics.items():
        if not math.isfinite(value):
            raise InvalidArgument(
                f"manifest.metrics.{clip(name, 60)} is {value}; metrics must be finite numbers"
            )
