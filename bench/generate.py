"""Token streaming: tokens/s for 1 and 8 concurrent streams and time to first token, served by
the real inference process (OIP ModelStreamInfer over gRPC and OpenAI-compatible SSE over HTTP),
beside the in-process generate loop on the same weights (the limit).

OIP is measured two ways: ``oip_grpc`` opens a call per request (its set-up is in every TTFT);
``oip_grpc_open_stream`` writes each request on a call kept open, as tritonclient's
``start_stream`` / ``async_stream_infer`` do.

Prints one JSON document and checks the targets of issue 13: 8 streams >= 4x the aggregate
tokens/s of 1 stream; TTFT <= in-process + 2 ms; per-token overhead <= 15 % over the in-process
loop at 1 stream.

    python -m bench.generate [--tokens 128] [--rounds 7] [--size small|ci] [--decode process|thread]
        [--decode-cpus auto|none|LIST]

Rounds interleave the in-process loop and every served case; each figure's median over the
rounds is reported. The checks pair each round's served case with the same round's in-process
loop (or, for scaling, its 1-stream case) and report the median and range of those pairs. The
server is then profiled (py-spy, when installed) while it serves 8 OIP streams.

The model is registered in a real registry on a private Kafka + S3 stack
(MAAS_BENCH_USE_RUNNING_STACK=1 uses the stack MAAS_* points at). Greedy decoding with a
randomly initialised GPT: what is measured is the serving path, not the text. Server and client
share this machine's cores: on a busy machine the figures mean little. By default the server
reserves its last CPU for decode processes (MAAS_INFERENCE_DECODE_CPUS) and the client runs on the
others; ``cpus`` in the JSON says where each process was allowed to run, read back from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import psutil
import torch

from bench.profile import sampling_profile
from infra.ephemeral import bench_settings
from infra.harness.serving import ServiceProcesses
from infra.proc import free_port
from maas import cpus, zoo
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from maas.registry import RegistryClient
from maas.text import wire
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, generate

SIZES = {
    "small": {"block_size": 512, "n_layer": 4, "n_head": 4, "n_embd": 128},
    "ci": {"block_size": 256, "n_layer": 2, "n_head": 2, "n_embd": 32},
}
PROMPT = "def parse(text):\n    "
STREAMS = 8
WARM_TOKENS = 4  # the untimed request before each measurement
PROFILE_S = 4.0  # how long the server is profiled serving 8 OIP streams
Run = Callable[[], Awaitable[tuple[float, float, int]]]  # -> (ttft_s, total_s, tokens)


def in_process(model: GPT, tokens: int) -> tuple[float, float, int]:
    params = SamplingParams(max_tokens=tokens, temperature=0)
    started = time.perf_counter()
    first = 0.0
    count = 0
    for _ in generate(model, PROMPT, params):
        count += 1
        if count == 1:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started, count


def stream_request(name: str, tokens: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name, id=uuid.uuid4().hex)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(wire.encode_raw(np.array([PROMPT.encode()], dtype=object)))
    request.parameters["max_tokens"].int64_param = tokens
    request.parameters["temperature"].string_param = "0"
    return request


class Timing:
    """First-token and total time of one request's replies, counted as they arrive."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first, self.count = 0.0, 0

    def reply(self, reply: pb.ModelStreamInferResponse) -> bool:
        """Count ``reply``; True once it is the request's final one."""
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter() - self.started
        return reply.infer_response.parameters["triton_final_response"].bool_param

    def result(self) -> tuple[float, float, int]:
        return self.first, time.perf_counter() - self.started, self.count


def grpc_call_per_request(stub: Any, name: str, tokens: int) -> Run:
    """Each request opens a ModelStreamInfer call of its own (call set-up in every TTFT)."""

    async def run() -> tuple[float, float, int]:
        request = stream_request(name, tokens)
        timing = Timing()
        async for reply in stub.ModelStreamInfer(iter([request])):
            if timing.reply(reply):
                break
        return timing.result()

    return run


def grpc_open_streams(stub: Any, name: str, tokens: int, idle: list[Any]) -> Run:
    """Requests written on ModelStreamInfer calls kept open between them (``idle``), as
    tritonclient's ``start_stream`` keeps one: a concurrent request takes a call no other uses."""

    async def run() -> tuple[float, float, int]:
        call = idle.pop() if idle else stub.ModelStreamInfer()
        request = stream_request(name, tokens)
        timing = Timing()
        await call.write(request)
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise RuntimeError("the server ended the stream")
            if timing.reply(reply):
                break
        idle.append(call)
        return timing.result()

    return run


