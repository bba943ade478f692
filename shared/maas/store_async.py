"""``maas.store`` for event loops: the same object store, each call on the store's own threads
(S3 I/O never blocks a loop; the pool's owner starts and stops it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from maas.config import Settings
from maas.store import ObjectInfo, ObjectStore

T = TypeVar("T")


class AsyncObjectStore:
    """``ObjectStore`` for event loops: each call runs on this store's own thread pool."""

    def __init__(self, settings: Settings, *, threads: int = 4) -> None:
        self.sync = ObjectStore(settings)
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="maas-s3")

    async def stop(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    async def __aenter__(self) -> AsyncObjectStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._executor is None:
            raise RuntimeError("AsyncObjectStore used before start() or after stop()")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def put_bytes(self, bucket: str, key: str, data: bytes, **kw: Any) -> ObjectInfo:
        return await self._run(self.sync.put_bytes, bucket, key, data, **kw)

    async def create_bytes(self, bucket: str, key: str, data: bytes, **kw: Any) -> ObjectInfo:
        return await self._run(self.sync.create_bytes, bucket, key, data, **kw)

    async def put_file(self, bucket: str, key: str, path: str | Path, **kw: Any) -> ObjectInfo:
        return await self._run(self.sync.put_file, bucket, key, path, **kw)

    async def copy(self, bucket: str, source_key: str, key: str, *, sha256: str) -> None:
        await self._run(self.sync.copy, bucket, source_key, key, sha256=sha256)

    async def get_bytes(self, bucket: str, key: str, **kw: Any) -> bytes:
        return await self._run(self.sync.get_bytes, bucket, key, **kw)

    async def get_file(self, bucket: str, key: str, path: str | Path, **kw: Any) -> ObjectInfo:
        return await self._run(self.sync.get_file, bucket, key, path, **kw)

    async def stat(self, bucket: str, key: str) -> ObjectInfo:
        return await self._run(self.sync.stat, bucket, key)

    async def exists(self, bucket: str, key: str) -> bool:
        return await self._run(self.sync.exists, bucket, key)

    async def list(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        return await self._run(self.sync.list, bucket, prefix)

    async def delete(self, bucket: str, key: str) -> None:
        await self._run(self.sync.delete, bucket, key)

    async def delete_prefix(self, bucket: str, prefix: str) -> int:
        return await self._run(self.sync.delete_prefix, bucket, prefix)

    async def abort_incomplete_uploads(self, bucket: str, prefix: str = "") -> int:
        return await self._run(self.sync.abort_incomplete_uploads, bucket, prefix)
