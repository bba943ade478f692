"""Serving latency and throughput through tritonclient, beside the limits and a peer server.

Prints one JSON document. Every server is a separate process driven by the same tritonclient
(sync client for latency, asyncio client for throughput) from this process:
  - grpc_floor:      a no-op OIP servicer on grpc.aio returning a fixed tensor (Python gRPC's
                     own cost: no Python server can do less per request),
  - go_floor:        the same no-op server in Go (bench/noop_go, built on first use into the
                     cache; reported as not run, with the reason, when it cannot be built):
                     what the client and the kernel alone cost, the ceiling this client and
                     machine put on any server,
  - maas_batching:   services.inference with dynamic batching (max_batch_size 64, delay 0),
  - maas_unbatched:  services.inference with batching off,
  - kserve:          KServe's ModelServer on the same weights, from its own venv (built on first
                     use into ~/.cache/maas/venv-kserve-<version>; its protos clash with
                     tritonclient's); reported as not run, with the reason, when it cannot run,
and the in-process forward pass of the same model (batch of 1), the limit.
For each: p50/p99 latency at concurrency 1, throughput at concurrency 16 and 64 (req/s), and
the CPU time per request of the server process and of this client (a client-bound ceiling
shows as client CPU near 1 s per second). Then a 10 M-parameter MLP at concurrency 64, dynamic
batching vs unbatched, beside its in-process forward of 1 and of 64 rows and the rate at which
each server's CPU per request (with the client's) would keep every core busy. After the
figures, the floor and the batching server are each profiled while they alone serve 16
clients: py-spy's top Python frames, and perf's CPU by library (interpreter, grpc, torch,
kernel...; perf must be installed and allowed to attach) in microseconds per request, with
ours minus the floor's ("native_us_per_request_over_floor"): what our server does per request
beyond Python gRPC's own, and where.

    python -m bench.serve [--seconds 1.5] [--rounds 3] [--no-kserve]

Models are registered in a real registry on a private Kafka + S3 stack
(MAAS_BENCH_USE_RUNNING_STACK=1 uses the stack MAAS_* points at). Figures are compared with the
targets of issue 17 at the end ("checks"). The batching settings printed are read back from the
servers (ModelConfig).

The peers run from bench/serve_peers.py, the measurements from bench/serve_measure.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.profile import native_profile, sampling_profile
from bench.serve_measure import (
    CpuMeter,
    Target,
    compute_ns,
    forward_us,
    latency_us,
    server_forward_us,
    settings_read_back,
    throughput,
    throughput_rps,
    warm_up,
)
from bench.serve_peers import MODEL, SMALL, floor_peer, go_floor_peer, kserve_peer
from infra.ephemeral import bench_settings

TEN_M = {"in_features": 1024, "hidden": [2048, 2048, 2048], "num_classes": 10}
MODEL_10M = "bench-mlp-10m"
OURS = ("maas_batching", "maas_unbatched")
PROFILED = ("grpc_floor", "maas_batching")  # profiled apart, each alone at 16 clients
TARGET_EXTRA_US = 150.0
INLINE_FORWARD_US = "500"


# --- checks -------------------------------------------------------------------------------------


def check(name: str, value: float, limit: float | None, *, at_most: bool) -> dict[str, Any]:
    if limit is None:
        return {"check": name, "value": value, "met": None, "not_run": "its peer did not run"}
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
    peer = "p50_us" in kserve
    return [
        check(
            "p50 c1 <= floor + in-process forward + 150us (us)",
            ours["p50_us"],
            floor["p50_us"] + small["in_process_forward_p50_us"] + TARGET_EXTRA_US,
            at_most=True,
        ),
        check(
            "p50 c1 <= floor + forward as measured inside the server + 150us (context)",
            ours["p50_us"],
            floor["p50_us"] + ours["server_forward_c1_us"] + TARGET_EXTRA_US,
            at_most=True,
        ),
        check(
            "p50 c1 <= floor + in-process forward after an idle gap + 150us (context)",
            ours["p50_us"],
            floor["p50_us"] + small["in_process_forward_after_idle_p50_us"] + TARGET_EXTRA_US,
            at_most=True,
        ),
        check(
            "p50 c1 <= 0.8x KServe (us)",
            ours["p50_us"],
            0.8 * kserve["p50_us"] if peer else None,
            at_most=True,
        ),
        check(
            "c16 throughput >= 1.5x KServe (req/s)",
            ours["c16_rps"],
            1.5 * kserve["c16_rps"] if peer else None,
            at_most=False,
        ),
        check(
            "c16 throughput >= 0.75x the floor (req/s)",
            ours["c16_rps"],
            0.75 * floor["c16_rps"],
            at_most=False,
        ),
        check(
            "10M MLP c64: batching / unbatched >= 5x",
            big["batching_vs_unbatched"],
            5.0,
            at_most=False,
        ),
    ]


# --- orchestration ------------------------------------------------------------------------------


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


def measure_small(
    targets: dict[str, Target], rounds: int, seconds: float, workdir: Path
) -> dict[str, Any]:
    """Latency, throughput and CPU per request of every target; the batching server profiled."""
    warm_up(targets)
    before = {name: compute_ns(targets[name].addr, MODEL) for name in OURS}
    cpu = CpuMeter(targets)
    latency = latency_us(targets, rounds, per_round=500, cpu=cpu)
    for name in OURS:
        after = compute_ns(targets[name].addr, MODEL)
        latency[name]["server_forward_c1_us"] = server_forward_us(before[name], after)
    c16 = throughput_rps(targets, 16, rounds, seconds, cpu)
    c64 = throughput_rps(targets, 64, rounds, seconds, cpu)
    small = {
        name: {
            **latency[name],
            "c16_rps": c16[name],
            "c64_rps": c64[name],
            **cpu.per_request_us(name),
        }
        for name in targets
    }
    for name in PROFILED:
        small[f"profile_{name}_c16"] = profile_c16(
            targets[name], seconds, workdir / name, small[name]["server_cpu_us"]
        )
    small["native_us_per_request_over_floor"] = native_gap(
        *(small[f"profile_{name}_c16"]["native"] for name in PROFILED)
    )
    return small


def profile_c16(target: Target, seconds: float, out: Path, cpu_us: float) -> dict[str, Any]:
    """Sampling profiles of one server alone at 16 clients, after (not during) the figures:
    py-spy's Python frames, then perf's shared objects, those turned into microseconds of the
    server's CPU per request (``cpu_us``, measured unprofiled above). Beside each other, the
    floor's and ours show what our server does per request beyond Python gRPC's own."""
    with sampling_profile(target.pid, out) as profile:
        rate, done = asyncio.run(throughput(target, 16, seconds))
    if profile.get("samples"):
        # Samples per request compare the two servers' CPU per request, thread by thread.
        profile["rps_while_profiled"] = round(rate, 1)
        profile["samples_per_request"] = round(profile["samples"] / max(done, 1), 3)
    with native_profile(target.pid, out.with_suffix(".perf")) as native:
        asyncio.run(throughput(target, 16, seconds))
    if "by_library_pct" in native:
        native["us_per_request"] = {
            group: round(pct / 100 * cpu_us, 1) for group, pct in native["by_library_pct"].items()
        }
    profile["native"] = native
    return profile


def native_gap(floor: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Where our server's CPU per request goes beyond the floor's, by library (perf)."""
    if "us_per_request" not in floor or "us_per_request" not in ours:
        return {"not_run": ours.get("not_run") or floor.get("not_run")}
    theirs, mine = floor["us_per_request"], ours["us_per_request"]
    gap = {group: round(mine.get(group, 0) - theirs.get(group, 0), 1) for group in {*theirs, *mine}}
    return dict(sorted(gap.items(), key=lambda item: -item[1]))


