"""Distributed training: our parameter server over Kafka beside torch.distributed DDP (gloo).

One run prints one JSON document. Same model (an MLP of ~1M parameters on digits), per-process
batch, optimizer, step count and worker-process count for both:

  - ``codecs``: ours with W=2 workers x 2 shards for each gradient codec — samples/s,
    time-to-95% held-out accuracy, final accuracy, gradient bytes per step.
  - ``ddp``: DDP gloo on 127.0.0.1 with 1, 2, 4 processes — the peer.
  - ``scaling``: ours with 1, 2, 4 workers (codec ``none``).
  - ``aggregator``: a shard's sum of two gradients + SGD apply beside numpy ``a += b``, as bytes
    of gradient consumed per second on a 10M-job partition.
  - ``large_job``: a 10M-parameter job; each shard's peak RSS against 4x its partition + 400 MB.
  - ``rss``: every process's peak RSS (kernel high-water mark, VmHWM).
  - ``targets``: the issue's ratios, met or not.

How ours is timed: from the broker timestamps of the parameter versions the shards published —
samples/s over versions 1..final (startup excluded), time-to-95% from version 1 to the first
version whose assembled parameters reach 95% (read back from ``maas.params.v1`` after the job,
so measuring costs the run nothing). DDP is timed the same way: from the end of step 1, rank 0
evaluating every few steps with its evaluation time subtracted.

    python -m bench.train [--steps 300] [--batch 128] [--topk 0.004]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from infra.ephemeral import bench_settings
from infra.proc import free_port
from maas import events, topics, zoo
from maas.config import Settings
from maas.datasets import load_builtin
from maas.jobs import watch
from maas.training import protocol
from maas.training.aggregate import GradientSum
from maas.training.codecs import DenseGradient
from maas.training.optim import OptimizerSpec, Sgd
from maas.training.plan import JobPlan
from maas.training.storage import TrainingStore
from maas.training.transport import PartitionReader
from services.aggregator.harness import TrainingProcesses
from services.inference.harness import ServiceProcesses

MB = 1024 * 1024
MODEL = {"hidden": [1024, 896]}  # 993,930 parameters on 64 digit features
LARGE_MODEL = {"hidden": [3072, 3072]}  # 9.67 M parameters
TARGET_ACCURACY = 0.95
EVAL_EVERY = 5
SHARDS = 2


def optimizer() -> dict[str, Any]:
    return {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def peak_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


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


async def submit_and_wait(settings: Settings, job: dict[str, Any]) -> dict[str, Any]:
    from maas.bus import EventProducer

    async with EventProducer(settings, client_id="bench-train") as producer:
        await producer.send(topics.JOBS, job, key=job["job_id"])
    async for summary in watch(settings, job["job_id"], timeout_s=1800):
        if summary.done:
            if summary.state != "succeeded":
                raise RuntimeError(f"job {job['job_id']} {summary.state}: {summary.error}")
            return {"metrics": summary.metrics, "model": summary.model}
    raise RuntimeError(f"job {job['job_id']} never finished")


async def version_timeline(
    settings: Settings, plan: JobPlan, since_ms: int, evaluate_until: float | None
) -> dict[str, Any]:
    """Replay the job's parameter versions from the log: timestamps, and accuracy until it
    first reaches ``evaluate_until``."""
    import torch

    from maas.training.replica import evaluate

    data = load_builtin("digits")
    model = zoo.build(plan.arch, plan.config)
    flat = np.empty(plan.layout.size, dtype=np.float32)
    reader = PartitionReader(settings, topics.PARAMS, range(plan.shards), client_id="bench")
    await reader.start()
    try:
        for shard in range(plan.shards):
            offset = await reader.offset_at(shard, since_ms)
            if offset is not None:
                reader.seek(shard, offset)
        seen: dict[int, dict[int, int]] = {}  # version -> shard -> ts
        parts: dict[int, dict[int, np.ndarray]] = {}
        reached: int | None = None
        finals = 0
        while finals < plan.shards:
            for raw in await reader.next_batch(timeout_ms=1000):
                event = events.decode(raw.value)
                if event.get("job_id") != plan.job_id:
                    continue
                version, shard = int(event["version"]), int(event["shard"])
                if shard in seen.setdefault(version, {}):
                    continue  # a republished version
                seen[version][shard] = int(event["ts"])
                finals += bool(event.get("final"))
                if evaluate_until is None or reached is not None:
                    continue
                size = plan.partitions[shard].size
                values = protocol.params_values(event["payload"], size)
                parts.setdefault(version, {})[shard] = values
                if len(parts[version]) == plan.shards:
                    for s, v in parts.pop(version).items():
                        plan.partitions[s].scatter(v, flat)
                    state = {
                        n: torch.from_numpy(t.copy())
                        for n, t in plan.layout.unflatten(flat).items()
                    }
                    model.load_state_dict(state)
                    if evaluate(model, data.x_test, data.y_test, plan.loss)["accuracy"] >= (
                        evaluate_until
                    ):
                        reached = version
    finally:
        await reader.stop()
    stamp = {v: max(ts.values()) for v, ts in seen.items() if len(ts) == plan.shards}
    final = max(stamp)
    return {
        "first_ms": stamp[1],
        "final_ms": stamp[final],
        "final_version": final,
        "reached_version": reached,
        "reached_ms": stamp[reached] if reached is not None else None,
    }


async def run_ours(
    settings: Settings,
    processes: TrainingProcesses,
    *,
    workers: int,
    codec: str,
    steps: int,
    batch: int,
    config: dict[str, Any],
    measure_accuracy: bool = True,
) -> dict[str, Any]:
    job_id = f"bench-{codec.replace('(', '').replace(')', '')}-w{workers}-{uuid.uuid4().hex[:6]}"
    training = {
        "steps": steps,
        "batch_size": batch,
        "workers": workers,
        "shards": SHARDS,
        "optimizer": optimizer(),
        "gradient_codec": codec,
        "checkpoint_every": 100,
    }
    ports = [w.port for w in processes.workers[:workers]]
    before = [scrape(p) for p in ports]
    started_ms = int(time.time() * 1000)
    result = await submit_and_wait(settings, train_event(job_id, config, training))
    after = [scrape(p) for p in ports]
    sent = sum(
        a["maas_worker_gradient_bytes_total"] - b["maas_worker_gradient_bytes_total"]
        for a, b in zip(after, before, strict=True)
    )
    computed = sum(
        a["maas_worker_steps_total"] - b["maas_worker_steps_total"]
        for a, b in zip(after, before, strict=True)
    )
    from maas.store import AsyncObjectStore

    async with AsyncObjectStore(settings) as objects:
        plan = await TrainingStore(objects).read_plan(job_id)
    timeline = await version_timeline(
        settings, plan, started_ms, TARGET_ACCURACY if measure_accuracy else None
    )
    seconds = (timeline["final_ms"] - timeline["first_ms"]) / 1000
    samples = (timeline["final_version"] - 1) * workers * batch
    reached = timeline["reached_ms"]
    return {
        "workers": workers,
        "codec": codec,
        "samples_per_s": round(samples / seconds, 1),
        "time_to_95_s": round((reached - timeline["first_ms"]) / 1000, 2) if reached else None,
        "steps_to_95": timeline["reached_version"],
        "final_accuracy": round(result["metrics"]["accuracy"], 4),
        "gradient_bytes_per_step": round(sent / max(1, computed) * workers),
    }


# --- DDP --------------------------------------------------------------------------------------


def ddp_rank(rank: int, world: int, port: int, steps: int, batch: int, out: Path) -> None:
    """One DDP process (run as ``python -m bench.train --ddp-rank ...``)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from maas.training.replica import evaluate
    from maas.training.sampler import batch_indices

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = zoo.build("mlp", MODEL, seed=0)
    ddp = DistributedDataParallel(model)
    spec = optimizer()
    opt = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    data = load_builtin("digits")
    x, y = data.shard(rank, world)
    first = eval_s = 0.0
    reached: tuple[int, float] | None = None
    for step in range(steps):
        rows = batch_indices(len(x), batch, step, seed=0, worker=rank)
        loss = F.cross_entropy(ddp(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = time.perf_counter()
        if rank == 0 and reached is None and (step + 1) % EVAL_EVERY == 0:
            t = time.perf_counter()
            accuracy = evaluate(model, data.x_test, data.y_test, "cross_entropy")["accuracy"]
            eval_s += time.perf_counter() - t
            if accuracy >= TARGET_ACCURACY:
                reached = (step + 1, time.perf_counter() - first - eval_s)
    dist.barrier()
    seconds = time.perf_counter() - first - eval_s
    result: dict[str, Any] = {"rank": rank, "peak_rss_mb": peak_rss_mb(os.getpid())}
    if rank == 0:
        result.update(
            samples_per_s=round((steps - 1) * world * batch / seconds, 1),
            time_to_95_s=round(reached[1], 2) if reached else None,
            steps_to_95=reached[0] if reached else None,
            final_accuracy=round(
                evaluate(model, data.x_test, data.y_test, "cross_entropy")["accuracy"], 4
            ),
            gradient_bytes_per_step=sum(p.numel() for p in model.parameters()) * 4 * world,
        )
    out.write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ddp(world: int, steps: int, batch: int, workdir: Path) -> dict[str, Any]:
    port = free_port()
    outs = [workdir / f"ddp-{world}-{r}.json" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.train",
                "--ddp-rank",
                str(r),
                "--ddp-world",
                str(world),
                "--ddp-port",
                str(port),
                "--steps",
                str(steps),
                "--batch",
                str(batch),
                "--ddp-out",
                str(outs[r]),
            ],
            env=env,
        )
        for r in range(world)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"DDP rank exited with {p.returncode}")
    ranks = [json.loads(o.read_text()) for o in outs]
    return {
        "workers": world,
        **{k: v for k, v in ranks[0].items() if k not in ("rank",)},
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
    }


