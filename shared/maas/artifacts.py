"""Model artifacts at rest: safetensors weights plus a JSON manifest, never pickle.

``pack`` turns weights into artifact files and their manifest (``maas.manifest``);
``materialize`` turns them back into a runnable module. ``format`` says how: ``dense`` is a
plain state dict, the compressed variants (int8, fp16, sparse, ...) are decoded by
``maas.compression.formats``, so the one shared loader runs every variant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from maas import zoo
from maas.compression import formats as compressed
from maas.errors import InvalidArgument
from maas.events import clip
from maas.manifest import WEIGHTS_FILE, Manifest, sha256_hex, verify


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
        tensors=tensor_entries(state),
        files={name: sha256_hex(data) for name, data in files.items()},
        **lineage,
    )
    return files, manifest


def tensor_entries(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The manifest's ``tensors``: each tensor's dtype and shape, by name."""
    return {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
        for k, v in state.items()
    }


Materializer = Callable[[Manifest, dict[str, torch.Tensor], Mapping[str, bytes]], nn.Module]


def _materialize_dense(
    manifest: Manifest, state: dict[str, torch.Tensor], files: Mapping[str, bytes]
) -> nn.Module:
    model = zoo.build_skeleton(manifest.arch, manifest.config)
    model.load_state_dict(_as_built(model, state, manifest.arch), strict=True, assign=True)
    return model


def _as_built(
    model: nn.Module, state: dict[str, torch.Tensor], arch: str
) -> dict[str, torch.Tensor]:
    """``state`` in the dtypes ``model`` is built with. ``assign=True`` keeps a stored tensor's
    own dtype, so a float64 or float16 checkpoint would load and then fail every float32
    request; floats of another width are cast, as a copying load would, and a tensor of
    another kind (bool or integer weights) is refused. Names are the strict load's to judge."""
    built = model.state_dict()
    out = {}
    for name, tensor in state.items():
        want = built.get(name)
        if want is not None and tensor.dtype != want.dtype:
            if not (tensor.is_floating_point() and want.is_floating_point()):
                raise InvalidArgument(
                    f"weights tensor {clip(name, 80)!r} is {tensor.dtype}; a {arch} model holds "
                    f"{want.dtype} there"
                )
            tensor = tensor.to(want.dtype)
        out[name] = tensor
    return out


def _check_finite(model: nn.Module) -> None:
    """Weights holding NaN or infinity answer every request with NaN: refused when loaded."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidArgument(
                f"weights tensor {clip(name, 80)!r} holds NaN or infinite values; a model "
                "must have finite weights"
            )


_FORMATS: dict[str, Materializer] = {
    "dense": _materialize_dense,
    **dict.fromkeys(compressed.FORMATS, compressed.materialize),
}


def materialize(
    manifest: Manifest, files: Mapping[str, bytes], *, verified: bool = False
) -> nn.Module:
    """Files -> a runnable module in eval mode (no unpickling anywhere).

    Every file is checked against the manifest's sha256 unless the caller already checked each
    one against the same digests (``verified=True``, as the registry client does while reading).
    """
    if not verified:
        verify(manifest, files)
    materializer = _FORMATS.get(manifest.format)
    if materializer is None:
        raise InvalidArgument(
            f"artifact format {manifest.format!r} is unknown; known: {sorted(_FORMATS)}"
        )
    state = st_load(bytes(files[WEIGHTS_FILE])) if WEIGHTS_FILE in files else {}
    model = materializer(manifest, state, files)
    _check_finite(model)
    return model.eval()
