"""Training state in ``maas-checkpoints`` (layout in ``maas.training.checkpoint``), async.

Every read is verified: objects carry the sha256 recorded when written, and a checkpoint is read
through its pointer's sha256 too, so a torn or tampered checkpoint is refused, never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from maas.errors import FailedPrecondition, NotFound
from maas.store import CHECKPOINTS_BUCKET
from maas.store_async import AsyncObjectStore
from maas.training import checkpoint as ck
from maas.training.aggregate import ShardSnapshot
from maas.training.plan import JobPlan
from maas.training.pool import Assignment

BUCKET = CHECKPOINTS_BUCKET


class TrainingStore:
    def __init__(self, store: AsyncObjectStore) -> None:
        self._store = store

    # --- job ----------------------------------------------------------------------------------

    async def read_plan(self, job_id: str) -> JobPlan:
        data = await self._store.get_bytes(BUCKET, ck.job_key(job_id, ck.PLAN_FILE))
        return JobPlan.from_json(json.loads(data))

    async def has_plan(self, job_id: str) -> bool:
        return await self._store.exists(BUCKET, ck.job_key(job_id, ck.PLAN_FILE))

    async def write_plan(self, plan: JobPlan) -> None:
        data = json.dumps(plan.to_json(), sort_keys=True).encode()
        await self._store.put_bytes(BUCKET, ck.job_key(plan.job_id, ck.PLAN_FILE), data)

    async def write_job_content(self, job_id: str, content: Mapping[str, Any]) -> None:
        data = json.dumps(content, sort_keys=True).encode()
        await self._store.put_bytes(BUCKET, ck.job_key(job_id, ck.JOB_FILE), data)

    async def read_job_content(self, job_id: str) -> dict[str, Any] | None:
        """The job a plan was made from; None for jobs planned before it was kept."""
        try:
            data = await self._store.get_bytes(BUCKET, ck.job_key(job_id, ck.JOB_FILE))
        except NotFound:
            return None
        content: dict[str, Any] = json.loads(data)
        return content

    async def write_init(self, job_id: str, safetensors: bytes) -> None:
        await self._store.put_bytes(BUCKET, ck.job_key(job_id, ck.INIT_FILE), safetensors)

    async def read_init(self, job_id: str) -> bytes:
        return await self._store.get_bytes(BUCKET, ck.job_key(job_id, ck.INIT_FILE))

    async def mark_active(self, job_id: str) -> None:
        await self._store.put_bytes(BUCKET, ck.active_key(job_id), job_id.encode())

    async def clear_active(self, job_id: str) -> None:
        await self._store.delete(BUCKET, ck.active_key(job_id))

    async def active_jobs(self) -> list[str]:
        objects = await self._store.list(BUCKET, ck.ACTIVE_PREFIX)
        return sorted(o.key.removeprefix(ck.ACTIVE_PREFIX) for o in objects)

    async def write_result(self, job_id: str, result: Mapping[str, Any]) -> None:
        data = json.dumps(dict(result), sort_keys=True).encode()
        await self._store.put_bytes(BUCKET, ck.job_key(job_id, ck.RESULT_FILE), data)

    async def read_result(self, job_id: str) -> dict[str, Any] | None:
        try:
            return dict(
                json.loads(await self._store.get_bytes(BUCKET, ck.job_key(job_id, ck.RESULT_FILE)))
            )
        except NotFound:
            return None

    # --- who serves a job (the coordinator writes it; members read it when they start) ---------

    async def write_assignment(self, assignment: Assignment) -> None:
        data = json.dumps(assignment.to_json(), sort_keys=True).encode()
        await self._store.put_bytes(BUCKET, ck.job_key(assignment.job_id, ck.ASSIGNMENT_FILE), data)

    async def read_assignment(self, job_id: str) -> Assignment | None:
        try:
            data = await self._store.get_bytes(BUCKET, ck.job_key(job_id, ck.ASSIGNMENT_FILE))
        except NotFound:
            return None
        return Assignment.from_json(json.loads(data))

    # --- shard checkpoints ----------------------------------------------------------------------

    async def write_checkpoint(
        self, job_id: str, shard: int, version: int, data: bytes, pointer: ck.Pointer
    ) -> ck.Pointer:
        """Data first, pointer last; then the checkpoint before the previous one goes.

        ``pointer`` gives everything but the key and sha256, which are filled in here. A writer
        whose assignment is older than the current pointer's is refused (FailedPrecondition):
        the partition has moved on to another shard, and a shard frozen mid-write that wakes
        must not roll its pointer back.
        """
        key = ck.checkpoint_key(job_id, shard, version)
        previous = await self.pointer(job_id, shard)
        if previous is not None and previous.epoch > pointer.epoch:
            raise FailedPrecondition(
                f"partition {shard} of job {job_id} was checkpointed under assignment epoch "
                f"{previous.epoch}, newer than this writer's {pointer.epoch}: another shard "
                "holds it now"
            )
        info = await self._store.put_bytes(BUCKET, key, data)
        current = replace(pointer, key=key, sha256=str(info.sha256))
        await self._store.put_bytes(BUCKET, ck.pointer_key(job_id, shard), current.to_json())
        if previous is not None and previous.key != key:
            await self._prune(job_id, shard, keep={key, previous.key})
        return current

    async def _prune(self, job_id: str, shard: int, keep: set[str]) -> None:
        # The one before the current stays: a reader holding the old pointer can still read it.
        prefix = ck.shard_prefix(job_id, shard)
        for obj in await self._store.list(BUCKET, prefix):
            if obj.key.endswith(".ckpt") and obj.key not in keep:
                await self._store.delete(BUCKET, obj.key)

    async def pointer(self, job_id: str, shard: int) -> ck.Pointer | None:
        try:
            return ck.Pointer.from_json(
                await self._store.get_bytes(BUCKET, ck.pointer_key(job_id, shard))
            )
        except NotFound:
            return None

    async def read_checkpoint(self, pointer: ck.Pointer) -> ShardSnapshot:
        data = await self._store.get_bytes(BUCKET, pointer.key, expected_sha256=pointer.sha256)
        return ck.decode_snapshot(data)
