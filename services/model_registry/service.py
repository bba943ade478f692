"""The registry's flows that span SQLite and S3, transport-neutral (the servicer adapts gRPC).

A registration streams its files to a staging prefix of its own (``.staging/<id>/``, hashed on
the way), at the client's pace and beside any other registration. Only then is the model's
commit serialized: the next number is taken, the files are copied on the S3 server to
``<name>/<version>/``, ``manifest.json`` is written last, and the version row (with its outbox
event) commits; the staging prefix is removed either way. A slow or stalled client therefore
holds no other registration of its model (the lock covered its whole upload, so one trickling
client stopped every job from registering a result under that name). Until the commit nothing
is visible; on any failure the number is free again (versions never skip) and the prefix (files
and incomplete multipart uploads) is cleared: at once, or in the background while S3 is away,
at the latest by the next attempt at that number or the next start-up's sweep, which also
empties the staging area.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from maas.config import Settings
from maas.errors import FailedPrecondition, MaasError
from maas.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    check_buildable,
    check_finite_metrics,
    parse_manifest,
)
from maas.names import check_alias, check_name
from maas.registry.types import (
    AliasChange,
    AliasTargets,
    ModelRef,
    ModelVersion,
    artifact_prefix,
    check_targets,
)
from maas.store_async import AsyncObjectStore
from services.model_registry.store import NewVersion, RegistryStore, parent_of
from services.model_registry.uploads import ArtifactSink, FileCaps, weights_max_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

CLEANUP_FIRST_RETRY_S = 1.0
CLEANUP_MAX_RETRY_S = 30.0
CLEANUP_ATTEMPTS = 40  # about 18 minutes of S3 outage
# Where uploads land before their commit: no model name starts with a dot (maas.names).
STAGING_PREFIX = ".staging/"


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds on what one request may make the registry hold or send (see maas.config)."""

    max_manifest_bytes: int = Settings.registry_max_manifest_bytes
    max_metrics: int = Settings.registry_max_metrics
    max_reply_bytes: int = Settings.registry_max_reply_bytes
    max_model_params: int = Settings.max_model_params
    max_side_file_bytes: int = Settings.registry_max_side_file_bytes

    @classmethod
    def of(cls, settings: Settings) -> RegistryLimits:
        return cls(
            settings.registry_max_manifest_bytes,
            settings.registry_max_metrics,
            settings.registry_max_reply_bytes,
            settings.max_model_params,
            settings.registry_max_side_file_bytes,
        )

    def file_caps(self) -> FileCaps:
        return FileCaps(
            weights=weights_max_bytes(self.max_model_params), side=self.max_side_file_bytes
        )


@dataclass(frozen=True)
class Registration:
    name: str
    manifest_json: bytes
    alias: str | None
    actor: str


