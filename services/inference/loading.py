"""From a version's artifact to a ``ServedModel``: fetched through a ``ModelSource``, verified
and built off the event loop, its signature and forward prepared once (per version, never per
request), and a runner (batching or not) put in front of the forward.

``DataPlane`` decides which version to load and when; this module only knows how.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from torch import nn

from maas import artifacts
from maas.errors import FailedPrecondition, InvalidArgument
from maas.events import clip
from services.inference.batcher import BatchingConfig, make_runner
from services.inference.metrics import Metrics, ModelStats
from services.inference.served import (
    TRACEABLE_ARCHS,
    ServedModel,
    rows_independent,
    torch_forward,
    weights_nbytes,
)
from services.inference.signature import Signature
from services.inference.text import is_text, text_signature

# Models whose rows are not independent (``rows_independent``) run each request on its own.
UNBATCHED = BatchingConfig(max_batch_size=1)
FORWARD_PASS_ROWS = 1024  # a request of more rows is computed in passes of this many


class ModelSource(Protocol):
    """Where versions come from: resolution and verified-on-arrival artifact bytes."""

    async def resolve(self, name: str, alias: str) -> int:
        """The version ``alias`` points at ("": what the bare name resolves to); NotFound
        when the model or alias is unknown."""
        ...

    async def fetch(self, name: str, version: int) -> tuple[artifacts.Manifest, dict[str, bytes]]:
        """The manifest and files of one version; NotFound when it does not exist."""
        ...

    async def catalogue(self) -> list[tuple[str, int]]:
        """Every model the source holds, with its latest version."""
        ...


class ModelLoader:
    """Builds served versions; its CPU work (sha256, module, tracing) runs on ``executor``."""

    def __init__(
        self,
        source: ModelSource,
        executor: Executor,
        *,
        batching: BatchingConfig,
        metrics: Metrics,
        inline_forward_us: int,
    ) -> None:
        self._source = source
        self._executor = executor
        self._batching = batching  # for models whose rows are independent
        self._metrics = metrics
        self._inline_forward_us = inline_forward_us
        # What a version holds beside its weights while loaded (a GPT's decode cache), by module:
        # counted in the cache's budget. A hook may refuse a module that could never fit.
        self.held_beside_weights: list[Callable[[str, int, nn.Module], int]] = []

    async def load(self, name: str, version: int) -> ServedModel:
        manifest, files = await self._source.fetch(name, version)
        loop = asyncio.get_running_loop()
        try:
            module = await loop.run_in_executor(
                self._executor, artifacts.materialize, manifest, files
            )
        except (InvalidArgument, RuntimeError, TypeError, ValueError, OverflowError) as exc:
            # The registry checked the files against the manifest, not that the config builds
            # a model those tensors fit; the caller cannot fix that, an operator can.
            reason = (
                exc.message if isinstance(exc, InvalidArgument) else f"{type(exc).__name__}: {exc}"
            )
            raise FailedPrecondition(
                f"model {name!r} version {version} cannot be built from its artifact "
                f"({clip(reason, 300)}); register a version whose arch and config build a model "
                "its weights fit"
            ) from None
        beside = sum(held(name, version, module) for held in self.held_beside_weights)
        stats = ModelStats(name, version, self._metrics)
        if is_text(manifest):  # strings in, tokenized here (services.inference.text)
            signature: Signature = await text_signature(manifest, files, self._source)
        else:
            signature = Signature.for_zoo(manifest.arch, manifest.config)
        row = signature.inputs[0].shape[1:] if manifest.arch in TRACEABLE_ARCHS else None
        independent = rows_independent(module)
        forward = await loop.run_in_executor(  # tracing runs the module: off the loop too
            self._executor,
            functools.partial(
                torch_forward,
                module,
                trace_row=row,
                pass_rows=FORWARD_PASS_ROWS if independent else None,
            ),
        )
        batching = self._batching if independent else UNBATCHED
        return ServedModel(
            name=name,
            version=version,
            signature=signature,
            nbytes=weights_nbytes(module) + beside,
            runner=make_runner(
                forward, self._executor, batching, stats, inline_max_us=self._inline_forward_us
            ),
            stats=stats,
            module=module,
            batching=batching,
        )
