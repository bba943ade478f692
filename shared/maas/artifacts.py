"""Model artifacts at rest: safetensors weights plus a JSON manifest, never pickle.

An artifact is a set of files under ``maas-models/<name>/<version>/``: one or more
``*.safetensors`` files and ``manifest.json`` (written last). The manifest records the arch and
config to rebuild the module, the sha256 of every file, and lineage (parent, method, settings,
job) and metrics.

``format`` says how the stored tensors become a runnable module. ``dense`` is a plain state dict;
compressed variants (int8, fp16, sparse, ...) register their own materializer with
``register_format`` so the one shared loader can run every variant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from maas import zoo
from maas.errors import IntegrityError, InvalidArgument

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_VERSION = 1


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
        try:
            obj = json.loads(data)
            return cls(**obj)
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"manifest.json is not a valid manifest: {exc}") from None


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def state_of(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = (
        module_or_state.state_dict()
        if isinstance(module_or_state, nn.Module)
        else dict(module_or_state)
    )
    # safetensors refuses shared or non-contiguous storage; detach + contiguous makes each own.
    return {k: v.detach().contiguous() for k, v in state.items()}


def pack(
    module_or_state: nn.Module | Mapping[str, torch.Tensor],
    arch: str,
    config: Mapping[str, Any],
    *,
    format: str = "dense",
    extra_files: Mapping[str, bytes] | None = None,
    **lineage: Any,
) -> tuple[dict[str, bytes], Manifest]:
    """Serialize weights into artifact files and the manifest that describes them.

    Returns ``({file name: bytes}, manifest)``; the manifest's ``files`` already holds every
    file's sha256. ``lineage`` are Manifest fields: parent, method, settings, job_id, metrics.
    """
    zoo.parse_config(arch, dict(config))  # refuse an unknown arch/config before any upload
    state = state_of(module_or_state)
    weights = st_save(state)
    files = {WEIGHTS_FILE: weights, **dict(extra_files or {})}
    manifest = Manifest(
        arch=arch,
        config=dict(config),
        format=format,
        tensors={
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in state.items()
        },
        files={name: sha256_hex(data) for name, data in files.items()},
        **lineage,
    )
    return files, manifest


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


Materializer = Callable[[Manifest, dict[str, torch.Tensor], Mapping[str, bytes]], nn.Module]
_FORMATS: dict[str, Materializer] = {}


def register_format(name: str, materializer: Materializer) -> None:
    """Teach the shared loader a stored format (called by the module that defines it)."""
    _FORMATS[name] = materializer


def _materialize_dense(
    manifest: Manifest, state: dict[str, torch.Tensor], files: Mapping[str, bytes]
) -> nn.Module:
    model = zoo.build_skeleton(manifest.arch, manifest.config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


register_format("dense", _materialize_dense)


def _ensure_formats_loaded() -> None:
    # Compressed formats register themselves on import; importing here keeps `materialize`
    # complete for every caller without a circular import at module load.
    try:
        import maas.compression  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "maas.compression":
            raise


def materialize(
    manifest: Manifest, files: Mapping[str, bytes], *, verified: bool = False
) -> nn.Module:
    """Files -> a runnable module in eval mode (no unpickling anywhere).

    Every file is checked against the manifest's sha256 unless the caller already checked each
    one against the same digests (``verified=True``, as the registry client does while reading).
    """
    if not verified:
        verify(manifest, files)
    _ensure_formats_loaded()
    materializer = _FORMATS.get(manifest.format)
    if materializer is None:
        raise InvalidArgument(
            f"artifact format {manifest.format!r} is unknown; known: {sorted(_FORMATS)}"
        )
    state = st_load(bytes(files[WEIGHTS_FILE])) if WEIGHTS_FILE in files else {}
    model = materializer(manifest, state, files)
    return model.eval()