# --- aggregator bandwidth ---------------------------------------------------------------------


def aggregator_bandwidth(size: int, repeats: int = 20) -> dict[str, Any]:
    """Bytes of gradient consumed per second: a shard's sum of two + SGD apply vs a += b."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=size).astype(np.float32) for _ in range(2))
    grads = [
        np.frombuffer(rng.normal(size=size).astype(np.float32).tobytes(), dtype=np.float32)
        for _ in range(2)
    ]  # read-only, as they arrive in messages
    theta = rng.normal(size=size).astype(np.float32)
    total = GradientSum(size)
    sgd = Sgd(OptimizerSpec("sgd", lr=0.01), size)

    def ours() -> None:
        for g in grads:
            total.add(DenseGradient(g))
        sgd.step(theta, total, 0.5)
        total.reset()

    def numpy_add() -> None:
        np.add(a, b, out=a)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_ours, t_add = best(ours), best(numpy_add)
    ours_gbps = 2 * size * 4 / t_ours / 1e9
    add_gbps = size * 4 / t_add / 1e9
    return {
        "partition_params": size,
        "sum2_apply_gb_per_s": round(ours_gbps, 2),
        "numpy_add_gb_per_s": round(add_gbps, 2),
        "ratio": round(ours_gbps / add_gbps, 3),
    }


# --- the run ----------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, settings: Settings, workdir: Path) -> dict[str, Any]:
    codecs = ["none", "fp16", "int8", f"topk({args.topk})"]
    out: dict[str, Any] = {
        "model_params": zoo.count_parameters(zoo.build("mlp", MODEL)),
        "steps": args.steps,
        "batch_per_worker": args.batch,
        "optimizer": optimizer(),
        "shards": SHARDS,
    }
    with ServiceProcesses(workdir) as services:
        registry = services.start_registry()
        with TrainingProcesses(workdir, registry, workers=4, shards=SHARDS) as processes:
            processes.start(workers=2)
            common = {"steps": args.steps, "batch": args.batch, "config": MODEL}
            out["codecs"] = [
                await run_ours(settings, processes, workers=2, codec=c, **common) for c in codecs
            ]
            scaling = {2: out["codecs"][0]}
            for workers in (1, 4):
                processes.use_workers(workers)
                scaling[workers] = await run_ours(
                    settings, processes, workers=workers, codec="none", **common
                )
            out["scaling"] = [scaling[w] for w in (1, 2, 4)]
            processes.use_workers(2)
            await run_ours(
                settings,
                processes,
                workers=2,
                codec="none",
                steps=args.large_steps,
                batch=64,
                config=LARGE_MODEL,
                measure_accuracy=False,
            )
            large = zoo.count_parameters(zoo.build("mlp", LARGE_MODEL))
            partition_mb = large / SHARDS * 4 / MB
            budget_mb = 4 * partition_mb + 400
            shard_rss = [peak_rss_mb(int(s.process.pid() or 0)) for s in processes.shards]
            out["large_job"] = {
                "params": large,
                "partition_mb": round(partition_mb, 1),
                "shard_budget_mb": round(budget_mb, 1),
                "shard_peak_rss_mb": shard_rss,
            }
            out["rss"] = {
                s.name: peak_rss_mb(int(s.process.pid() or 0))
                for s in processes.everything
                if s.process.alive()
            }
    out["ddp"] = [run_ddp(w, args.steps, args.batch, workdir) for w in (1, 2, 4)]
    out["aggregator"] = aggregator_bandwidth(large // SHARDS)
    out["targets"] = targets(out)
    return out


def targets(out: dict[str, Any]) -> dict[str, Any]:
    ddp2 = next(d for d in out["ddp"] if d["workers"] == 2)["samples_per_s"]
    by_codec = {c["codec"]: c for c in out["codecs"]}
    none = by_codec["none"]
    topk = next(c for c in out["codecs"] if c["codec"].startswith("topk"))
    best_compressed = max(c["samples_per_s"] for c in out["codecs"] if c["codec"] != "none")
    large = out["large_job"]
    return {
        "compressed_vs_ddp": {"value": round(best_compressed / ddp2, 3), "target": 1.0},
        "uncompressed_vs_ddp": {"value": round(none["samples_per_s"] / ddp2, 3), "target": 0.5},
        "topk_bytes_reduction": {
            "value": round(none["gradient_bytes_per_step"] / topk["gradient_bytes_per_step"], 1),
            "target": 100,
        },
        "topk_accuracy_gap_points": {
            "value": round(100 * (none["final_accuracy"] - topk["final_accuracy"]), 2),
            "target": "<= 0.5",
        },
        "aggregator_vs_numpy_add": {"value": out["aggregator"]["ratio"], "target": 0.5},
        "large_job_shard_rss_mb": {
            "value": max(r or math.inf for r in large["shard_peak_rss_mb"]),
            "target": f"<= {large['shard_budget_mb']}",
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128, help="per worker process")
    parser.add_argument("--topk", type=float, default=0.004, help="top-k ratio")
    parser.add_argument("--large-steps", type=int, default=10)
    parser.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_rank is not None:
        ddp_rank(args.ddp_rank, args.ddp_world, args.ddp_port, args.steps, args.batch, args.ddp_out)
        return
    with (
        tempfile.TemporaryDirectory(prefix="maas-bench-train-") as tmp,
        bench_settings(Path(tmp)) as settings,
    ):
        result = asyncio.run(bench(args, settings, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
