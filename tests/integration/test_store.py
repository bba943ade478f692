"""The object store against the real S3 server: multipart, sha256 checks, clear not-found."""

from __future__ import annotations

import io
import json
import os
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from infra.s3 import WeedS3
from maas.errors import IntegrityError, InvalidArgument, NotFound
from maas.store import DATASETS_BUCKET, ObjectStore, file_sha256
from maas.store_async import AsyncObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def store(stack) -> ObjectStore:
    return ObjectStore(stack.settings)


def a_key() -> str:
    return f"test-store/{uuid.uuid4().hex}"


def test_200_mb_multipart_round_trip_is_verified(store, tmp_path):
    src = tmp_path / "big.bin"
    with src.open("wb") as fh:
        for _ in range(200):
            fh.write(os.urandom(1024 * 1024))
    key = a_key()
    info = store.put_file(DATASETS_BUCKET, key, src)
    assert info.size == 200 * 1024 * 1024
    assert "-" in (store.stat(DATASETS_BUCKET, key).etag or "")  # multipart etag: md5-<parts>
    dst = tmp_path / "back.bin"
    store.get_file(DATASETS_BUCKET, key, dst)
    assert file_sha256(dst) == file_sha256(src) == info.sha256
    store.delete(DATASETS_BUCKET, key)


def test_bytes_round_trip_and_listing(store):
    key = a_key()
    store.put_bytes(DATASETS_BUCKET, key, b"hello")
    assert store.get_bytes(DATASETS_BUCKET, key) == b"hello"
    assert [o.key for o in store.list(DATASETS_BUCKET, key)] == [key]


def test_a_tampered_object_is_refused_with_a_clear_error(store):
    key = a_key()
    info = store.put_bytes(DATASETS_BUCKET, key, b"the real bytes")
    # Overwrite behind the store's back, keeping the recorded checksum header.
    forged = b"forged bytes!!"
    store.client.put_object(
        DATASETS_BUCKET, key, io.BytesIO(forged), len(forged), metadata={"sha256": info.sha256}
    )
    with pytest.raises(IntegrityError, match="tampered"):
        store.get_bytes(DATASETS_BUCKET, key)


def test_an_unexpected_checksum_is_refused(store):
    key = a_key()
    store.put_bytes(DATASETS_BUCKET, key, b"abc")
    with pytest.raises(IntegrityError, match="was expected"):
        store.get_bytes(DATASETS_BUCKET, key, expected_sha256="0" * 64)


def test_a_tampered_download_leaves_no_file_behind(store, tmp_path):
    key = a_key()
    store.put_bytes(DATASETS_BUCKET, key, b"abc")
    dst = tmp_path / "out.bin"
    with pytest.raises(IntegrityError):
        store.get_file(DATASETS_BUCKET, key, dst, expected_sha256="1" * 64)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_key_is_a_clear_not_found(store):
    with pytest.raises(NotFound, match="no-such-key"):
        store.get_bytes(DATASETS_BUCKET, "no-such-key")
    assert not store.exists(DATASETS_BUCKET, "no-such-key")


def test_a_key_s3_refuses_is_an_invalid_argument_at_once_not_unavailable(store, caplog):
    # Retried five times as if S3 were away, it ended as Unavailable.
    with pytest.raises(InvalidArgument, match="S3 refused it: KeyTooLongError"):
        store.put_bytes(DATASETS_BUCKET, "k" * 300, b"x")
    assert "attempt" not in caplog.text


def test_a_request_s3_calls_bad_is_an_invalid_argument_at_once_not_unavailable(store, caplog):
    # SeaweedFS answers BadRequest for a key holding "\\..\\": a job naming one held its
    # Kafka partition for 120 s of retries, then failed as if S3 were away.
    with pytest.raises(InvalidArgument, match="S3 refused it: BadRequest"):
        store.stat(DATASETS_BUCKET, "a\\..\\x.npz")
    assert "attempt" not in caplog.text


def test_a_key_the_s3_client_refuses_to_send_is_an_invalid_argument(store):
    with pytest.raises(InvalidArgument, match="path segment"):
        store.stat(DATASETS_BUCKET, "a/../x.npz")


def on_thread(fn: Callable[..., Any], name: str, threads: dict[str, int]) -> Callable[..., Any]:
    """``fn``, noting which thread ran it under ``name``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        threads[name] = threading.get_ident()
        return fn(*args, **kwargs)

    return call


async def test_the_async_store_runs_off_the_event_loop(stack, monkeypatch):
    key = a_key()
    threads: dict[str, int] = {}
    async with AsyncObjectStore(stack.settings) as store:
        for name in ("put_bytes", "get_bytes", "delete_prefix"):
            monkeypatch.setattr(
                store.sync, name, on_thread(getattr(store.sync, name), name, threads)
            )
        await store.put_bytes(DATASETS_BUCKET, key, b"async")
        assert await store.get_bytes(DATASETS_BUCKET, key) == b"async"
        assert await store.delete_prefix(DATASETS_BUCKET, key) == 1
    assert set(threads) == {"put_bytes", "get_bytes", "delete_prefix"}
    assert threading.get_ident() not in threads.values()  # the loop's thread made no S3 call


def test_the_s3_servers_own_ports_refuse_unsigned_reads_and_writes(stack, store):
    """Only the S3 gateway takes keys: weed's filer and volume ports on the loopback answer an
    unsigned request 401, so a local user cannot read or write objects around SigV4."""
    if not isinstance(stack.local.s3, WeedS3):
        pytest.skip("the stack's S3 server is not the local weed")
    key = f"unsigned-{uuid.uuid4().hex[:8]}.bin"
    store.put_bytes(DATASETS_BUCKET, key, b"private")
    ports = stack.local.s3.ports
    filer = f"http://127.0.0.1:{ports.filer}/buckets/{DATASETS_BUCKET}/{key}"
    assert http_status(urllib.request.Request(filer)) == 401
    assert http_status(urllib.request.Request(filer, data=b"forged", method="PUT")) == 401
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.master}/dir/assign", timeout=5) as r:
        assigned = json.loads(r.read())
    volume = f"http://{assigned['url']}/{assigned['fid']}"
    assert http_status(urllib.request.Request(volume, data=b"forged", method="PUT")) == 401
    assert store.get_bytes(DATASETS_BUCKET, key) == b"private"


def http_status(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code
