"""The object store: S3 (SeaweedFS locally, MinIO in deployment) through the ``minio`` client.

Every object's sha256 is recorded in its metadata at put time and checked on every read, so a
tampered or truncated object is refused instead of deserialized. Callers holding an independent
record (a manifest) pass ``expected_sha256`` as well. Transient failures (connection refused,
5xx) are retried with exponential backoff, then surface as ``Unavailable``.

``ObjectStore`` is synchronous and thread-safe; ``maas.store_async.AsyncObjectStore`` runs the
same calls on its own small thread pool so event loops never block on S3.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from maas.config import Settings
from maas.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidArgument,
    MaasError,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)

# The platform's buckets (bootstrap creates exactly these).
MODELS_BUCKET = "maas-models"
DATASETS_BUCKET = "maas-datasets"
CHECKPOINTS_BUCKET = "maas-checkpoints"
ALL_BUCKETS: tuple[str, ...] = (MODELS_BUCKET, DATASETS_BUCKET, CHECKPOINTS_BUCKET)

SHA256_META = "sha256"  # stored as the x-amz-meta-sha256 header
_READ_BLOCK_BYTES = 1024 * 1024
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}
# S3's refusals of the request itself (a key too long, a name S3 does not take): retrying them
# only delays the same answer, reported then as S3 being unavailable.
_REQUEST_REFUSED_CODES = {
    "BadRequest",  # SeaweedFS, for a key holding a NUL or "\\..\\"
    "InvalidRequest",
    "InvalidArgument",
    "InvalidURI",
    "KeyTooLongError",
    "InvalidObjectName",
    "InvalidBucketName",
    "EntityTooLarge",
    "MetadataTooLarge",
}

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    sha256: str | None
    etag: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise InvalidArgument(f"{uri!r} is not an s3://bucket/key URI")
    bucket, key = uri[5:].split("/", 1)
    if not bucket or not key:
        raise InvalidArgument(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


class _HashingReader(io.RawIOBase):
    """Wraps a file so what minio uploads is hashed on the way (one pass over the bytes)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        return data


def minio_client(settings: Settings, http: urllib3.PoolManager | None = None) -> Minio:
    """A raw client of the configured S3 endpoint (``http``: minio's default pool if None)."""
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=http,
    )


