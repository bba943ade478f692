"""Artifact files streamed from a gRPC client straight into S3, hashed on the way.

The registry never holds a whole artifact: each file's chunks go through a small bounded pipe to
a multipart upload running on a worker thread (minio reads one part, uploads it while the next
arrives). The sha256 computed over exactly the bytes that went to S3 is compared with the
manifest's once the file ends, so verification costs no second read.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import queue
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error

from maas.errors import FailedPrecondition, IntegrityError, InvalidArgument, Unavailable
from maas.events import clip
from maas.store import SHA256_META
from services.model_registry.safetensors_check import (
    MAX_HEADER_BYTES,
    SUFFIX,
    HeadCapture,
    check_safetensors,
)

_PIPE_CHUNKS = 16  # chunks buffered per file before the client is slowed down
_END = object()  # end of one file
_ABORT = object()  # the stream feeding the pipe was abandoned


def weights_max_bytes(max_model_params: int) -> int:
    """The largest safetensors file a model within the parameter limit can need: 8 bytes (the
    widest dtype) per parameter, plus its length prefix and largest header."""
    return 8 * max_model_params + 8 + MAX_HEADER_BYTES


@dataclass(frozen=True)
class FileCaps:
    """The most bytes one file of a registration may have: weights (``*.safetensors``), and
    every other file (tokenizer, vocabulary, configs)."""

    weights: int
    side: int

    def check(self, name: str, received: int) -> None:
        weights = name.endswith(SUFFIX)
        cap = self.weights if weights else self.side
        if received <= cap:
            return
        why = (
            "a model within MAAS_MAX_MODEL_PARAMS needs no more"
            if weights
            else "that is MAAS_REGISTRY_MAX_SIDE_FILE_BYTES, the cap on files besides the weights"
        )
        raise InvalidArgument(
            f"file {clip(repr(name), 100)} is over {cap:,} bytes; {why}; nothing was registered"
        )


class UploadAborted(Exception):
    """Raised inside the upload thread when the stream feeding it was abandoned."""


class _Pipe(io.RawIOBase):
    """Chunks in from the event loop, ``read(n)`` out on minio's thread, hashed as they pass.

    Backpressure is an asyncio semaphore: the loop waits for room, the reader thread gives room
    back through ``call_soon_threadsafe``. When the upload ends early ``release_writers`` wakes
    the loop so it never waits on a reader that is gone.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, head: HeadCapture | None = None) -> None:
        self._loop = loop
        self.head = head
        self._chunks: queue.SimpleQueue[bytes | object] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(_PIPE_CHUNKS)
        self._pending = memoryview(b"")
        self._ended = False
        self.hasher = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    async def put(self, item: bytes | object) -> None:
        await self._room.acquire()
        self._chunks.put(item)

    def abort(self) -> None:
        self._chunks.put(_ABORT)

    def release_writers(self) -> None:
        for _ in range(_PIPE_CHUNKS):
            self._room.release()

    def read(self, size: int = -1) -> bytes:
        # Gather `size` bytes (a whole part) per call: minio concatenates short reads with
        # `+=`, which would copy each part over and over.
        parts: list[memoryview] = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0 and not self._ended:
            if not self._pending:
                item = self._chunks.get()
                self._loop.call_soon_threadsafe(self._room.release)
                if item is _ABORT:
                    raise UploadAborted("the client stream ended before the file did")
                if item is _END:
                    self._ended = True
                    break
                self._pending = memoryview(item)  # type: ignore[arg-type]
            piece, self._pending = self._pending[:wanted], self._pending[wanted:]
            parts.append(piece)
            wanted -= len(piece)
        data = b"".join(parts)
        self.hasher.update(data)
        if self.head is not None:
            self.head.feed(data)
        self.size += len(data)
        return data


@dataclass
class _FileUpload:
    name: str
    expected_sha256: str
    pipe: _Pipe
    done: asyncio.Future[Any]
    received: int = 0  # bytes taken from the client so far
    declared: dict[str, dict[str, Any]] | None = None  # the tensors a safetensors file must hold


