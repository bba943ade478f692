"""The registry client every service uses: register a model, load one back, manage aliases.

    async with RegistryClient(settings) as registry:
        v = await registry.register(model, "digits-mlp", "mlp", config, method="train",
                                    metrics={"accuracy": 0.97}, alias="staging")
        model = await registry.load("digits-mlp@staging")

Registration streams the packed files through the registry (which hashes them into S3); loading
resolves the version through the registry, then reads the files straight from S3, checking each
against the sha256 the registry recorded, and rebuilds the module from safetensors (no pickle).
gRPC failures come back as the matching ``MaasError`` (NotFound, InvalidArgument, ...).
The channel comes from ``maas.edge``: TLS as configured, this process's bearer token on every
call (the registry records the token's identity as the actor of a change).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import socket
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maas import errors
from maas.config import Settings
from maas.edge import open_channel
from maas.errors import FailedPrecondition, MaasError, NotFound, Unavailable
from maas.manifest import Manifest
from maas.names import check_version
from maas.registry import wire
from maas.registry.types import (
    AliasChange,
    AliasTargets,
    Lineage,
    ModelRef,
    ModelSummary,
    ModelVersion,
    PolicyVersion,
    check_targets,
)
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc as pb_grpc

# The name the registry's gRPC service and its health entry go by.
REGISTRY_SERVICE: str = pb.DESCRIPTOR.services_by_name["ModelRegistry"].full_name

if TYPE_CHECKING:  # torch and the S3 client come with the calls that need them: listing needs none
    import torch
    from torch import nn

    from maas.store_async import AsyncObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK_BYTES = 2 * 1024 * 1024
REGISTER_ATTEMPTS = 3
RETRY_BACKOFF_MS = 500

_ERRORS_BY_CODE: dict[str, type[MaasError]] = {
    cls.grpc_code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.Unavailable,
        errors.DeadlineExceeded,
    )
}

RefLike = ModelRef | str
ParentLike = ModelRef | ModelVersion | str


def error_from_rpc(exc: grpc.aio.AioRpcError, what: str) -> MaasError:
    """The MaasError a failed call stands for (its class from the status code), with what to
    set when the connection failed the way a TLS mismatch makes it fail."""
    cls = _ERRORS_BY_CODE.get(exc.code().name, MaasError)
    details = exc.details() or exc.code().name
    return cls(f"{what}: {details}{tls_hint(details) if cls is errors.Unavailable else ''}")


def tls_hint(details: str) -> str:
    """A hint for a connection that failed as a TLS mismatch does (gRPC's own words name no
    setting); empty for any other failure."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "; this client does not trust the server's certificate: set MAAS_TLS_CA_FILE to the "
            "CA that signed it"
        )
    if any(sign in details for sign in ("Socket closed", "andshake", "WRONG_VERSION_NUMBER")):
        return (
            "; if the server speaks TLS and this client not (or the other way round), set "
            "MAAS_GRPC_TLS the same on both (`maas stack status` compares them)"
        )
    return ""


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _as_ref(ref: RefLike) -> ModelRef:
    return ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)


def _register_requests(
    header: pb.RegisterHeader, files: Mapping[str, bytes], chunk_bytes: int
) -> Iterator[pb.RegisterVersionRequest]:
    yield pb.RegisterVersionRequest(header=header)
    for name, data in files.items():
        view = memoryview(data)
        for start in range(0, len(view), chunk_bytes):
            chunk = pb.FileChunk(file=name, data=bytes(view[start : start + chunk_bytes]))
            yield pb.RegisterVersionRequest(chunk=chunk)