def cpu_ceiling(cpu: CpuMeter, targets: dict[str, Target]) -> dict[str, Any]:
    """CPU per request (server, forward included, and this client) and the rate at which it
    would keep every core of this machine busy: a measured rate near it is machine-bound."""
    per_request = {name: cpu.per_request_us(name) for name in targets}
    cores = os.cpu_count() or 1
    return {
        "cpu_per_request_us": per_request,
        "all_cores_busy_at_rps": {
            name: round(cores * 1e6 / (us["server_cpu_us"] + us["client_cpu_us"]), 1)
            for name, us in per_request.items()
        },
    }


def run(seconds: float, rounds: int, with_kserve: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from infra.harness.serving import ServiceProcesses
    from maas import zoo

    torch.set_num_threads(1)  # as the servers run it
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    x10 = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    with (
        bench_settings() as settings,
        tempfile.TemporaryDirectory(prefix="maas-bench-serve-procs-") as tmp,
        ServiceProcesses(Path(tmp)) as procs,
    ):
        workdir = Path(tmp)
        registry = procs.start_registry()
        # The peers serve without auth: so do ours here, to compare like with like.
        batching, unbatched = (
            procs.start_inference(
                name,
                registry,
                MAAS_AUTH="off",
                MAAS_INFERENCE_INLINE_FORWARD_US=INLINE_FORWARD_US,
                MAAS_INFERENCE_MAX_BATCH_SIZE=rows,
            )
            for name, rows in (("maas-batching", "64"), ("maas-unbatched", "1"))
        )
        modules = asyncio.run(register(settings, registry))
        peer = (
            kserve_peer(modules[MODEL], workdir)
            if with_kserve
            else contextlib.nullcontext("not run: --no-kserve")
        )
        with (
            floor_peer(workdir) as (floor, floor_pid),
            go_floor_peer(workdir, settings.cache_path) as go_floor,
            peer as kserve,
        ):
            targets = {
                "grpc_floor": Target(floor, MODEL, x, floor_pid),
                "maas_batching": Target(batching, MODEL, x, procs.pid("maas-batching")),
                "maas_unbatched": Target(unbatched, MODEL, x, procs.pid("maas-unbatched")),
            }
            peers = {"kserve": kserve, "go_floor": go_floor}
            for label, started in peers.items():
                if not isinstance(started, str):
                    targets[label] = Target(started[0], MODEL, x, started[1])
            small = measure_small(targets, rounds, seconds, workdir)
            for label, started in peers.items():
                if isinstance(started, str):
                    small[label] = {"not_run": started}  # named in the output, never dropped
        small["params"] = zoo.count_parameters(modules[MODEL])
        small["in_process_forward_p50_us"] = forward_us(modules[MODEL], x)
        # The same pass after sleeping the floor's round trip: what a c=1 server's idle core
        # starts each pass from (context for the c=1 check, which keeps the figure above).
        small["in_process_forward_after_idle_p50_us"] = forward_us(
            modules[MODEL], x, runs=500, idle_us=small["grpc_floor"]["p50_us"]
        )
        big_targets = {
            "batching": Target(batching, MODEL_10M, x10, procs.pid("maas-batching")),
            "unbatched": Target(unbatched, MODEL_10M, x10, procs.pid("maas-unbatched")),
        }
        warm_up(big_targets, requests=20)
        big_cpu = CpuMeter(big_targets)
        big_rps = throughput_rps(big_targets, 64, rounds, 2 * seconds, big_cpu)
        big = {
            "params": zoo.count_parameters(modules[MODEL_10M]),
            "in_process_forward_p50_us": forward_us(modules[MODEL_10M], x10, runs=200),
            "in_process_forward_64_rows_p50_us": forward_us(
                modules[MODEL_10M], np.repeat(x10, 64, axis=0), runs=50
            ),
            "maas_batching_c64_rps": big_rps["batching"],
            "maas_unbatched_c64_rps": big_rps["unbatched"],
            "batching_vs_unbatched": round(big_rps["batching"] / big_rps["unbatched"], 2),
            **cpu_ceiling(big_cpu, big_targets),
        }
        read_back = {name: settings_read_back(targets[name].addr, MODEL) for name in OURS}
    result: dict[str, Any] = {
        "bench": "serve",
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "client": "tritonclient.grpc (sync: latency; aio: throughput) in this process, "
        f"targets interleaved over {rounds} rounds",
        "server_settings": {
            name: {**read_back[name], "inline_forward_us (as set)": int(INLINE_FORWARD_US)}
            for name in OURS
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
    args = parser.parse_args(argv)
    print(json.dumps(run(args.seconds, args.rounds, not args.no_kserve), indent=2))


if __name__ == "__main__":
    main()
