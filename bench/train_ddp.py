"""The peer of bench.train: torch DistributedDataParallel (gloo) on the same job, one process
per rank, with DDP's own communication hooks (fp16, PowerSGD, post-local-SGD).

``run_ddp`` starts the ranks as ``python -m bench.train_ddp`` and gathers what rank 0 measured:
samples/s from the end of step 1, time to the target accuracy (rank 0 evaluates every
``EVAL_EVERY`` steps, its evaluation time subtracted), each rank's CPU seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procstats import cpu_seconds, peak_rss_mb
from bench.train_workload import (
    EVAL_EVERY,
    LOCAL_SGD_WARMUP,
    MODEL,
    TARGET_ACCURACY,
    optimizer,
)
from infra.proc import free_port
from maas import zoo
from maas.datasets import load_builtin

# --- DDP --------------------------------------------------------------------------------------


HOOKS = ("none", "fp16", "powersgd", "post_local_sgd")


def _comm_hook(ddp: Any, hook: str) -> None:
    """The peers: DDP's own fp16, PowerSGD and post-local-SGD communication hooks."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import (
        default_hooks,
        post_localSGD_hook,
        powerSGD_hook,
    )

    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=10
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook == "post_local_sgd":
        # On CPU the subgroup must be given (see /work/shared/PEERS.md).
        subgroup, _ = dist.new_subgroups(group_size=1)
        local = post_localSGD_hook.PostLocalSGDState(
            process_group=None, subgroup=subgroup, start_localSGD_iter=LOCAL_SGD_WARMUP
        )
        ddp.register_comm_hook(local, post_localSGD_hook.post_localSGD_hook)


def _optimizer(params: Any, hook: str, sync_every: int) -> Any:
    import torch

    spec = optimizer()
    opt = torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"])
    if hook != "post_local_sgd":
        return opt
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    averager = PeriodicModelAverager(period=sync_every, warmup_steps=LOCAL_SGD_WARMUP)
    return PostLocalSGDOptimizer(optim=opt, averager=averager)


def ddp_rank(
    rank: int,
    world: int,
    port: int,
    steps: int,
    batch: int,
    out: Path,
    hook: str = "none",
    sync_every: int = 1,
) -> None:
    """One DDP process (``python -m bench.train_ddp``, started by ``run_ddp``)."""
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
    # PowerSGD chains several collectives per bucket from completion callbacks; with more than
    # one bucket gloo can see them in a different order on each rank ("collective mismatch").
    # One bucket (an explicit cap also sizes the first bucket) keeps the order fixed.
    ddp = DistributedDataParallel(model, bucket_cap_mb=64 if hook == "powersgd" else None)
    _comm_hook(ddp, hook)
    opt = _optimizer(ddp.parameters(), hook, sync_every)
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


def run_ddp(
    world: int, steps: int, batch: int, workdir: Path, hook: str = "none", sync_every: int = 1
) -> dict[str, Any]:
    port = free_port()
    outs = [workdir / f"ddp-{world}-{r}.json" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def argv(rank: int) -> list[str]:
        flags: dict[str, object] = {"rank": rank, "world": world, "port": port}
        flags.update({"steps": steps, "batch": batch})
        flags.update({"out": outs[rank], "hook": hook, "sync-every": sync_every})
        return [sys.executable, "-m", "bench.train_ddp"] + [
            part for name, value in flags.items() for part in (f"--{name}", str(value))
        ]

    procs = [subprocess.Popen(argv(r), env=env) for r in range(world)]
    cpu: dict[str, float] = {}
    # Read every rank before it is reaped: a reaped child's /proc entry is gone.
    while any(p.poll() is None for p in procs):
        for r, p in enumerate(procs):
            cpu[f"rank-{r}"] = cpu_seconds(p.pid) or cpu.get(f"rank-{r}", 0.0)
        time.sleep(0.05)
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"DDP ranks exited with {[p.returncode for p in procs]}")
    ranks = [json.loads(o.read_text()) for o in outs]
    return {
        "workers": world,
        "hook": hook,
        **{k: v for k, v in ranks[0].items() if k not in ("rank",)},
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one rank of bench.train's DDP peer")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's rendezvous port")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="per rank")
    parser.add_argument("--out", type=Path, required=True, help="where the rank writes its JSON")
    parser.add_argument("--hook", default="none", choices=HOOKS)
    parser.add_argument("--sync-every", type=int, default=1, help="post-local-SGD period H")
    args = parser.parse_args(argv)
    ddp_rank(
        args.rank,
        args.world,
        args.port,
        args.steps,
        args.batch,
        args.out,
        args.hook,
        args.sync_every,
    )


if __name__ == "__main__":
    main()