class RegistryClient:
    """A gRPC channel to the registry plus the S3 access ``load`` needs. Start before use."""

    def __init__(
        self,
        settings: Settings,
        *,
        addr: str | None = None,
        actor: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self._settings = settings
        self.addr = addr or settings.registry_addr
        self.actor = actor or default_actor()
        self._chunk_bytes = chunk_bytes
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ModelRegistryStub | None = None
        self._store: AsyncObjectStore | None = None

    async def start(self) -> None:
        if self._channel is not None:
            return
        self._channel = open_channel(self._settings, self.addr)
        self._stub = pb_grpc.ModelRegistryStub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()
        if self._store is not None:
            store, self._store = self._store, None
            await store.stop()

    async def __aenter__(self) -> RegistryClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __del__(self) -> None:
        if self._channel is not None:
            warnings.warn(
                "RegistryClient was never stopped; use `async with` or call stop()",
                ResourceWarning,
                stacklevel=1,
            )

    @property
    def stub(self) -> pb_grpc.ModelRegistryStub:
        if self._stub is None:
            raise RuntimeError("RegistryClient used before start() or after stop()")
        return self._stub

    async def ping(self) -> None:
        """Return once the registry says it serves (grpc.health.v1; a readiness check)."""
        if self._channel is None:
            raise RuntimeError("RegistryClient used before start() or after stop()")
        check = health_pb2.HealthCheckRequest(service=REGISTRY_SERVICE)
        reply = await self._call(
            "health check", health_pb2_grpc.HealthStub(self._channel).Check(check)
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise Unavailable(f"the registry at {self.addr} says it is not serving")

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            # Where the registry is helps when it could not be reached; in an answer it gave
            # (not found, invalid) it would only tell a server's callers about its network.
            reached = exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            where = (
                ""
                if reached
                else f" (registry at {self.addr}; check that it is up, `maas stack status`, "
                "and MAAS_REGISTRY_ADDR)"
            )
            raise error_from_rpc(exc, f"{what}{where}") from None

    # --- registration ------------------------------------------------------------------------

    async def register(
        self,
        module_or_state: nn.Module | Mapping[str, torch.Tensor],
        name: str,
        arch: str,
        config: Mapping[str, Any],
        *,
        parent: ParentLike | None = None,
        method: str | None = None,
        settings: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        metrics: Mapping[str, float] | None = None,
        format: str = "dense",
        extra_files: Mapping[str, bytes] | None = None,
        alias: str | None = None,
    ) -> ModelVersion:
        """Pack weights (safetensors + manifest) and register them as the next version.

        ``settings`` are the method's settings recorded for lineage (e.g. the optimizer), not
        platform settings. ``parent`` may be a version, ``name@alias`` or a ModelVersion; it is
        recorded as a concrete version number.
        """
        from maas.artifacts import pack

        parent_ref = await self._resolve_parent(parent)
        files, manifest = await asyncio.to_thread(
            pack,
            module_or_state,
            arch,
            config,
            format=format,
            extra_files=extra_files,
            parent={"name": parent_ref.name, "version": parent_ref.version} if parent_ref else None,
            method=method,
            settings=dict(settings or {}),
            job_id=job_id,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )
        return await self.register_files(name, files, manifest.to_json(), alias=alias)

    async def register_files(
        self,
        name: str,
        files: Mapping[str, bytes],
        manifest_json: bytes,
        *,
        alias: str | None = None,
    ) -> ModelVersion:
        """Register already-packed files; retried while the registry or S3 is unavailable."""
        header = pb.RegisterHeader(
            name=name, manifest_json=manifest_json, alias=alias or "", actor=self.actor
        )
        delay_s = RETRY_BACKOFF_MS / 1000
        for attempt in range(1, REGISTER_ATTEMPTS + 1):
            try:
                reply = await self._call(
                    f"register {name}",
                    self.stub.RegisterVersion(_register_requests(header, files, self._chunk_bytes)),
                )
                return wire.version_from_proto(reply)
            except Unavailable as exc:
                if attempt == REGISTER_ATTEMPTS:
                    raise
                log.warning("register %s: %s; retrying in %.1fs", name, exc.message, delay_s)
                await asyncio.sleep(delay_s)
                delay_s *= 2
        raise AssertionError("unreachable")

    async def _resolve_parent(self, parent: ParentLike | None) -> ModelRef | None:
        if parent is None:
            return None
        if isinstance(parent, ModelVersion):
            return parent.ref
        ref = _as_ref(parent)
        return ref if ref.version is not None else (await self.get(ref)).ref

    # --- reads -------------------------------------------------------------------------------

    async def get(self, ref: RefLike, *, as_of_ms: int | None = None) -> ModelVersion:
        """A version by number, by alias (where it pointed at ``as_of_ms`` if given), or latest."""
        ref = _as_ref(ref)
        request = pb.GetVersionRequest(ref=wire.ref_to_proto(ref), as_of_ms=as_of_ms or 0)
        reply = await self._call(f"get {ref}", self.stub.GetVersion(request))
        return wire.version_from_proto(reply)

    async def list_models(self) -> list[ModelSummary]:
        models: list[ModelSummary] = []
        token = ""
        while True:
            reply = await self._call(
                "list models", self.stub.ListModels(pb.ListModelsRequest(page_token=token))
            )
            models += [wire.summary_from_proto(m) for m in reply.models]
            token = reply.next_page_token
            if not token:
                return models

    async def list_versions(
        self, name: str, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelVersion], str]:
        """One page of live versions, newest first, and the token of the next page ("" = end)."""
        request = pb.ListVersionsRequest(name=name, page_size=page_size, page_token=page_token)
        reply = await self._call(f"list versions of {name}", self.stub.ListVersions(request))
        return [wire.version_from_proto(v) for v in reply.versions], reply.next_page_token

    async def iter_versions(self, name: str) -> AsyncIterator[ModelVersion]:
        token = ""
        while True:
            page, token = await self.list_versions(name, page_token=token)
            for version in page:
                yield version
            if not token:
                return

    async def lineage(self, ref: RefLike) -> Lineage:
        version = await self.get(ref)
        request = pb.GetLineageRequest(name=version.name, version=version.version)
        reply = await self._call(f"lineage of {version.ref}", self.stub.GetLineage(request))
        return wire.lineage_from_proto(reply)

    async def alias_history(self, name: str, alias: str | None = None) -> list[AliasChange]:
        """Every move, oldest first (all pages)."""
        changes: list[AliasChange] = []
        token = ""
        while True:
            page, token = await self.alias_history_page(name, alias, page_token=token)
            changes += page
            if not token:
                return changes

    async def alias_history_page(
        self, name: str, alias: str | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AliasChange], str]:
        """One page of moves, oldest first, and the token of the next ("" after the last)."""
        request = pb.GetAliasHistoryRequest(
            name=name, alias=alias or "", page_size=page_size, page_token=page_token
        )
        reply = await self._call(f"alias history of {name}", self.stub.GetAliasHistory(request))
        return [wire.change_from_proto(c) for c in reply.changes], reply.next_page_token

    # --- changes -----------------------------------------------------------------------------

    async def set_alias(
        self, name: str, alias: str, version: int, *, reason: str = ""
    ) -> AliasChange:
        """Point ``alias`` at ``version``; ``reason`` is kept in the alias history."""
        request = pb.SetAliasRequest(
            name=name, alias=alias, version=check_version(version), actor=self.actor, reason=reason
        )
        reply = await self._call(f"set {name}@{alias} -> {version}", self.stub.SetAlias(request))
        return wire.change_from_proto(reply)

    async def set_split(
        self, name: str, alias: str, targets: Sequence[tuple[int, int]], *, reason: str = ""
    ) -> AliasChange:
        """Split ``alias``'s traffic over ``(version, percent)`` targets (a canary, an A/B)."""
        request = pb.SetAliasRequest(
            name=name,
            alias=alias,
            targets=wire.targets_to_proto(check_targets(targets)),
            actor=self.actor,
            reason=reason,
        )
        shown = ", ".join(f"{v}={w}" for v, w in targets)
        reply = await self._call(f"set {name}@{alias} -> {shown}", self.stub.SetAlias(request))
        return wire.change_from_proto(reply)

    async def alias_targets(self, name: str, alias: str) -> AliasTargets:
        """Where ``alias`` sends traffic, heaviest first ((version, 100) when it is not split)."""
        request = pb.GetAliasTargetsRequest(name=name, alias=alias)
        reply = await self._call(f"targets of {name}@{alias}", self.stub.GetAliasTargets(request))
        return wire.targets_from_proto(reply.targets)

    async def set_policy(self, name: str, document: Mapping[str, Any]) -> PolicyVersion:
        """Store ``document`` (``maas.policy``) as ``name``'s next policy version."""
        request = pb.SetPolicyRequest(name=name, document_json=json.dumps(document))
        reply = await self._call(f"set the policy of {name}", self.stub.SetPolicy(request))
        return wire.policy_from_proto(reply)

    async def get_policy(self, name: str, version: int | None = None) -> PolicyVersion:
        """The current policy of ``name`` (or an earlier version); NotFound when it has none."""
        request = pb.GetPolicyRequest(name=name, version=version or 0)
        reply = await self._call(f"policy of {name}", self.stub.GetPolicy(request))
        return wire.policy_from_proto(reply)

    async def delete_alias(self, name: str, alias: str) -> AliasChange:
        request = pb.DeleteAliasRequest(name=name, alias=alias, actor=self.actor)
        reply = await self._call(f"delete {name}@{alias}", self.stub.DeleteAlias(request))
        return wire.change_from_proto(reply)

    async def delete_version(self, name: str, version: int) -> ModelVersion:
        request = pb.DeleteVersionRequest(
            name=name, version=check_version(version), actor=self.actor
        )
        reply = await self._call(f"delete {name}@{version}", self.stub.DeleteVersion(request))
        return wire.version_from_proto(reply)

    # --- loading -----------------------------------------------------------------------------

    async def _objects(self) -> AsyncObjectStore:
        """The S3 side, made by the first load: listing and aliases never import the S3 client."""
        if self._store is None:
            from maas.store_async import AsyncObjectStore

            self._store = AsyncObjectStore(self._settings)
            await self._store.start()
        return self._store

    async def fetch(self, ref: RefLike) -> tuple[ModelVersion, Manifest, dict[str, bytes]]:
        """Resolve ``ref`` and read its files from S3, each verified against its sha256."""
        version = await self.get(ref)
        store = await self._objects()
        try:
            contents = await asyncio.gather(
                *(
                    store.get_bytes(version.bucket, version.key(f.name), expected_sha256=f.sha256)
                    for f in version.files
                )
            )
        except NotFound as exc:  # the version exists: its artifact is what is gone
            raise FailedPrecondition(
                f"{version.name}@{version.version} is registered but its artifact is missing "
                f"from S3 ({exc.message}); register the model again"
            ) from None
        files = {f.name: data for f, data in zip(version.files, contents, strict=True)}
        return version, Manifest.from_json(version.manifest_json), files

    async def load(self, ref: RefLike) -> nn.Module:
        """The module of ``name``, ``name@version`` or ``name@alias``, in eval mode."""
        from maas.artifacts import materialize

        _, manifest, files = await self.fetch(ref)
        # fetch() checked every file against its registered sha256 as it read it.
        return await asyncio.to_thread(materialize, manifest, files, verified=True)
