"""Create the platform's Kafka topics and S3 buckets; safe to run any number of times.

    python -m infra.bootstrap                        # local / compose (replication factor 1)
    python -m infra.bootstrap --replication-factor 3  # a real Kafka cluster

Topics come from `maas.topics.ALL_TOPICS` with their partition counts and a `max.message.bytes`
equal to MAAS_KAFKA_MAX_MESSAGE_BYTES. An existing topic with fewer partitions than the table is
grown (never shrunk: Kafka cannot); one with more is left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from maas.config import Settings
from maas.errors import DeadlineExceeded, FailedPrecondition
from maas.kafka_security import kafka_client_kwargs
from maas.topics import ALL_TOPICS, TRAINING_CONTROL

log = logging.getLogger("infra.bootstrap")

_TOPIC_ALREADY_EXISTS = 36
# Gradients and parameter shards are only replayed from the last checkpoint; a day is plenty and
# keeps a laptop's disk from filling during long training runs.


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_plan(settings: Settings, *, replication_factor: int = 1) -> list[TopicSpec]:
    """The topics to ensure (pure: no I/O)."""
    if replication_factor < 1:
        raise ValueError(f"replication_factor={replication_factor} must be >= 1")
    plan = []
    for topic in ALL_TOPICS:
        partitions = topic.partitions
        configs = {"max.message.bytes": str(settings.kafka_max_message_bytes)}
        if topic is TRAINING_CONTROL:  # heartbeats matter for seconds; keep an hour to debug
            configs["retention.ms"] = str(3_600_000)
        if replication_factor > 1:
            configs["min.insync.replicas"] = str(min(2, replication_factor))
        plan.append(TopicSpec(topic.name, partitions, replication_factor, configs))
    return plan


async def ensure_topics(
    settings: Settings, plan: Sequence[TopicSpec], *, timeout_s: float = 60.0
) -> dict[str, str]:
    """Create or grow each topic in `plan`. Returns {topic: created|exists|grown}."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
    from aiokafka.errors import InvalidPartitionsError

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="maas-bootstrap",
        **kafka_client_kwargs(settings),
    )
    await _retry(admin.start, what=f"Kafka at {settings.kafka_bootstrap}", timeout_s=timeout_s)
    try:
        existing = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
        result: dict[str, str] = {}
        missing = [s for s in plan if s.name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.configs)
                    for s in missing
                ],
                timeout_ms=int(timeout_s * 1000),
            )
            for name, code, message in _topic_errors(response):
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise FailedPrecondition(f"creating topic {name} failed ({code}): {message}")
                result[name] = "created" if code == 0 else "exists"
        for spec in plan:
            have = existing.get(spec.name)
            if have is None:
                continue
            if have < spec.partitions:
                try:
                    await admin.create_partitions({spec.name: NewPartitions(spec.partitions)})
                except InvalidPartitionsError:
                    # Metadata lagged behind a growth that already happened (a concurrent run).
                    result[spec.name] = "exists"
                    continue
                result[spec.name] = f"grown {have}->{spec.partitions}"
            else:
                result[spec.name] = "exists"
        return result
    finally:
        await admin.close()


def _topic_errors(response: object) -> list[tuple[str, int, str]]:
    rows = []
    for item in getattr(response, "topic_errors", []):
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else ""
        rows.append((name, int(code), message or ""))
    return rows


def ensure_buckets(settings: Settings, *, timeout_s: float = 60.0) -> dict[str, str]:
    """Create the platform buckets if missing. Returns {bucket: created|exists}."""
    from maas.store import ALL_BUCKETS, minio_client

    client = minio_client(settings)
    result: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    for bucket in ALL_BUCKETS:
        while True:
            try:
                if client.bucket_exists(bucket):
                    result[bucket] = "exists"
                else:
                    client.make_bucket(bucket)
                    result[bucket] = "created"
                break
            except Exception as exc:  # S3 may still be starting: connection or 5xx errors
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"S3 at {settings.s3_endpoint} did not accept bucket {bucket}: {exc}"
                    ) from exc
                time.sleep(0.5)
    return result


async def _retry(start, *, what: str, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await start()
            return
        except Exception as exc:  # the broker may still be starting
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{what} unreachable after {timeout_s:.0f}s: {exc}") from exc
            await asyncio.sleep(0.5)


async def bootstrap(
    settings: Settings,
    *,
    replication_factor: int = 1,
    timeout_s: float = 60.0,
) -> dict[str, str]:
    plan = topic_plan(settings, replication_factor=replication_factor)
    topics = await ensure_topics(settings, plan, timeout_s=timeout_s)
    buckets = await asyncio.to_thread(ensure_buckets, settings, timeout_s=timeout_s)
    return {
        **{f"topic {k}": v for k, v in topics.items()},
        **{f"bucket {k}": v for k, v in buckets.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.bootstrap",
        description="Create the MaaS Kafka topics and S3 buckets (idempotent). Reads MAAS_* env.",
        epilog="example: MAAS_KAFKA_BOOTSTRAP=kafka:9092 python -m infra.bootstrap "
        "--replication-factor 3",
    )
    parser.add_argument(
        "--replication-factor",
        type=int,
        default=1,
        help="replicas per partition for new topics (1 locally, 3 on a cluster)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="how long to wait for Kafka and S3 to come up",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(
        bootstrap(
            Settings.from_env(),
            replication_factor=args.replication_factor,
            timeout_s=args.timeout_s,
        )
    )
    for what, state in result.items():
        print(f"{what}: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