class ObjectStore:
    """Bytes and files in S3, each verified by sha256 on the way back."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_attempts: int = 5,
        retry_backoff_ms: int = 200,
    ) -> None:
        self._settings = settings
        self._max_attempts = max_attempts
        self._retry_backoff_ms = retry_backoff_ms
        if settings.s3_read_timeout_s < 1:
            raise InvalidArgument(
                f"MAAS_S3_READ_TIMEOUT_S={settings.s3_read_timeout_s} must be at least 1 (seconds)"
            )
        # A short connect timeout and no urllib3-level retries: retrying is ours (on our error
        # types), so "S3 down" becomes Unavailable in seconds, not minutes. The read timeout is
        # between two reads, not for a whole object: a frozen S3 (connections accepted, nothing
        # answered) waited 120 s a try, two minutes before a job's first status.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=settings.s3_read_timeout_s),
            maxsize=16,
            retries=False,
        )
        self._client = minio_client(settings, http)

    @property
    def client(self) -> Minio:
        """The raw minio client, for tests and tools that must bypass verification."""
        return self._client

    # --- retry policy --------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = self._retry_backoff_ms / 1000
        for attempt in range(1, self._max_attempts + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code in _NOT_FOUND_CODES:
                    raise NotFound(f"{what}: {exc.code} ({exc.message})") from None
                if exc.code == "PreconditionFailed":  # only conditional writes ask for one
                    raise AlreadyExists(f"{what}: the object exists already") from None
                if exc.code in _REQUEST_REFUSED_CODES:  # the same request is refused again
                    raise InvalidArgument(
                        f"{what}: S3 refused it: {exc.code} ({exc.message})"
                    ) from None
                if exc.code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                    raise MaasError(
                        f"{what}: S3 refused the credentials ({exc.code}); check "
                        "MAAS_S3_ACCESS_KEY / MAAS_S3_SECRET_KEY"
                    ) from None
                error: Exception = exc
            except MaasError:
                raise
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = exc
            except ValueError as exc:  # minio refusing the arguments (a '..' key) before sending
                raise InvalidArgument(f"{what}: {exc}") from None
            if attempt == self._max_attempts:
                raise Unavailable(
                    f"{what}: S3 at {self._settings.s3_endpoint} failed after {attempt} "
                    f"attempts: {error}"
                ) from error
            log.warning("%s failed (attempt %d/%d): %s", what, attempt, self._max_attempts, error)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def bucket_exists(self, bucket: str) -> bool:
        return self._call(f"check bucket {bucket}", lambda: self._client.bucket_exists(bucket))

    # --- writes --------------------------------------------------------------------------------

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        digest = hashlib.sha256(data).hexdigest()
        meta = {**(metadata or {}), SHA256_META: digest}
        size = len(data)

        def put() -> Any:
            return self._client.put_object(
                bucket,
                key,
                io.BytesIO(data),
                size,
                content_type=content_type,
                metadata=meta,  # type: ignore[arg-type]
                part_size=self._settings.s3_part_size_bytes,
            )

        result = self._call(f"put s3://{bucket}/{key}", put)
        return ObjectInfo(bucket, key, size, digest, result.etag)

    def create_bytes(
        self, bucket: str, key: str, data: bytes, *, content_type: str = "application/json"
    ) -> ObjectInfo:
        """Write ``key`` only where no object holds it yet (S3's ``If-None-Match: *``):
        AlreadyExists where one does, so of writers racing for one key only one succeeds.
        One request, so ``data`` is small (a record, not a model)."""
        digest = hashlib.sha256(data).hexdigest()
        headers: dict[str, str | list[str] | tuple[str]] = {
            "Content-Type": content_type,
            "If-None-Match": "*",
            f"x-amz-meta-{SHA256_META}": digest,
        }
        # minio's put_object files unknown headers under x-amz-meta-; its single-request PUT
        # (what put_object calls for a small object) sends them as given.
        result = self._call(
            f"create s3://{bucket}/{key}",
            lambda: self._client._put_object(bucket, key, data, headers),
        )
        return ObjectInfo(bucket, key, len(data), digest, result.etag)

    def copy(self, bucket: str, source_key: str, key: str, *, sha256: str) -> None:
        """Copy ``source_key`` to ``key`` within ``bucket`` on the server (no byte passes
        through here; past 5 GiB, part by part), recording ``sha256``, the source's, as every
        write does."""
        source = CopySource(bucket, source_key)
        self._call(
            f"copy s3://{bucket}/{source_key} to {key}",
            lambda: self._client.copy_object(
                bucket,
                key,
                source,
                metadata={SHA256_META: sha256},
                metadata_directive=REPLACE,
            ),
        )

    def put_file(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload a file (multipart above the part size); pass ``sha256`` if already known."""
        path = Path(path)
        size = path.stat().st_size
        digest = sha256 or file_sha256(path)
        meta = {**(metadata or {}), SHA256_META: digest}

        def put() -> Any:
            with path.open("rb") as fh:
                reader = _HashingReader(fh)
                result = self._client.put_object(
                    bucket,
                    key,
                    reader,  # type: ignore[arg-type]
                    size,
                    content_type=content_type,
                    metadata=meta,  # type: ignore[arg-type]
                    part_size=self._settings.s3_part_size_bytes,
                )
            if reader.hasher.hexdigest() != digest:
                raise IntegrityError(f"{path} changed while it was being uploaded to {key}")
            return result

        result = self._call(f"put s3://{bucket}/{key}", put)
        return ObjectInfo(bucket, key, size, digest, result.etag)

    # --- reads ---------------------------------------------------------------------------------

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        st = self._call(f"stat s3://{bucket}/{key}", lambda: self._client.stat_object(bucket, key))
        return ObjectInfo(bucket, key, int(st.size or 0), _recorded_sha256(st.metadata), st.etag)

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.stat(bucket, key)
        except NotFound:
            return False
        return True

    def get_bytes(self, bucket: str, key: str, *, expected_sha256: str | None = None) -> bytes:
        return self.get_bytes_and_sha256(bucket, key, expected_sha256=expected_sha256)[0]

    def get_bytes_and_sha256(
        self, bucket: str, key: str, *, expected_sha256: str | None = None
    ) -> tuple[bytes, str]:
        """``get_bytes``, with the sha256 the bytes were verified by (hashed once, here)."""

        def get() -> tuple[bytes, str | None]:
            response = self._client.get_object(bucket, key)
            try:
                return response.read(), _recorded_sha256(response.headers)
            finally:
                response.close()
                response.release_conn()

        data, recorded = self._call(f"get s3://{bucket}/{key}", get)
        digest = hashlib.sha256(data).hexdigest()
        _check(f"s3://{bucket}/{key}", digest, recorded, expected_sha256)
        return data, digest

    def iter_chunks(self, bucket: str, key: str) -> Iterator[bytes]:
        """Stream an object without verifying (callers hash as they go; see ``get_file``)."""
        response = self._call(
            f"get s3://{bucket}/{key}", lambda: self._client.get_object(bucket, key)
        )
        try:
            yield from response.stream(_READ_BLOCK_BYTES)
        finally:
            response.close()
            response.release_conn()

    def get_file(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
    ) -> ObjectInfo:
        """Stream an object to ``path``; the file appears (atomically) only once verified."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self.stat(bucket, key)
        hasher = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                for block in self.iter_chunks(bucket, key):
                    hasher.update(block)
                    out.write(block)
            _check(f"s3://{bucket}/{key}", hasher.hexdigest(), info.sha256, expected_sha256)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return info

    def list(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        def ls() -> list[ObjectInfo]:
            return [
                ObjectInfo(bucket, o.object_name or "", int(o.size or 0), None, o.etag)
                for o in self._client.list_objects(bucket, prefix=prefix, recursive=True)
            ]

        return self._call(f"list s3://{bucket}/{prefix}", ls)

    # --- incomplete multipart uploads ----------------------------------------------------------

    def abort_incomplete_uploads(self, bucket: str, prefix: str = "") -> int:
        """Abort every multipart upload under ``prefix`` still in progress; returns how many.

        An upload cut short (S3 away, the process killed) otherwise keeps its parts forever,
        invisible to ``list``. Only call it where no upload under ``prefix`` is meant to be
        running. minio 7 keeps these two S3 calls private (its public API dropped them).
        """

        def abort_all() -> int:
            aborted, key_marker, id_marker = 0, None, None
            while True:
                page = self._client._list_multipart_uploads(
                    bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=id_marker
                )
                for upload in page.uploads:
                    if upload.upload_id is not None:
                        self._client._abort_multipart_upload(
                            bucket, upload.object_name, upload.upload_id
                        )
                        aborted += 1
                if not page.is_truncated:
                    return aborted
                key_marker, id_marker = page.next_key_marker, page.next_upload_id_marker

        aborted = self._call(f"abort incomplete uploads under s3://{bucket}/{prefix}", abort_all)
        if aborted:
            log.info("aborted %d incomplete uploads under s3://%s/%s", aborted, bucket, prefix)
        return aborted

    # --- deletes -------------------------------------------------------------------------------

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"delete s3://{bucket}/{key}", lambda: self._client.remove_object(bucket, key))

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        keys = [o.key for o in self.list(bucket, prefix)]

        def rm() -> None:
            errors = list(self._client.remove_objects(bucket, [DeleteObject(k) for k in keys]))
            if errors:
                raise Unavailable(f"could not delete {len(errors)} objects under {prefix}")

        if keys:
            self._call(f"delete s3://{bucket}/{prefix}*", rm)
        return len(keys)


def _recorded_sha256(headers: Any) -> str | None:
    if headers is None:
        return None
    for name in (f"x-amz-meta-{SHA256_META}", f"X-Amz-Meta-{SHA256_META.capitalize()}"):
        value = headers.get(name)
        if value:
            return str(value)
    return None


def _check(what: str, actual: str, recorded: str | None, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"{what} has sha256 {actual[:16]}… but {expected[:16]}… was expected: "
            "the object was tampered with or truncated; re-upload it"
        )
    if recorded is not None and actual != recorded:
        raise IntegrityError(
            f"{what} has sha256 {actual[:16]}… but {recorded[:16]}… was recorded when it was "
            "written: the object was tampered with or truncated; re-upload it"
        )
    if recorded is None and expected is None:
        raise IntegrityError(
            f"{what} carries no recorded sha256 (not written through maas.store), so it cannot "
            "be verified; upload it with `maas datasets upload` or ObjectStore.put_*"
        )


def file_sha256(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK_BYTES):
            hasher.update(block)
    return hasher.hexdigest()
