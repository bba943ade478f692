"""MiniLM served by the real inference process beside its in-process limit, and the timing
helpers bench/text.py's sections share (its served section lives here).

The served section starts a private stack (registry + Kafka + S3) and an inference process, imports
all-MiniLM-L6-v2 from its package, then times a one-sentence BYTES request from tritonclient at
concurrency 1 over gRPC and over REST (in blocks, in turns with the in-process tokenize + forward
and with the same gRPC request to two no-op OIP servers, one in Python (grpc.aio) and one in Go:
the floors of a round trip with and without a Python server) and counts requests at concurrency
16.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.ephemeral import bench_settings
from maas.text.model import TextModel
from maas.text.pretrained import MINILM_PACKAGE

SENTENCE = "The quick brown fox jumps over the lazy dog."
ROUNDS = 20
C1_ROUNDS, C1_BLOCK = 12, 10  # served vs in-process at c=1: 108 timed calls of each
# The served encoder runs one forward at a time with as many torch threads as the in-process
# forward it is compared with (the server's default, 2 workers x 1 thread, suits small models).
SERVER_SETTINGS = {
    "MAAS_AUTH": "off",
    "MAAS_INFERENCE_MAX_BATCH_SIZE": "64",
    "MAAS_INFERENCE_MAX_QUEUE_DELAY_US": "0",
    "MAAS_INFERENCE_WORKERS": "1",
    "MAAS_INFERENCE_TORCH_THREADS": str(torch.get_num_threads()),
}


def p50_ms(call: Callable[[], object], rounds: int = ROUNDS) -> float:
    call()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def p50s_interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, block: int = 1
) -> dict[str, float]:
    """Median ms of each call, timed in turns (one round runs every call ``block`` times in a
    row), so a load that comes and goes on a shared machine weighs on every call alike and
    ratios stay fair. With ``block`` > 1 the first call of each block is not timed: it pays for
    the switch from the call before it (another process's threads still spinning on the cores
    after its own pass), which is not its own cost."""
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            for i in range(block):
                started = time.perf_counter()
                call()
                if block == 1 or i > 0:
                    times[label].append(time.perf_counter() - started)
    return {label: statistics.median(t) * 1000 for label, t in times.items()}


# --- served -------------------------------------------------------------------------------------


@contextlib.contextmanager
def served_minilm() -> Iterator[tuple[str, str, str]]:
    """(gRPC address, HTTP address, model name) of an inference server serving MiniLM."""
    import asyncio

    from infra.harness.serving import ServiceProcesses
    from maas.cli_import import import_pretrained
    from maas.registry import RegistryClient

    with (
        bench_settings() as settings,
        tempfile.TemporaryDirectory() as tmp,
        ServiceProcesses(Path(tmp)) as processes,
    ):
        registry = processes.start_registry()
        inference = processes.start_inference("inference-text", registry, **SERVER_SETTINGS)
        name = f"bench-minilm-{uuid.uuid4().hex[:6]}"

        async def register() -> None:
            async with RegistryClient(settings.replace(registry_addr=registry)) as client:
                await import_pretrained(client, MINILM_PACKAGE, name, alias="production")

        asyncio.run(register())
        yield inference, processes.http_addr("inference-text"), name


def serving(minilm: TextModel, seconds: float) -> dict[str, Any]:
    import tritonclient.grpc as triton
    import tritonclient.http as triton_http

    from bench.serve_peers import floor_peer, go_floor_peer
    from maas.config import Settings

    with (
        served_minilm() as (addr, http_addr, name),
        tempfile.TemporaryDirectory() as tmp,
        floor_peer(Path(tmp)) as (floor_addr, _),
        go_floor_peer(Path(tmp), Settings.from_env().cache_path) as go_floor,
    ):

        def request(client: triton.InferenceServerClient) -> Any:
            tensor = triton.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([SENTENCE], dtype=np.object_))
            return client.infer(name, [tensor])

        def ask(client: triton.InferenceServerClient) -> None:
            request(client).as_numpy("embedding")

        single = triton.InferenceServerClient(url=addr)
        rest = triton_http.InferenceServerClient(url=http_addr)

        def ask_rest() -> None:  # the same request through the OIP REST door
            tensor = triton_http.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([SENTENCE], dtype=np.object_), binary_data=True)
            wanted = [triton_http.InferRequestedOutput("embedding", binary_data=True)]
            rest.infer(name, [tensor], outputs=wanted).as_numpy("embedding")

        noops = {"noop_roundtrip": triton.InferenceServerClient(url=floor_addr)}
        if not isinstance(go_floor, str):
            noops["noop_go_roundtrip"] = triton.InferenceServerClient(url=go_floor[0])
        ask(single)  # warm-up, outside the server's counts below
        count, ns = forward_counts(single, name)
        # The limit is timed in the same rounds as the served requests, with the stack up: on
        # this machine the forward's own speed drifts by up to 2x between minutes, so a limit
        # from another section would measure the drift, not the server. In blocks, not one
        # call each: a call right after the other process's pass ran 5-6 ms slower, the server
        # and this process each paying for the other's spinning threads (measured: 13.5 ms
        # in process and 14.6 served one by one, 7.3 and 9.5 alone).
        c1 = p50s_interleaved(
            {
                "inprocess_tokenize_and_forward": lambda: minilm([SENTENCE]),
                "served": lambda: ask(single),
                "served_rest": ask_rest,
                **{label: functools.partial(request, noop) for label, noop in noops.items()},
            },
            rounds=C1_ROUNDS,
            block=C1_BLOCK,
        )
        count_after, ns_after = forward_counts(single, name)
        forward_ms = (ns_after - ns) / max(count_after - count, 1) / 1e6
        clients = [triton.InferenceServerClient(url=addr) for _ in range(16)]

        def worker(client: triton.InferenceServerClient) -> int:
            done, deadline = 0, time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                ask(client)
                done += 1
            return done

        with ThreadPoolExecutor(max_workers=16) as pool:
            total = sum(pool.map(worker, clients))
        return {
            "served_p50_ms_c1": c1["served"],
            "inprocess_tokenize_and_forward_p50_ms": c1["inprocess_tokenize_and_forward"],
            # The same request over OIP REST (tritonclient.http, binary tensor data).
            "served_rest_p50_ms_c1": c1["served_rest"],
            # Mean wall time of the forward inside the server over those c=1 requests (its
            # statistics' compute_infer): how much of the gap is the forward itself.
            "server_forward_ms_c1": forward_ms,
            # The same request answered by servers that do nothing: bench.serve's grpc.aio
            # floor (what a Python server's round trip alone costs here) and the Go one (what
            # the client and the kernel alone cost: no served figure can be below in-process +
            # this, whatever the server is written in).
            "noop_roundtrip_p50_ms_c1": c1["noop_roundtrip"],
            "noop_go_roundtrip_p50_ms_c1": c1.get("noop_go_roundtrip", go_floor),
            "served_req_per_s_c16": total / seconds,
            "server_settings": SERVER_SETTINGS,
        }


def forward_counts(client: Any, name: str) -> tuple[int, int]:
    """(forwards, their total ns) from the server's statistics (compute_infer)."""
    stats = client.get_inference_statistics(name, as_json=True)["model_stats"][0]
    infer = stats["inference_stats"]["compute_infer"]
    return int(infer.get("count", 0)), int(infer.get("ns", 0))