class ArtifactSink:
    """Writes the files of one registration under ``prefix`` and verifies them."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        part_size_bytes: int,
        executor: Executor,
        caps: FileCaps,
        chunk_timeout_s: float = 60.0,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._part_size = part_size_bytes
        self._executor = executor
        self._caps = caps
        self._chunk_timeout_s = chunk_timeout_s

    async def receive(
        self,
        prefix: str,
        expected: dict[str, str],
        chunks: AsyncIterator[tuple[str, bytes]],
        tensors: dict[str, dict[str, dict[str, Any]]] | None = None,
    ) -> dict[str, int]:
        """Stream every file of ``expected`` (name -> sha256) to S3; returns name -> size.

        Every ``*.safetensors`` file must parse as safetensors; ``tensors`` (file name -> the
        tensors it must hold, name -> {dtype, shape}) is checked against its header.

        Raises IntegrityError when a file's bytes do not match, FailedPrecondition when a listed
        file never came, InvalidArgument for files out of order, not listed, over their cap
        (``FileCaps``) or not the declared safetensors, Unavailable when S3 cannot be written.
        Files already written stay; the caller removes the prefix.
        """
        sizes: dict[str, int] = {}
        current: _FileUpload | None = None
        try:
            while True:
                item = await self._next(chunks)
                if item is None:
                    break
                name, data = item
                if current is None or name != current.name:
                    if current is not None:
                        sizes[current.name] = await self._finish(current)
                    current = self._open(prefix, name, expected, sizes)
                    current.declared = (tensors or {}).get(name)
                if data:
                    current.received += len(data)
                    self._caps.check(name, current.received)
                    await current.pipe.put(data)
                if current.done.done():
                    await current.done  # S3 failed mid-file: say so now, not at the file's end
            if current is not None:
                sizes[current.name] = await self._finish(current)
                current = None
        finally:
            if current is not None:
                current.pipe.abort()
                await asyncio.gather(current.done, return_exceptions=True)
        missing = sorted(set(expected) - set(sizes))
        if missing:
            raise FailedPrecondition(
                f"files {missing} are listed in the manifest but were not sent; nothing was "
                "registered"
            )
        return sizes

    async def _next(self, chunks: AsyncIterator[tuple[str, bytes]]) -> tuple[str, bytes] | None:
        try:
            async with asyncio.timeout(self._chunk_timeout_s):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise FailedPrecondition(
                f"the client sent nothing for {self._chunk_timeout_s:.0f}s; registration abandoned"
            ) from None

    def _open(
        self, prefix: str, name: str, expected: dict[str, str], done: dict[str, int]
    ) -> _FileUpload:
        if name not in expected:
            listed = clip(repr(sorted(expected)), 300)
            raise InvalidArgument(
                f"file {clip(repr(name), 100)} is not in the manifest (it lists {listed})"
            )
        if name in done:
            raise InvalidArgument(f"file {name!r} was sent in two pieces; send each file once")
        loop = asyncio.get_running_loop()
        pipe = _Pipe(loop, HeadCapture() if name.endswith(SUFFIX) else None)
        future = loop.run_in_executor(
            self._executor, self._upload, prefix + name, pipe, expected[name]
        )
        future.add_done_callback(lambda _: pipe.release_writers())
        return _FileUpload(name, expected[name], pipe, future)

    async def _finish(self, upload: _FileUpload) -> int:
        await upload.pipe.put(_END)
        await upload.done
        actual = upload.pipe.hasher.hexdigest()
        if actual != upload.expected_sha256:
            raise IntegrityError(
                f"file {upload.name!r} has sha256 {actual[:16]}… but the manifest says "
                f"{upload.expected_sha256[:16]}…: refusing a tampered or truncated artifact; "
                "nothing was registered"
            )
        if upload.pipe.head is not None:
            check_safetensors(
                upload.name,
                bytes(upload.pipe.head.head),
                upload.pipe.size,
                upload.declared,
            )
        return upload.pipe.size

    def _upload(self, key: str, pipe: _Pipe, declared_sha256: str) -> None:
        try:
            self._client.put_object(
                self._bucket,
                key,
                pipe,  # type: ignore[arg-type]
                length=-1,
                part_size=self._part_size,
                # Recorded like maas.store does, so ObjectStore.get_* verifies it on every read.
                metadata={SHA256_META: declared_sha256},
            )
        except UploadAborted:
            raise
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise FailedPrecondition(
                    f"bucket {self._bucket} does not exist; run the bootstrap "
                    "(`maas stack up` or `python -m infra.bootstrap`)"
                ) from None
            raise Unavailable(f"S3 refused {self._bucket}/{key}: {exc.code} {exc.message}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"cannot write {self._bucket}/{key} to S3: {exc}") from exc
