"""One namespace of job ids across the services that run jobs.

Each service keeps its own record of the jobs it ran (the training store's ``job.json``, the
registry versions a compress job made) and refuses another job of its own kind under an id it
has seen. A job of the other kind under the same id, sent straight to Kafka (the CLI checks the
status topic first), ran: its statuses mixed with the first job's, and ``maas jobs list`` showed
the train job with the compress job's result. So a service claims a job's id before it accepts
the job: ``job-ids/<id>.json`` in the checkpoints bucket holds the job's type and content
sha256. A claim with other content is AlreadyExists, which the services dead-letter as they do
a reuse of their own kind; the same content again (a redelivery, a retry) passes.

A claim is read first, then written only where no object holds its key (S3's conditional
``If-None-Match: *``), so of two services handed one id in the same instant one wins and the
other reads the winner's claim. An S3 server that ignores the condition still gets the read
first: only a race in the same instant slips past it there.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from maas.errors import AlreadyExists, NotFound
from maas.store import CHECKPOINTS_BUCKET

if TYPE_CHECKING:
    from maas.store_async import AsyncObjectStore

CLAIMS_PREFIX = "job-ids/"


def claim_key(job_id: str) -> str:
    return f"{CLAIMS_PREFIX}{job_id}.json"


async def claim(store: AsyncObjectStore, job_id: str, kind: str, content_sha256: str) -> None:
    """Hold ``job_id`` for the job of ``kind`` whose content hashes to ``content_sha256``;
    AlreadyExists naming the holder when another job holds it."""
    key = claim_key(job_id)
    record = json.dumps({"type": kind, "content_sha256": content_sha256}).encode()
    held = await _read(store, key)
    if held is None:
        try:
            await store.create_bytes(CHECKPOINTS_BUCKET, key, record)
            return
        except AlreadyExists:  # another service claimed it since the read
            held = await _read(store, key)
    if held is None:  # an object this module did not write: claimed over
        await store.put_bytes(CHECKPOINTS_BUCKET, key, record)
    elif held.get("content_sha256") != content_sha256:
        raise AlreadyExists(
            f"job_id={job_id!r} belongs to another job (a {held.get('type', 'job')} job accepted "
            "earlier with other content); send this one under a new job_id"
        )


async def held_by_another(store: AsyncObjectStore, job_id: str, content_sha256: str) -> bool:
    """Whether another job (other content) holds ``job_id``: reads the claim, writes nothing."""
    held = await _read(store, claim_key(job_id))
    return held is not None and held.get("content_sha256") != content_sha256


async def _read(store: AsyncObjectStore, key: str) -> dict[str, Any] | None:
    try:
        return _held(await store.get_bytes(CHECKPOINTS_BUCKET, key))
    except NotFound:
        return None


def _held(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None  # not a claim this module wrote
    return record if isinstance(record, dict) else None
