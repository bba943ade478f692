"""Datasets uploaded by any S3 tool: hashed at upload or on first use, verified on every use
after."""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import numpy as np
import pytest

from maas import datasets
from maas.errors import IntegrityError, InvalidArgument
from maas.store import DATASETS_BUCKET, ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def store(stack) -> ObjectStore:
    return ObjectStore(stack.settings)


def npz_bytes(rows: int = 20) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(rows)
    np.savez(buf, X=rng.normal(size=(rows, 4)).astype(np.float32), y=np.arange(rows) % 2)
    return buf.getvalue()


def plain_upload(store: ObjectStore, key: str, data: bytes) -> None:
    """What `mc cp` or `aws s3 cp` does: the bytes, and none of our metadata."""
    store.client.put_object(DATASETS_BUCKET, key, io.BytesIO(data), len(data))


def a_key() -> str:
    return f"test-datasets/{uuid.uuid4().hex}.npz"


def test_a_plain_s3_upload_is_hashed_on_first_use_and_recorded(store, stack):
    key, data = a_key(), npz_bytes()
    plain_upload(store, key, data)
    uri = f"s3://{DATASETS_BUCKET}/{key}"
    fetched = datasets.FetchedBytes(data, hashlib.sha256(data).hexdigest())
    assert datasets.fetch_bytes(store, uri, stack.settings) == fetched
    recorded = json.loads(store.get_bytes(DATASETS_BUCKET, key + datasets.SIDECAR_SUFFIX))
    assert recorded["sha256"] == fetched.sha256
    assert datasets.fetch_bytes(store, uri, stack.settings) == fetched  # verified this time
    parsed = datasets.from_npz(uri, data)
    assert parsed.task == "classification" and parsed.num_features == 4


def test_bytes_changed_after_first_use_are_refused(store, stack):
    key = a_key()
    plain_upload(store, key, npz_bytes(20))
    uri = f"s3://{DATASETS_BUCKET}/{key}"
    datasets.fetch_bytes(store, uri, stack.settings)
    plain_upload(store, key, npz_bytes(30))
    with pytest.raises(IntegrityError, match="changed since its sha256 was recorded at upload"):
        datasets.fetch_bytes(store, uri, stack.settings)


def test_an_upload_with_its_sha256_in_metadata_is_verified_by_it_and_recorded(store, stack):
    key, data = a_key(), npz_bytes()
    store.put_bytes(DATASETS_BUCKET, key, data)  # what uploads wrote before they kept a sidecar
    fetched = datasets.fetch_bytes(store, f"s3://{DATASETS_BUCKET}/{key}", stack.settings)
    assert fetched == (data, hashlib.sha256(data).hexdigest())
    recorded = json.loads(store.get_bytes(DATASETS_BUCKET, key + datasets.SIDECAR_SUFFIX))
    assert recorded["sha256"] == fetched.sha256


def test_bytes_replaced_by_another_tool_after_a_maas_upload_are_refused(store, stack):
    # The sha256 lived only in the object's metadata, which a plain overwrite drops: the next
    # job took the new bytes as never seen and trained on them.
    key = a_key()
    store.put_bytes(DATASETS_BUCKET, key, npz_bytes(20))
    datasets.record_sha256(
        store, DATASETS_BUCKET, key, hashlib.sha256(npz_bytes(20)).hexdigest(), 1
    )
    plain_upload(store, key, npz_bytes(30))
    with pytest.raises(IntegrityError, match="changed since its sha256 was recorded at upload"):
        datasets.fetch_bytes(store, f"s3://{DATASETS_BUCKET}/{key}", stack.settings)


def test_a_dataset_outside_the_allowed_buckets_is_refused_before_any_read(store, stack):
    with pytest.raises(InvalidArgument, match="MAAS_DATASET_BUCKETS"):
        datasets.fetch_bytes(store, "s3://maas-models/anything.npz", stack.settings)


@pytest.mark.parametrize("sidecar", [b"not json", b'["a"]', b'{"sha256": 12}', b'{"sha256": "ab"}'])
def test_a_sidecar_that_records_no_sha256_is_refused_saying_how_to_reset_it(store, stack, sidecar):
    key = a_key()
    plain_upload(store, key, npz_bytes())
    store.put_bytes(DATASETS_BUCKET, key + datasets.SIDECAR_SUFFIX, sidecar)  # verified itself
    with pytest.raises(IntegrityError, match=r"\.sha256, the sha256 recorded .* delete it"):
        datasets.fetch_bytes(store, f"s3://{DATASETS_BUCKET}/{key}", stack.settings)