def http_stream(session: aiohttp.ClientSession, url: str, name: str, tokens: int) -> Run:
    body = {"model": name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}

    async def run() -> tuple[float, float, int]:
        started = time.perf_counter()
        first, count = 0.0, 0
        async with session.post(f"{url}/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.content:
                if not line.startswith(b"data: {"):
                    continue
                count += 1
                if count == 1:
                    first = time.perf_counter() - started
        return first, time.perf_counter() - started, count

    return run


class Figures:
    """Per-stream TTFT and per-token times, aggregate rates and CPU per token, over rounds."""

    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.per_token: list[float] = []
        self.rates: list[float] = []
        self.cpu = [0.0, 0.0, 0]  # server CPU s, client CPU s, tokens

    def add(self, results: list[tuple[float, float, int]], wall: float) -> None:
        self.rates.append(sum(n for _, _, n in results) / wall)
        self.ttfts += [first for first, _, _ in results]
        self.per_token += [(total - first) / max(1, n - 1) for first, total, n in results]

    def medians(self) -> dict[str, float]:
        out = {
            "ttft_ms": 1e3 * statistics.median(self.ttfts),
            "per_token_ms": 1e3 * statistics.median(self.per_token),
            "tokens_per_s": statistics.median(self.rates),
        }
        if self.cpu[2]:
            # Client and server share this machine's cores: a client near one core's worth of
            # CPU per second of wall time is the ceiling, not the server.
            out["server_cpu_us_per_token"] = round(1e6 * self.cpu[0] / self.cpu[2], 1)
            out["client_cpu_us_per_token"] = round(1e6 * self.cpu[1] / self.cpu[2], 1)
        return out


def server_cpu_s(server: psutil.Process) -> float:
    """User + system CPU of the server and its decode processes (one per generative version)."""
    total = 0.0
    for process in (server, *server.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(process.cpu_times()[:2])
    return total


async def one_round(run: Run, streams: int, figures: Figures, server: psutil.Process) -> None:
    server0, client0 = server_cpu_s(server), time.process_time()
    started = time.perf_counter()
    results = list(await asyncio.gather(*(run() for _ in range(streams))))
    figures.add(results, time.perf_counter() - started)
    figures.cpu[0] += server_cpu_s(server) - server0
    figures.cpu[1] += time.process_time() - client0
    figures.cpu[2] += sum(n for _, _, n in results)


def limit_round(model: GPT, tokens: int, figures: Figures) -> None:
    first, total, count = in_process(model, tokens)
    figures.add([(first, total, count)], total)


async def interleaved(
    model: GPT, grpc_addr: str, http_url: str, name: str, args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    """Every round measures the in-process limit and each door at 1 and 8 streams in turn, so a
    slow spell of this shared machine lands on all of them alike rather than on one.

    Each measurement follows a short untimed request of its own kind (``WARM_TOKENS``): without
    it, a case measured its first token cold, after whatever ran before it in the round — the
    OIP stream always after the in-process loop had filled the caches of the client's CPU with
    its own work, while the HTTP stream followed the OIP round, which had just warmed the
    server's shared path. The limit gets the same short warm-up.
    """
    async with (
        grpc.aio.insecure_channel(grpc_addr) as channel,
        aiohttp.ClientSession() as session,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        open_calls: list[Any] = []
        doors: dict[str, Callable[[int], Run]] = {
            "oip_grpc": lambda tokens: grpc_call_per_request(stub, name, tokens),
            "oip_grpc_open_stream": lambda tokens: grpc_open_streams(
                stub, name, tokens, open_calls
            ),
            "openai_http": lambda tokens: http_stream(session, http_url, name, tokens),
        }
        measured = {door: door_for(args.tokens) for door, door_for in doors.items()}
        warm = {door: door_for(WARM_TOKENS) for door, door_for in doors.items()}
        figures = {(door, n): Figures() for door in doors for n in (1, STREAMS)}
        server = psutil.Process(pid)
        limit = Figures()
        for run in measured.values():
            await run()  # the first request loads the model and starts its engine
            await asyncio.gather(*(run() for _ in range(STREAMS)))  # opens the calls kept open
        placement = cpu_placement(server)
        in_process(model, args.tokens)
        for _ in range(args.rounds):
            in_process(model, WARM_TOKENS)
            limit_round(model, args.tokens, limit)
            for (door, n), fig in figures.items():
                await warm[door]()
                await one_round(measured[door], n, fig, server)
        with sampling_profile(pid, Path(args.workdir) / "profile.txt") as profile:
            # Rounds for a few seconds: one round (~0.2 s) is over before py-spy has attached.
            until = time.perf_counter() + PROFILE_S
            while time.perf_counter() < until:
                await one_round(measured["oip_grpc"], STREAMS, Figures(), server)
    served: dict[str, Any] = {door: {} for door in doors}
    for (door, n), fig in figures.items():
        served[door][f"{n}_streams"] = fig.medians()
    inproc = {**limit.medians(), "tokens": args.tokens}
    return {
        "cpus": placement,
        "in_process": inproc,
        "served": served,
        "checks": checks(limit, figures),
        "profile_oip_grpc_8_streams": profile,
    }


def cpu_placement(server: psutil.Process) -> dict[str, str]:
    """Where each process may run, read back from the processes themselves."""
    # Decode processes are forked by the server's forkserver: its children, not the server's.
    decoders = [p for p in server.children(recursive=True) if p.ppid() != server.pid]
    return {
        "server": cpus.render(server.cpu_affinity()),
        "decode_processes": " ".join(sorted({cpus.render(p.cpu_affinity()) for p in decoders})),
        "bench_client_and_in_process_loop": cpus.render(psutil.Process().cpu_affinity()),
    }


def paired(
    served: list[float], limit: list[float], compare: Callable[[float, float], float]
) -> dict[str, float]:
    """``compare`` of each round's served figure with the same round's limit (or 1-stream)
    figure: median and range. A slow spell of the shared machine moves both sides of a round
    alike, so the pairs vary far less between runs than the ratio of two medians does."""
    values = [compare(a, b) for a, b in zip(served, limit, strict=True)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def checks(limit: Figures, figures: dict[tuple[str, int], Figures]) -> dict[str, Any]:
    out = {}
    for door in sorted({door for door, _ in figures}):
        one, many = figures[door, 1], figures[door, STREAMS]
        scaling = paired(many.rates, one.rates, lambda a, b: a / b)
        ttft = paired(one.ttfts, limit.ttfts, lambda a, b: 1e3 * (a - b))
        overhead = paired(one.per_token, limit.per_token, lambda a, b: 100 * (a / b - 1))
        out[door] = {
            "scaling_8_vs_1": _rounded(scaling, 2),
            "scaling_ok (>= 4)": scaling["median"] >= 4,
            "ttft_over_inprocess_ms": _rounded(ttft, 3),
            "ttft_ok (<= +2 ms)": ttft["median"] <= 2,
            "per_token_overhead_pct": _rounded(overhead, 1),
            "overhead_ok (<= 15 %)": overhead["median"] <= 15,
        }
    return out


def _rounded(figures: dict[str, float], digits: int) -> dict[str, float]:
    return {key: round(value, digits) for key, value in figures.items()}


async def register(settings: Any, registry_addr: str, model: GPT, config: dict[str, int]) -> None:
    async with RegistryClient(
        settings.replace(registry_addr=registry_addr), actor="bench-generate"
    ) as registry:
        await registry.register(model, "bench-gpt", "gpt", config, alias="production")


def decode_cpus(choice: str, decode: str) -> cpus.Reservation | None:
    """``auto``: the last CPU for decode processes (with two or more, decoding in processes);
    ``none``; or a CPU list."""
    usable = cpus.usable()
    if choice == "none" or (choice == "auto" and (decode != "process" or len(usable) < 2)):
        return None
    return cpus.reserve(str(max(usable)) if choice == "auto" else choice, "--decode-cpus")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    config = SIZES[args.size]
    torch.set_num_threads(1)
    reservation = decode_cpus(args.decode_cpus, args.decode)
    model = zoo.build("gpt", config, seed=1).eval()
    assert isinstance(model, GPT)
    report: dict[str, Any] = {
        "model": {"config": config, "parameters": zoo.count_parameters(model)},
        "decode": args.decode,
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="maas-bench-gen-")))
        args.workdir = str(tmp)
        settings = stack.enter_context(bench_settings(tmp))
        processes = stack.enter_context(ServiceProcesses(tmp))
        registry_addr = processes.start_registry()
        asyncio.run(register(settings, registry_addr, model, config))
        port = free_port()
        grpc_addr = processes.start_inference(
            "inference-generate",
            registry_addr,
            MAAS_AUTH="off",
            MAAS_INFERENCE_HTTP_LISTEN=f"127.0.0.1:{port}",
            MAAS_INFERENCE_GENERATION_SLOTS=str(STREAMS),
            MAAS_INFERENCE_TORCH_THREADS="1",
            MAAS_INFERENCE_DECODE_PROCESS=str(args.decode == "process").lower(),
            MAAS_INFERENCE_DECODE_CPUS=cpus.render(reservation.reserved) if reservation else "",
        )
        http_url = f"http://127.0.0.1:{port}/v1"
        pid = processes.pid("inference-generate")
        if reservation is not None:
            # The client stays off the decode CPUs, as a client elsewhere would; so does the
            # in-process loop (the stack and the servers were started before, unpinned).
            cpus.pin_process(reservation.rest)
        report.update(asyncio.run(interleaved(model, grpc_addr, http_url, "bench-gpt", args, pid)))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--decode",
        choices=["process", "thread"],
        default="process",
        help="where the server decodes (MAAS_INFERENCE_DECODE_PROCESS): its default, a child "
        "process, or a thread of the server (the A/B of that choice)",
    )
    parser.add_argument(
        "--decode-cpus",
        default="auto",
        help="MAAS_INFERENCE_DECODE_CPUS of the server: 'auto' (the last CPU, when there are two "
        "or more and decoding is in processes; the bench client then runs on the others), "
        "'none', or a CPU list such as 3 or 2-3",
    )
    print(json.dumps(run_bench(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
