"""Gradient-sized tensors through the real Kafka broker, beside the limits of this machine.

Prints one JSON document: for 1 MB and 8 MB float32 tensors, the MB/s of
  - memcpy:          an in-memory copy of the tensor's bytes (the machine's ceiling),
  - msgpack_encode:  maas.codec.encode_tensor alone,
  - end_to_end:      encode -> idempotent acks=all produce (one process) -> broker -> consume and
                     zero-copy decode (another process), on a scratch topic of its own,
and end_to_end as a fraction of msgpack_encode (the issue's target is >= 0.5).

    python -m bench.bus_throughput [--total-mb 256]

Uses the stack MAAS_* points at when MAAS_BENCH_USE_RUNNING_STACK=1, else starts a private one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import uuid
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.bootstrap import TopicSpec, ensure_topics
from infra.ephemeral import bench_settings
from maas import codec
from maas.config import Settings

MB = 1024 * 1024
# A scratch topic of the bench's own (no service reads it): gradients no longer go through Kafka,
# so this measures what the broker path would cost tensors of that size.
BENCH_TOPIC = "maas.bench.tensors"


def rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / MB / seconds, 1)


def memcpy_rate(array: np.ndarray, repeats: int) -> float:
    out = np.empty_like(array)
    start = time.perf_counter()
    for _ in range(repeats):
        np.copyto(out, array)
    return rate(array.nbytes * repeats, time.perf_counter() - start)


def encode_rate(array: np.ndarray, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        codec.encode_tensor(array)
    return rate(array.nbytes * repeats, time.perf_counter() - start)


async def _produce(settings: Settings, size_bytes: int, count: int, key: bytes, go: Any) -> None:
    array = np.random.default_rng(0).standard_normal(size_bytes // 4, dtype=np.float32)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        max_request_size=settings.kafka_max_message_bytes,
        linger_ms=2,
    )
    await producer.start()
    go.wait()  # start the clock only once both sides are connected
    try:
        pending = []
        for _ in range(count):
            payload = codec.encode_tensor(array)
            pending.append(await producer.send(BENCH_TOPIC, payload, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _producer_process(settings: Settings, size_bytes: int, count: int, key: bytes, go: Any) -> None:
    asyncio.run(_produce(settings, size_bytes, count, key, go))


async def end_to_end_rate(settings: Settings, size_bytes: int, count: int) -> float:
    """A producer process (like a gradient worker) and this process consuming (an aggregator)."""
    key = f"bench-{uuid.uuid4().hex}".encode()
    limit = str(settings.kafka_max_message_bytes)
    await ensure_topics(settings, [TopicSpec(BENCH_TOPIC, 1, 1, {"max.message.bytes": limit})])
    consumer = AIOKafkaConsumer(
        BENCH_TOPIC,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        auto_offset_reset="latest",
        max_partition_fetch_bytes=settings.kafka_max_message_bytes,
        fetch_max_bytes=max(64 * MB, settings.kafka_max_message_bytes),
    )
    await consumer.start()
    try:
        await consumer.seek_to_end()
        for tp in consumer.assignment():  # resolve positions before anything is produced
            await consumer.position(tp)
        ctx = multiprocessing.get_context("spawn")
        go = ctx.Event()
        producer = ctx.Process(
            target=_producer_process, args=(settings, size_bytes, count, key, go)
        )
        producer.start()
        await asyncio.sleep(5)  # let the producer process import and connect
        start = time.perf_counter()
        go.set()
        received = 0
        while received < count:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    if record.key == key:
                        if codec.decode_tensor(record.value).nbytes != size_bytes:
                            raise RuntimeError("a tensor came back with the wrong size")
                        received += 1
            if time.perf_counter() - start > 600:
                raise TimeoutError(f"only {received}/{count} tensors arrived in 600 s")
        elapsed = time.perf_counter() - start
        producer.join(timeout=60)
        return rate(size_bytes * count, elapsed)
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--total-mb", type=int, default=256, help="bytes sent per tensor size")
    args = parser.parse_args(argv)
    results = []
    with bench_settings() as settings:
        for size_mb in (1, 8):
            array = np.random.default_rng(0).standard_normal(size_mb * MB // 4, dtype=np.float32)
            count = max(4, args.total_mb // size_mb)
            encode = encode_rate(array, count)
            e2e = asyncio.run(end_to_end_rate(settings, array.nbytes, count))
            results.append(
                {
                    "tensor_mb": size_mb,
                    "messages": count,
                    "memcpy_mb_s": memcpy_rate(array, count),
                    "msgpack_encode_mb_s": encode,
                    "end_to_end_mb_s": e2e,
                    "end_to_end_vs_encode": round(e2e / encode, 3),
                }
            )
    print(
        json.dumps(
            {"bench": "bus_throughput", "target_vs_encode": 0.5, "results": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
