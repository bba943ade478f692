"""What the end-to-end tests share: publishing a job as any team's producer does, following it
to its end, and the environment the `maas` CLI needs to reach a given stack."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from maas import events, jobs, topics
from maas.config import Settings

JOB_TIMEOUT_S = 400.0


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "MAAS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "MAAS_S3_ENDPOINT": settings.s3_endpoint,
        "MAAS_STATE_DIR": settings.state_dir,
        "MAAS_REGISTRY_ADDR": settings.registry_addr,
        "MAAS_INFERENCE_ADDR": settings.inference_addr,
    }


async def publish_plain_json(settings: Settings, job: dict[str, Any]) -> None:
    """What any team's producer does: JSON bytes and a content-type header, no MaaS code."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.JOBS.name,
            json.dumps(job).encode(),
            key=job["job_id"].encode(),
            headers=[("content-type", b"application/json")],
        )
    finally:
        await producer.stop()


async def final_status(settings: Settings, job_id: str) -> jobs.JobSummary:
    final = jobs.JobSummary(job_id)
    async for summary in jobs.watch(settings, job_id, timeout_s=JOB_TIMEOUT_S):
        final = summary
    return final


def a_job(kind: str, **fields: Any) -> dict[str, Any]:
    job_id = f"e2e-{kind}-{uuid.uuid4().hex[:8]}"
    return {
        "schema": events.JOB,
        "id": uuid.uuid4().hex,
        "ts": events.now_ms(),
        "job_id": job_id,
        "type": kind,
        **fields,
    }