class RegistryService:
    def __init__(
        self,
        metadata: RegistryStore,
        store: AsyncObjectStore,
        *,
        bucket: str,
        part_size_bytes: int,
        on_commit: Callable[[], None] = lambda: None,
        upload_threads: int = 8,
        limits: RegistryLimits = RegistryLimits(),
    ) -> None:
        self.metadata = metadata
        self.limits = limits
        self._store = store
        self._bucket = bucket
        self._on_commit = on_commit
        # One thread owns SQLite: calls queue instead of contending for its lock on the loop.
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="registry-db")
        self._upload_threads = ThreadPoolExecutor(
            upload_threads, thread_name_prefix="registry-upload"
        )
        self._sink = ArtifactSink(
            store.sync.client,
            bucket,
            part_size_bytes=part_size_bytes,
            executor=self._upload_threads,
            caps=limits.file_caps(),
        )
        self._model_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._cleanups: set[asyncio.Task[None]] = set()

    async def sweep_incomplete_uploads(self) -> None:
        """At start-up: abort multipart uploads a killed registry left, and empty the staging
        area (only it writes here)."""
        try:
            await self._store.abort_incomplete_uploads(self._bucket)
            await self._store.delete_prefix(self._bucket, STAGING_PREFIX)
        except MaasError as exc:
            log.warning("could not sweep incomplete uploads in %s: %s", self._bucket, exc)

    def close(self) -> None:
        for task in self._cleanups:
            task.cancel()
        self._upload_threads.shutdown(wait=True, cancel_futures=True)
        self._db_thread.shutdown(wait=True)
        self.metadata.close()

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one metadata call on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: fn(*args, **kwargs))

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one metadata call that may add outbox events, then wake the relay."""
        result = await self.db(fn, *args, **kwargs)
        self._on_commit()
        return result

    def _lock_for(self, name: str) -> asyncio.Lock:
        lock = self._model_locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._model_locks[name] = lock
        return lock

    async def register(
        self, request: Registration, chunks: AsyncIterator[tuple[str, bytes]]
    ) -> ModelVersion:
        check_name(request.name)
        if request.alias is not None:
            check_alias(request.alias)
        manifest = parse_manifest(
            request.manifest_json,
            max_bytes=self.limits.max_manifest_bytes,
            max_metrics=self.limits.max_metrics,
        )
        check_finite_metrics(manifest)
        check_buildable(manifest, self.limits.max_model_params)
        await self.db(self.metadata.check_parent, parent_of(manifest))
        staging = f"{STAGING_PREFIX}{uuid.uuid4().hex}/"
        try:
            declared = {WEIGHTS_FILE: manifest.tensors} if manifest.tensors else {}
            sizes = await self._sink.receive(staging, manifest.files, chunks, declared)
            async with self._lock_for(request.name):
                record = await self._commit(request, manifest, staging, sizes)
        finally:
            await self._clean_up_prefix(staging)
        self._on_commit()
        log.info(
            "registered %s@%d (%d bytes) by %s",
            record.name,
            record.version,
            record.size_bytes,
            record.created_by,
        )
        return record

    async def _commit(
        self, request: Registration, manifest: Manifest, staging: str, sizes: dict[str, int]
    ) -> ModelVersion:
        """Under the model's lock: the staged files become the model's next version."""
        version = await self.db(self.metadata.next_version, request.name)
        prefix = artifact_prefix(request.name, version)
        # Whatever a crashed or failed attempt at this number left behind goes first, so the
        # prefix ends up holding exactly this artifact.
        await self._remove_attempt(request.name, version)
        try:
            await asyncio.gather(
                *(
                    self._store.copy(self._bucket, staging + file, prefix + file, sha256=digest)
                    for file, digest in manifest.files.items()
                )
            )
            # Written last: a manifest in S3 means every file it lists is complete.
            await self._store.put_bytes(
                self._bucket,
                prefix + MANIFEST_FILE,
                request.manifest_json,
                content_type="application/json",
            )
            return await self.db(
                self.metadata.add_version,
                NewVersion(
                    name=request.name,
                    manifest_json=request.manifest_json,
                    manifest=manifest,
                    bucket=self._bucket,
                    file_sizes=sizes,
                    actor=request.actor,
                    alias=request.alias,
                ),
                version=version,
            )
        except BaseException:
            await self._clean_up_attempt(request.name, version)
            raise

    async def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        actor: str,
        reason: str = "",
        *,
        targets: AliasTargets = (),
    ) -> AliasChange:
        """Move ``alias`` (or split it over ``targets``) once every version it would name still
        has its files in S3: an alias is what clients call, and one on a version whose artifact
        is gone fails every request sent to it."""
        if targets:
            targets = check_targets(targets)  # before any S3 request: at most 100, each once
        for target in [v for v, _ in targets] or [version]:
            await self._check_stored(name, target)
        return await self.write(
            self.metadata.set_alias, name, alias, version, actor, reason, targets=targets
        )

    async def _check_stored(self, name: str, version: int) -> None:
        record = await self.db(self.metadata.get_version, ModelRef(name, version=version))
        for file in record.files:
            if not await self._store.exists(record.bucket, record.prefix + file.name):
                raise FailedPrecondition(
                    f"{name}@{version}'s {file.name} is missing from s3://{record.bucket}/"
                    f"{record.prefix}: an alias on it would fail every request; register the "
                    "version again, or point the alias at another"
                )

    async def delete_version(self, name: str, version: int, actor: str) -> ModelVersion:
        record = await self.write(self.metadata.delete_version, name, version, actor)
        # The version is gone from the metadata already; its bytes are garbage now, so a failed
        # removal only leaves unreachable objects behind for a while, never a broken version.
        await self._clean_up_prefix(record.prefix)
        return record

    async def _clean_up_attempt(self, name: str, version: int) -> None:
        """Remove what a failed commit left at its number (objects, incomplete multipart
        uploads); see ``_clean_up``."""

        async def again() -> None:
            async with self._lock_for(name):
                # A later attempt at this number may have committed meanwhile: then the
                # prefix is that version's and must stay.
                if await self.db(self.metadata.next_version, name) == version:
                    await self._remove_attempt(name, version)

        await self._clean_up(f"{name}@{version}", self._remove_attempt(name, version), again)

    async def _clean_up_prefix(self, prefix: str) -> None:
        """Remove what is under ``prefix`` (a registration's staged files, a deleted version's
        files); see ``_clean_up``."""
        again = partial(self._remove, prefix)
        await self._clean_up(f"s3://{self._bucket}/{prefix}", again(), again)

    async def _clean_up(
        self, what: str, removal: Awaitable[None], again: Callable[[], Awaitable[None]]
    ) -> None:
        """Await ``removal``; if S3 is away, call ``again`` in the background until it works,
        so nothing stays behind once S3 is back (at the latest, the next start-up sweeps)."""
        try:
            await asyncio.shield(removal)
        except MaasError as exc:
            log.warning("cleaning up %s failed (%s); retrying in the background", what, exc)
            task = asyncio.get_running_loop().create_task(self._retry_clean_up(what, again))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _remove_attempt(self, name: str, version: int) -> None:
        await self._remove(artifact_prefix(name, version))

    async def _remove(self, prefix: str) -> None:
        """Every object and incomplete multipart upload under ``prefix``."""
        await self._store.abort_incomplete_uploads(self._bucket, prefix)
        await self._store.delete_prefix(self._bucket, prefix)

    async def _retry_clean_up(self, what: str, again: Callable[[], Awaitable[None]]) -> None:
        delay = CLEANUP_FIRST_RETRY_S
        for _ in range(CLEANUP_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                await again()
                log.info("cleaned up %s", what)
                return
            except MaasError as exc:
                log.warning("cleaning up %s failed again: %s", what, exc)
                delay = min(delay * 2, CLEANUP_MAX_RETRY_S)
        log.error("gave up cleaning up %s; the registry's next start-up sweeps it", what)
