"""What bench.serve measures, against any OIP server: latency at concurrency 1 and throughput at
concurrency N through unmodified tritonclient, each target's and this client's CPU per request,
the in-process forward (the limit), the server's own forward time and batching settings.

This machine is shared and its load drifts, so targets are never measured one after the
other: every figure is gathered in rounds that visit each target in turn, and pooled (latency
samples) or taken as the median (throughput) over the rounds. CPU time per request is summed
over the rounds: it drifts less with load than wall time does.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Target:
    addr: str
    model: str
    x: Any  # one input batch
    pid: int  # the server process, for its CPU time


class CpuMeter:
    """CPU seconds of each server process and of this client, per request, over many spans."""

    def __init__(self, targets: dict[str, Target]) -> None:
        import psutil

        self._procs = {name: psutil.Process(t.pid) for name, t in targets.items()}
        self._used: dict[str, list[float]] = {name: [0.0, 0.0, 0] for name in targets}

    def span(self, name: str, run: Callable[[], int]) -> Any:
        proc = self._procs[name]
        server0, client0 = sum(proc.cpu_times()[:2]), time.process_time()
        requests = run()
        used = self._used[name]
        used[0] += sum(proc.cpu_times()[:2]) - server0
        used[1] += time.process_time() - client0
        used[2] += requests

    def per_request_us(self, name: str) -> dict[str, float]:
        server, client, requests = self._used[name]
        n = max(requests, 1)
        return {
            "server_cpu_us": round(server / n * 1e6, 1),
            "client_cpu_us": round(client / n * 1e6, 1),
        }


def _pct(samples: list[float], q: int) -> float:
    return round(statistics.quantiles(samples, n=100, method="inclusive")[q - 1], 1)


def _triton_input(x: Any) -> Any:
    from tritonclient.grpc import InferInput

    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def latency_us(
    targets: dict[str, Target], rounds: int, per_round: int, cpu: CpuMeter
) -> dict[str, Any]:
    """p50/p99 of sequential requests (concurrency 1) through the sync tritonclient."""
    import tritonclient.grpc as triton

    clients = {name: triton.InferenceServerClient(url=t.addr) for name, t in targets.items()}
    samples: dict[str, list[float]] = {name: [] for name in targets}

    def sequential(name: str) -> int:
        target, client = targets[name], clients[name]
        inputs = [_triton_input(target.x)]
        for _ in range(per_round):
            start = time.perf_counter()
            client.infer(target.model, inputs)
            samples[name].append((time.perf_counter() - start) * 1e6)
        return per_round

    for _ in range(rounds):
        for name in targets:
            cpu.span(name, functools.partial(sequential, name))
    for client in clients.values():
        client.close()
    return {name: {"p50_us": _pct(s, 50), "p99_us": _pct(s, 99)} for name, s in samples.items()}


async def throughput(target: Target, concurrency: int, seconds: float) -> tuple[float, int]:
    """Completed requests/s, and their count, with ``concurrency`` requests kept in flight for
    ``seconds`` after a half-second warm-up (asyncio tritonclient)."""
    import tritonclient.grpc.aio as triton_aio

    client = triton_aio.InferenceServerClient(url=target.addr)
    tensor = _triton_input(target.x)
    done = 0
    measuring = False
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await client.infer(target.model, [tensor])
            if measuring:
                done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.5)  # warm-up: connections, caches, steady batch sizes
    measuring, start = True, time.perf_counter()
    await asyncio.sleep(seconds)
    measuring, elapsed = False, time.perf_counter() - start
    stop = True
    await asyncio.gather(*tasks)
    await client.close()
    return done / elapsed, done


def throughput_rps(
    targets: dict[str, Target], concurrency: int, rounds: int, seconds: float, cpu: CpuMeter
) -> dict[str, float]:
    """Median over rounds of completed requests/s with ``concurrency`` requests in flight."""
    rates: dict[str, list[float]] = {name: [] for name in targets}

    def measure(name: str) -> int:
        rate, done = asyncio.run(throughput(targets[name], concurrency, seconds))
        rates[name].append(rate)
        return done

    for _ in range(rounds):
        for name in targets:
            cpu.span(name, functools.partial(measure, name))
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def forward_us(module: Any, x: Any, runs: int = 2000, idle_us: float = 0.0) -> float:
    """p50 of the in-process forward pass (the same torch call the server makes), in a loop;
    with ``idle_us``, each pass follows a sleep that long, as a server's passes follow the
    round trip at concurrency 1 (a core that idled runs the next pass slower: measured here
    56-106 us after 0.8 ms asleep against 28-50 back to back, 240-300 after 5 ms)."""
    import torch

    rows = torch.from_numpy(x)
    samples = []
    with torch.inference_mode():
        for _ in range(min(100, runs)):
            module(rows)
        for _ in range(runs):
            if idle_us:
                time.sleep(idle_us / 1e6)
            start = time.perf_counter()
            module(rows).numpy()
            samples.append((time.perf_counter() - start) * 1e6)
    return _pct(samples, 50)


def compute_ns(addr: str, model: str) -> tuple[int, int]:
    """(forward passes, ns spent in them) so far, from the server's ModelStatistics."""
    import tritonclient.grpc as triton

    stats = triton.InferenceServerClient(url=addr).get_inference_statistics(model, as_json=True)
    compute = stats["model_stats"][0]["inference_stats"]["compute_infer"]
    return int(compute.get("count", 0)), int(compute.get("ns", 0))


def server_forward_us(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Mean forward time inside the server between two ``compute_ns`` snapshots (taken after
    the warm-up). At concurrency 1 the server sits idle between requests while the client and
    gRPC run, so torch starts each pass with cold caches: this is what a forward really costs
    there, next to the tight-loop figure."""
    return round((after[1] - before[1]) / max(after[0] - before[0], 1) / 1000, 1)


def settings_read_back(addr: str, model: str) -> dict[str, Any]:
    """The batching a server applies, from its own ModelConfig."""
    import tritonclient.grpc as triton

    config = triton.InferenceServerClient(url=addr).get_model_config(model, as_json=True)["config"]
    delay = config.get("dynamic_batching", {}).get("max_queue_delay_microseconds", "0")
    return {
        "max_batch_size": int(config.get("max_batch_size", 0)),
        "max_queue_delay_us": int(delay),
        "workers": int(config["instance_group"][0].get("count", 1)),
    }


def warm_up(targets: dict[str, Target], requests: int = 200) -> None:
    import tritonclient.grpc as triton

    for target in targets.values():
        client = triton.InferenceServerClient(url=target.addr)
        inputs = [_triton_input(target.x)]
        for _ in range(requests):
            client.infer(target.model, inputs)
        client.close()
