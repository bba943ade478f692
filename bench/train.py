"""Distributed training: our parameter server (gRPC data plane) beside torch DDP (gloo).

One run prints one JSON document. Same model (an MLP of ~1M parameters on digits), per-process
batch, optimizer and step count for all; every round runs each of ours right before its peer:

  - ours codec ``none`` (2 workers x 2 shards) / DDP 2 processes; ours with the fp16 parameter
    broadcast (``training.broadcast: float16``, codec none), reported apart;
  - ours ``fp16`` / DDP with ``fp16_compress_hook``; ours top-k / DDP with PowerSGD;
  - ours with 1 worker / DDP with 1 process (one process alone); ours with 4 workers / DDP 4.

``summary`` gives the median and min-max over the rounds; every run records its per-process CPU
seconds (training processes, Kafka broker, S3 server), the load average and the CPU count, and
ours their sum from the first progress point to the final status over the cores' capacity in
that time (``cpu_busy_fraction``: near 1, training was CPU-bound on this machine); ``targets``
the issue's ratios. ``aggregator``: a shard's sum of two gradients + SGD apply beside numpy
``a += b``. ``rss``: every process's peak RSS.

How ours is timed: the progress statuses of partition 0's shard (every 200 ms) give (time,
version) points; samples/s counts the workers' own step counters over the window from the first
point to the final checkpoint. Time-to-95%: the first version (every 5, like DDP's evaluation)
at which the job's in-process reference (``maas.training.local.simulate``, the same worker loop
and shard cores, run before the rounds) reaches 95% held-out accuracy, timed on the points by
linear interpolation. DDP: from the end of step 1, rank 0 evaluating every 5 steps with its
evaluation time subtracted.

    python -m bench.train [--steps 300] [--batch 128] [--topk 0.004] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.procstats import cpu_seconds, peak_rss_mb
from bench.train_ddp import run_ddp
from bench.train_report import aggregator_bandwidth, targets
from bench.train_workload import EVAL_EVERY, MODEL, SHARDS, TARGET_ACCURACY, optimizer
from infra.ephemeral import bench_settings
from infra.harness.serving import ServiceProcesses
from infra.harness.training import TrainingProcesses
from maas import events, topics, zoo
from maas.config import Settings
from maas.training.storage import TrainingStore

# --- ours -------------------------------------------------------------------------------------


def train_event(job_id: str, config: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    return events.new_event(
        events.JOB,
        job_id=job_id,
        type="train",
        model={"name": job_id.rsplit("-", 1)[0], "arch": "mlp", "config": config},
        dataset={"uri": "builtin:digits"},
        training=training,
    )


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def stack_pids(workdir: Path, processes: TrainingProcesses) -> dict[str, int]:
    """Every process of the run: the training services, and the broker and S3 server."""
    pids = {s.name: int(s.process.pid() or 0) for s in processes.everything if s.process.alive()}
    for pid_file in (workdir / "stack").rglob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids[pid_file.stem] = int(pid_file.read_text().split()[0])
    return pids


def steps_to_target(plan_job: dict[str, Any]) -> int | None:
    """The first evaluated version of the job's in-process reference that reaches 95%
    (every 5 versions like DDP's evaluation; every round for local SGD)."""
    from maas.training.local import simulate
    from maas.training.prepare import Limits, prepare_job
    from maas.training.replica import evaluate

    prepared = prepare_job(plan_job, limits=Limits(10_000))
    plan, data = prepared.plan, prepared.dataset
    model = zoo.build(plan.arch, plan.config)
    reached: list[int] = []
    every = 1 if plan.training.mode == "local_sgd" else EVAL_EVERY  # a version is H steps there

    def check(version: int, flat: np.ndarray) -> None:
        if reached or version % every:
            return
        import torch

        state = {n: torch.from_numpy(t.copy()) for n, t in plan.layout.unflatten(flat).items()}
        model.load_state_dict(state, strict=False)
        if evaluate(model, data.x_test, data.y_test, plan.loss)["accuracy"] >= TARGET_ACCURACY:
            reached.append(version)

    simulate(plan, prepared.state, data, on_version=check)
    return reached[0] if reached else None


async def follow(
    settings: Settings, job: dict[str, Any], on_first_point: Callable[[], None] = lambda: None
) -> tuple[list[tuple[int, int]], dict]:
    """Submit ``job``; partition 0's (ts, step) progress points and the final status.
    ``on_first_point`` runs when the first progress point arrives (training has started)."""
    from maas.bus import EventProducer
    from maas.bus_reader import PartitionReader

    reader = PartitionReader(
        settings, topics.JOB_STATUS, range(topics.JOB_STATUS.partitions), client_id="bench"
    )
    await reader.start()
    points: list[tuple[int, int]] = []
    try:
        await reader.from_now()
        async with EventProducer(settings, client_id="bench-train") as producer:
            await producer.send(topics.JOBS, job, key=job["job_id"])
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            for record in await reader.next_records([events.JOB_STATUS], timeout_ms=500):
                event = record.event
                if event["job_id"] != job["job_id"]:
                    continue
                # Progress reports (partition 0's shard, whichever pool member that is).
                progress = event.get("service") != "training-coordinator" and "metrics" in event
                if progress and event.get("step"):
                    points.append((int(event["ts"]), int(event["step"])))
                    if len(points) == 1:
                        on_first_point()
                if event["state"] in ("succeeded", "failed"):
                    if event["state"] == "failed":
                        raise RuntimeError(f"job {job['job_id']} failed: {event.get('error')}")
                    return points, event
    finally:
        await reader.stop()
    raise RuntimeError(f"job {job['job_id']} never finished")


def time_at(points: list[tuple[int, int]], step: int) -> float | None:
    """Seconds from the first progress point to ``step`` (linear between points)."""
    for (t0, s0), (t1, s1) in itertools.pairwise(points):
        if s0 <= step <= s1 and s1 > s0:
            return (t0 + (t1 - t0) * (step - s0) / (s1 - s0) - points[0][0]) / 1000
    return None


async def run_ours(
    settings: Settings,
    processes: TrainingProcesses,
    workdir: Path,
    training: dict[str, Any],
    *,
    config: dict[str, Any],
    steps_to_95: int | None = None,
) -> dict[str, Any]:
    workers, codec = training["workers"], training["gradient_codec"]
    steps, batch = training["steps"], training["batch_size"]
    job_id = f"bench-w{workers}-{uuid.uuid4().hex[:8]}"
    ports = [w.port for w in processes.workers]  # the pool picks which: idle ones count 0
    pids = stack_pids(workdir, processes)
    cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}
    before = [scrape(p) for p in ports]
    training_cpu: dict[str, float | None] = {}
    started: list[float] = []

    def training_started() -> None:
        started.append(time.monotonic())
        training_cpu.update({n: cpu_seconds(p) for n, p in pids.items()})

    points, final = await follow(settings, train_event(job_id, config, training), training_started)
    steady_s = time.monotonic() - started[0]
    busy = sum((cpu_seconds(p) or 0) - (training_cpu.get(n) or 0) for n, p in pids.items())
    after = [scrape(p) for p in ports]
    cpu = {
        n: round((cpu_seconds(p) or 0) - (cpu_before[n] or 0), 2)
        for n, p in pids.items()
        if cpu_before.get(n) is not None
    }

    def delta(metric: str) -> list[float]:
        return [a[metric] - b[metric] for a, b in zip(after, before, strict=True)]

    computed = delta("maas_worker_steps_total")
    compute_s = delta("maas_worker_compute_seconds_sum")
    from maas.store_async import AsyncObjectStore

    async with AsyncObjectStore(settings) as objects:
        pointer = await TrainingStore(objects).pointer(job_id, 0)
    assert pointer is not None
    first_ms, first_step = points[0]
    seconds = (pointer.written_ms - first_ms) / 1000
    # Samples from the workers' own step counters, over the window the progress points span.
    samples = sum(computed) * batch * (pointer.version - first_step) / max(1, pointer.version)
    # Where a step's time goes: the busiest worker's forward+backward+encode per step; the rest
    # of the step is the data plane (push, the shard's reduce and optimizer, the broadcast back).
    busiest = max(range(len(computed)), key=lambda i: computed[i])
    compute_ms = 1000 * compute_s[busiest] / max(1.0, computed[busiest])
    step_ms = (pointer.written_ms - first_ms) / max(1, pointer.version - first_step)
    return {
        "workers": workers,
        "codec": codec,
        "mode": training.get("mode", "sync"),
        "samples_per_s": round(samples / seconds, 1),
        "worker_steps": computed,
        "steps_closed_without_a_worker": int(max(0, steps * workers - sum(computed))),
        "time_to_95_s": time_at(points, steps_to_95) if steps_to_95 else None,
        "final_accuracy": round(final["metrics"]["accuracy"], 4),
        "gradient_bytes_per_step": round(sum(delta("maas_worker_gradient_bytes_total")) / steps),
        "step_ms": round(step_ms, 2),
        "worker_compute_ms_per_step": round(compute_ms, 2),
        "data_plane_ms_per_step": round(step_ms - compute_ms, 2),
        "cpu_s": cpu,
        # Every process's CPU from the first progress point to the final status against what
        # the machine's cores could give in that time: near 1.0, training is CPU-bound here.
        "cpu_busy_fraction": round(busy / ((os.cpu_count() or 1) * steady_s), 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


# --- the run ----------------------------------------------------------------------------------


# Each of ours beside its matching peer, run back to back in every round. A peer of None: ours
# only (the fp16 parameter broadcast is a setting of its own; DDP has nothing to broadcast).
PAIRS: tuple[tuple[str, int, str | None, int], ...] = (
    # (our variant, our workers, DDP hook, DDP processes)
    ("none", 2, "none", 2),
    ("broadcast16", 2, None, 2),
    ("fp16", 2, "fp16", 2),
    ("topk", 2, "powersgd", 2),
    ("none", 1, "none", 1),
    ("none", 4, "none", 4),
    ("local_sgd", 2, "post_local_sgd", 2),
)


def summary(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(present), 2),
        "min": round(min(present), 2),
        "max": round(max(present), 2),
    }


async def bench(args: argparse.Namespace, settings: Settings, workdir: Path) -> dict[str, Any]:
    codec_of = {
        "none": "none",
        "broadcast16": "none",
        "fp16": "fp16",
        "topk": f"topk({args.topk})",
        "local_sgd": "none",
    }
    out: dict[str, Any] = {
        "model_params": zoo.count_parameters(zoo.build("mlp", MODEL)),
        "steps": args.steps,
        "batch_per_worker": args.batch,
        "optimizer": optimizer(),
        "shards": SHARDS,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "note": "figures are only comparable within one run on an otherwise idle machine",
    }
    pairs = [p for p in PAIRS if not args.only or f"{p[0]}-w{p[1]}" in args.only]
    reached = {
        c: steps_to_target(train_event("ref", MODEL, training_of(args, c, codec_of[c], 2)))
        for c in {p[0] for p in pairs}
    }
    out["steps_to_95"] = reached
    runs: dict[str, list[dict[str, Any]]] = {}
    with ServiceProcesses(workdir) as services:
        registry = services.start_registry()
        with TrainingProcesses(
            workdir, registry, workers=4, shards=SHARDS, MAAS_PROGRESS_INTERVAL_MS="200"
        ) as processes:
            processes.start(workers=4)
            for _ in range(args.rounds):
                for codec, workers, hook, world in pairs:
                    ours = await run_ours(
                        settings,
                        processes,
                        workdir,
                        training_of(args, codec, codec_of[codec], workers),
                        config=MODEL,
                        steps_to_95=reached[codec],
                    )
                    runs.setdefault(f"ours-{codec}-w{workers}", []).append(ours)
                    if hook is None:
                        continue
                    try:
                        peer = run_ddp(
                            world, args.steps, args.batch, workdir, hook, args.sync_every
                        )
                    except RuntimeError as exc:  # a peer that crashes is reported, not fatal
                        peer = {"workers": world, "hook": hook, "error": str(exc)}
                        peer.update(samples_per_s=None, time_to_95_s=None, final_accuracy=None)
                    runs.setdefault(f"ddp-{hook}-p{world}", []).append(peer)
            out["rss"] = {
                s.name: peak_rss_mb(int(s.process.pid() or 0))
                for s in processes.everything
                if s.process.alive()
            }
    out["runs"] = runs
    out["summary"] = {
        name: {
            "samples_per_s": summary([r["samples_per_s"] for r in rs]),
            "time_to_95_s": summary([r["time_to_95_s"] for r in rs]),
            "final_accuracy": summary([r["final_accuracy"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    out["aggregator"] = aggregator_bandwidth(out["model_params"] // SHARDS)
    out["targets"] = targets(out["summary"]) if len(pairs) == len(PAIRS) else "run every pair"
    return out


def training_of(args: argparse.Namespace, variant: str, codec: str, workers: int) -> dict[str, Any]:
    training = {
        "steps": args.steps,
        "batch_size": args.batch,
        "workers": workers,
        "shards": SHARDS,
        "optimizer": optimizer(),
        "gradient_codec": codec,
        "checkpoint_every": 100,
    }
    if variant == "local_sgd":
        training.update(mode="local_sgd", sync_every=args.sync_every)
    if variant == "broadcast16":
        training["broadcast"] = "float16"
    return training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128, help="per worker process")
    parser.add_argument("--topk", type=float, default=0.004, help="top-k ratio")
    parser.add_argument("--rounds", type=int, default=5, help="ours/peer alternations")
    parser.add_argument("--sync-every", type=int, default=8, help="local SGD period H")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[f"{p[0]}-w{p[1]}" for p in PAIRS],
        help="run these pairs only (e.g. to profile one); the targets need them all",
    )
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="maas-bench-train-") as tmp,
        bench_settings(Path(tmp)) as settings,
    ):
        result = asyncio.run(bench(args, settings, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
