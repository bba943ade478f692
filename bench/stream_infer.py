"""Stream inference records/s beside gRPC throughput: the same model on the same inference
process, in the same run.

Prints one JSON document. One ``services.inference`` process (dynamic batching, max_batch_size
64) serves the small MLP of bench/serve.py; in each round, taken in turns so a passing load on a
shared machine weighs on both alike:
  - stream:  ``--requests`` one-row requests sent to maas.infer.v1 by a plain aiokafka producer,
             timed from the first send until a read_committed reader has every prediction
             (records/s, end to end: produce, consume, infer, transactional produce, read);
  - grpc:    tritonclient.grpc.aio at the stream's own concurrency — the requests one fetch
             takes, so the most it has in flight (``kafka_stream.fetch_size``) — for
             ``--seconds`` (requests/s; bench/serve.py's load generator).
The figures are medians over ``--rounds``. The full size of issue 15's exactly-once check (10 000
requests with the server SIGKILLed mid-stream) is the chaos test run with
MAAS_STREAM_REQUESTS=10000: tests/chaos/test_stream_inference_kill.py.

    python -m bench.stream_infer [--requests 3000] [--seconds 3] [--rounds 3]

A private Kafka + S3 stack is started (MAAS_BENCH_USE_RUNNING_STACK=1 uses the running one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.serve import Target, _throughput, register
from bench.serve_peers import MODEL
from infra.ephemeral import bench_settings

MAX_BATCH = 64


async def stream_rate(settings: Any, requests: int, x: Any) -> float:
    """Records/s: ``requests`` one-row requests sent, until every prediction was read."""
    from infra.harness.stream import TopicReader, request_event, send_requests

    run = uuid.uuid4().hex[:8]
    ids = [f"bench-{run}-{i}" for i in range(requests)]
    events = [request_event(rid, MODEL, x) for rid in ids]
    async with TopicReader(settings) as reader:
        started = time.perf_counter()
        await send_requests(settings, events)
        await reader.wait_for(ids, timeout_s=600)
        return requests / (time.perf_counter() - started)


def run(requests: int, seconds: float, rounds: int) -> dict[str, Any]:
    import numpy as np

    from infra.harness.serving import ServiceProcesses
    from services.inference.kafka_stream import fetch_size

    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    concurrency = fetch_size(MAX_BATCH)
    with (
        bench_settings() as settings,
        tempfile.TemporaryDirectory(prefix="maas-bench-stream-") as tmp,
        ServiceProcesses(Path(tmp)) as procs,
    ):
        registry = procs.start_registry()
        addr = procs.start_inference(
            "inference",
            registry,
            MAAS_AUTH="off",
            MAAS_INFERENCE_STREAM="on",
            MAAS_INFERENCE_MAX_BATCH_SIZE=str(MAX_BATCH),
        )
        asyncio.run(register(settings, registry))
        target = Target(addr, MODEL, x, procs.pid("inference"))
        asyncio.run(stream_rate(settings, 200, x))  # warm-up: model loaded, partitions synced
        stream, grpc = [], []
        for _ in range(rounds):
            stream.append(asyncio.run(stream_rate(settings, requests, x)))
            grpc.append(asyncio.run(_throughput(target, concurrency, seconds))[0])
    stream_rps, grpc_rps = statistics.median(stream), statistics.median(grpc)
    return {
        "bench": "stream_infer",
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "model": "mlp 64-128-64-10 (bench/serve.py's small MLP), one row per request",
        "server": f"services.inference, dynamic batching max_batch_size {MAX_BATCH}",
        "rounds": rounds,
        "stream": {
            "requests_per_round": requests,
            "records_per_s": round(stream_rps, 1),
            "rounds_records_per_s": [round(r, 1) for r in stream],
            "how": "plain aiokafka producer -> maas.infer.v1 -> inference (transactions, "
            "read_committed) -> maas.predictions.v1 -> read_committed reader",
        },
        "grpc": {
            "concurrency": concurrency,
            "requests_per_s": round(grpc_rps, 1),
            "rounds_requests_per_s": [round(r, 1) for r in grpc],
            "how": f"tritonclient.grpc.aio ModelInfer, {seconds:g} s per round",
        },
        "stream_vs_grpc": round(stream_rps / grpc_rps, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.requests, args.seconds, args.rounds), indent=2))


if __name__ == "__main__":
    main()
