"""Serving latency and throughput through tritonclient, beside the limits and a peer server.

Prints one JSON document. Every server is a separate process driven by the same tritonclient
(sync client for latency, asyncio client for throughput) from this process:
  - grpc_floor:      a no-op OIP servicer on grpc.aio returning a fixed tensor (Python gRPC's
                     own cost: no server can do less per request),
  - maas_batching:   services.inference with dynamic batching (max_batch_size 64, delay 0),
  - maas_unbatched:  services.inference with batching off,
  - kserve:          KServe's ModelServer on the same weights, when ~/.cache/maas/venv-kserve
                     holds kserve (it runs from that venv: its protos clash with tritonclient's),
and the in-process forward pass of the same model (batch of 1), the limit.
For each: p50/p99 latency at concurrency 1, throughput at concurrency 16 and 64 (req/s).
Then a 10 M-parameter MLP at concurrency 64, dynamic batching vs unbatched.

    python -m bench.serve [--seconds 1.5] [--rounds 3] [--no-kserve]

Models are registered in a real registry on a private Kafka + S3 stack
(MAAS_BENCH_USE_RUNNING_STACK=1 uses the stack MAAS_* points at). Figures are compared with the
targets of issue 6 at the end ("checks").

This file also runs *as* the peer servers (``--peer floor|kserve``), the KServe one inside the
KServe venv where neither tritonclient nor this repository's packages are installed: imports
of those therefore happen inside the functions that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.ephemeral import bench_settings

ROOT = Path(__file__).resolve().parents[1]
KSERVE_VENV = Path.home() / ".cache" / "maas" / "venv-kserve"
SMALL = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
TEN_M = {"in_features": 1024, "hidden": [2048, 2048, 2048], "num_classes": 10}
MODEL = "bench-mlp"
MODEL_10M = "bench-mlp-10m"
OURS = ("maas_batching", "maas_unbatched")
TARGET_EXTRA_US = 100.0


# --- peer servers (run in their own processes) -----------------------------------------------


def serve_floor(port: int) -> None:
    """A do-nothing OIP server: every ModelInfer gets the same prebuilt 1x10 FP32 answer."""
    import grpc

    from maas.oip import grpc_predict_v2_pb2 as pb
    from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    answer = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    answer.outputs.add(name="output", datatype="FP32", shape=[1, 10])
    answer.raw_output_contents.append(bytes(40))

    class Floor(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=True)

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            return answer

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def serve_kserve(port: int, weights: str, probe_site: str) -> None:
    """KServe's ModelServer serving the same zoo MLP (torch borrowed from the project's venv)."""
    # kserve's own packages (protobuf, grpcio, numpy) stay first on the path; torch, safetensors
    # and the model zoo come after them.
    sys.path += [str(ROOT / "shared"), probe_site]
    import kserve
    import torch
    from kserve import InferOutput, InferRequest, InferResponse
    from safetensors.torch import load_file

    from maas import zoo

    torch.set_num_threads(1)
    module = zoo.build("mlp", SMALL)
    module.load_state_dict(load_file(weights))
    module.eval()

    class Mlp(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(MODEL)
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:
            x = payload.inputs[0].as_numpy()
            with torch.inference_mode():
                y = module(torch.from_numpy(x)).numpy()
            out = InferOutput("output", list(y.shape), "FP32")
            out.set_data_from_numpy(y, binary_data=True)
            return InferResponse(payload.id, MODEL, [out], use_binary_outputs=True)

    kserve.ModelServer(grpc_port=port, http_port=_free_port(), workers=1).start([Mlp()])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- measurements -------------------------------------------------------------------------------
#
# This machine is shared and its load drifts, so targets are never measured one after the
# other: every figure is gathered in rounds that visit each target in turn, and pooled (latency
# samples) or taken as the median (throughput) over the rounds.

Target = tuple[str, str, Any]  # address, model name, one input batch


def _pct(samples: list[float], q: int) -> float:
    return round(statistics.quantiles(samples, n=100, method="inclusive")[q - 1], 1)


def latency_us(targets: dict[str, Target], rounds: int, per_round: int) -> dict[str, Any]:
    """p50/p99 of sequential requests (concurrency 1) through the sync tritonclient."""
    import tritonclient.grpc as triton

    calls = {}
    for name, (addr, model, x) in targets.items():
        client = triton.InferenceServerClient(url=addr)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        calls[name] = (client, model, [tensor])
        for _ in range(100):
            client.infer(model, [tensor])
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (client, model, inputs) in calls.items():
            for _ in range(per_round):
                start = time.perf_counter()
                client.infer(model, inputs)
                samples[name].append((time.perf_counter() - start) * 1e6)
    for client, _, _ in calls.values():
        client.close()
    return {name: {"p50_us": _pct(s, 50), "p99_us": _pct(s, 99)} for name, s in samples.items()}


async def _throughput(target: Target, concurrency: int, seconds: float) -> float:
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput

    addr, model, x = target
    client = triton_aio.InferenceServerClient(url=addr)
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    done = 0
    measuring = False
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await client.infer(model, [tensor])
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
    return done / elapsed


def throughput_rps(
    targets: dict[str, Target], concurrency: int, rounds: int, seconds: float
) -> dict[str, float]:
    """Median over rounds of completed requests/s with ``concurrency`` requests in flight."""
    rates: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, target in targets.items():
            rates[name].append(asyncio.run(_throughput(target, concurrency, seconds)))
    return {name: round(statistics.median(r), 1) for name, r in rates.items()}


def forward_us(module: Any, x: Any, runs: int = 2000) -> float:
    """p50 of the in-process forward pass (the same torch call the server makes), in a loop."""
    import torch

    rows = torch.from_numpy(x)
    samples = []
    with torch.inference_mode():
        for _ in range(min(100, runs)):
            module(rows)
        for _ in range(runs):
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
    """Mean forward time inside the server between two ``compute_ns`` snapshots.

    At concurrency 1 the server sits idle between requests while the client and gRPC run, so
    torch starts each pass with cold caches: this is what a forward really costs there, next
    to the tight-loop figure above.
    """
    return round((after[1] - before[1]) / max(after[0] - before[0], 1) / 1000, 1)


# --- orchestration ------------------------------------------------------------------------------


@contextlib.contextmanager
def peer(argv: list[str], port: int, log: Path) -> Iterator[str]:
    """A peer server process; stopped by its PID on exit."""
    import tritonclient.grpc as triton

    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    addr = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(Exception):
                if triton.InferenceServerClient(url=addr).is_server_ready():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[3:]} did not become ready; see {log}")
            time.sleep(0.2)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def register(settings: Any, registry_addr: str) -> dict[str, Any]:
    from maas import zoo
    from maas.registry import RegistryClient

    modules = {
        MODEL: zoo.build("mlp", SMALL, seed=1).eval(),
        MODEL_10M: zoo.build("mlp", TEN_M, seed=1).eval(),
    }
    config = {MODEL: SMALL, MODEL_10M: TEN_M}
    async with RegistryClient(settings.replace(registry_addr=registry_addr)) as client:
        for name, module in modules.items():
            await client.register(module, name, "mlp", config[name], alias="production")
    return modules


def kserve_python() -> Path | None:
    python = KSERVE_VENV / "bin" / "python"
    if not python.exists():
        return None
    check = subprocess.run([str(python), "-c", "import kserve"], capture_output=True)
    return python if check.returncode == 0 else None


@contextlib.contextmanager
def kserve_peer(module: Any, workdir: Path) -> Iterator[str | None]:
    """KServe's ModelServer on ``module``'s weights, or None when kserve is not installed."""
    import site

    from safetensors.torch import save_file

    python = kserve_python()
    if python is None:
        yield None
        return
    weights = workdir / "bench-mlp.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    port = _free_port()
    argv = [
        str(python),
        "-m",
        "bench.serve",
        "--peer",
        "kserve",
        "--peer-port",
        str(port),
        "--weights",
        str(weights),
        "--probe-site",
        site.getsitepackages()[0],
    ]
    with peer(argv, port, workdir / "kserve.log") as addr:
        yield addr


def check(name: str, value: float, limit: float, *, at_most: bool) -> dict[str, Any]:
    met = value <= limit if at_most else value >= limit
    return {
        "check": name,
        "value": value,
        "limit": round(limit, 1),
        "met": met,
        "miss": None if met else round(abs(value - limit), 1),
    }


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    small, big = result["small_mlp"], result["mlp_10m"]
    ours, floor, kserve = small["maas_batching"], small["grpc_floor"], small["kserve"]
    cold = check(
        "p50 c1 <= floor + forward as measured inside the server + 100us (context)",
        ours["p50_us"],
        floor["p50_us"] + ours["server_forward_c1_us"] + TARGET_EXTRA_US,
        at_most=True,
    )
    out = [
        check(
            "p50 c1 <= floor + forward + 100us (us)",
            ours["p50_us"],
            floor["p50_us"] + small["in_process_forward_p50_us"] + TARGET_EXTRA_US,
            at_most=True,
        ),
        cold,
        check(
            "10M MLP c64: batching / unbatched >= 3x",
            big["batching_vs_unbatched"],
            3.0,
            at_most=False,
        ),
    ]
    if "p50_us" in kserve:
        out += [
            check(
                "p50 c1 <= 0.8x KServe (us)", ours["p50_us"], 0.8 * kserve["p50_us"], at_most=True
            ),
            check(
                "c16 throughput >= 1.5x KServe (req/s)",
                ours["c16_rps"],
                1.5 * kserve["c16_rps"],
                at_most=False,
            ),
        ]
    return out


def run(seconds: float, rounds: int, with_kserve: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from maas import zoo
    from services.inference.harness import ServiceProcesses

    torch.set_num_threads(1)  # as the servers run it
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    x10 = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    with (
        bench_settings() as settings,
        tempfile.TemporaryDirectory(prefix="maas-bench-serve-procs-") as tmp,
        ServiceProcesses(Path(tmp)) as procs,
    ):
        registry = procs.start_registry()
        # The peers serve without auth: so do ours here, to compare like with like.
        batching = procs.start_inference(
            "maas-batching", registry, MAAS_AUTH="off", MAAS_INFERENCE_MAX_BATCH_SIZE="64"
        )
        unbatched = procs.start_inference(
            "maas-unbatched", registry, MAAS_AUTH="off", MAAS_INFERENCE_MAX_BATCH_SIZE="1"
        )
        modules = asyncio.run(register(settings, registry))
        port = _free_port()
        with (
            peer(
                [sys.executable, "-m", "bench.serve", "--peer", "floor", "--peer-port", str(port)],
                port,
                Path(tmp) / "floor.log",
            ) as floor,
            kserve_peer(modules[MODEL], Path(tmp))
            if with_kserve
            else contextlib.nullcontext() as kserve,
        ):
            targets = {
                "grpc_floor": (floor, MODEL, x),
                "maas_batching": (batching, MODEL, x),
                "maas_unbatched": (unbatched, MODEL, x),
            }
            if kserve:
                targets["kserve"] = (kserve, MODEL, x)
            before = {name: compute_ns(targets[name][0], MODEL) for name in OURS}
            latency = latency_us(targets, rounds, per_round=500)
            for name in OURS:
                latency[name]["server_forward_c1_us"] = server_forward_us(
                    before[name], compute_ns(targets[name][0], MODEL)
                )
            c16 = throughput_rps(targets, 16, rounds, seconds)
            c64 = throughput_rps(targets, 64, rounds, seconds)
        small: dict[str, Any] = {
            "params": zoo.count_parameters(modules[MODEL]),
            "in_process_forward_p50_us": forward_us(modules[MODEL], x),
        }
        for name in targets:
            small[name] = {**latency[name], "c16_rps": c16[name], "c64_rps": c64[name]}
        if "kserve" not in targets:
            small["kserve"] = {
                "skipped": "--no-kserve"
                if not with_kserve
                else f"no kserve in {KSERVE_VENV} (make that venv; pip install kserve)"
            }
        big_rps = throughput_rps(
            {"batching": (batching, MODEL_10M, x10), "unbatched": (unbatched, MODEL_10M, x10)},
            64,
            rounds,
            2 * seconds,
        )
        big = {
            "params": zoo.count_parameters(modules[MODEL_10M]),
            "in_process_forward_p50_us": forward_us(modules[MODEL_10M], x10, runs=200),
            "maas_batching_c64_rps": big_rps["batching"],
            "maas_unbatched_c64_rps": big_rps["unbatched"],
            "batching_vs_unbatched": round(big_rps["batching"] / big_rps["unbatched"], 2),
        }
    result: dict[str, Any] = {
        "bench": "serve",
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "client": "tritonclient.grpc (sync: latency; aio: throughput) in this process, "
        f"targets interleaved over {rounds} rounds",
        "server_settings": {
            "workers": 2,
            "torch_threads": 1,
            "max_batch_size": 64,
            "max_queue_delay_us": 0,
            "inline_forward_us": 100,
        },
        "small_mlp": small,
        "mlp_10m": big,
    }
    result["checks"] = checks(result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=1.5,
        help="per throughput measurement (each figure is a median of rounds)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure")
    parser.add_argument("--no-kserve", action="store_true", help="skip the KServe peer")
    parser.add_argument("--peer", choices=["floor", "kserve"], help=argparse.SUPPRESS)
    parser.add_argument("--peer-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--probe-site", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer == "floor":
        serve_floor(args.peer_port)
    elif args.peer == "kserve":
        serve_kserve(args.peer_port, args.weights, args.probe_site)
    else:
        print(json.dumps(run(args.seconds, args.rounds, not args.no_kserve), indent=2))


if __name__ == "__main__":
    main()
