"""What a bench.train run is judged against: the issue's ratios of ours to DDP (``targets``) and
the machine's own limit for a shard's work (``aggregator_bandwidth``: summing two gradients and
applying SGD, in bytes of gradient a second, beside numpy's ``a += b``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from maas.training.aggregate import GradientSum
from maas.training.codecs import DenseGradient
from maas.training.optim import OptimizerSpec, Sgd


def targets(summ: dict[str, Any]) -> dict[str, Any]:
    def rate(name: str) -> float:
        return float(summ[name]["samples_per_s"]["median"] or 0.0)

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    ddp2, ddp1 = rate("ddp-none-p2"), rate("ddp-none-p1")
    ttt = summ["ours-none-w2"]["time_to_95_s"]["median"]
    ddp_ttt = summ["ddp-none-p2"]["time_to_95_s"]["median"]
    return {
        "none_vs_ddp": {"value": ratio(rate("ours-none-w2"), ddp2), "target": ">= 1.0"},
        "fp16_vs_ddp_fp16_hook": {
            "value": ratio(rate("ours-fp16-w2"), rate("ddp-fp16-p2")),
            "target": ">= 1.3",
        },
        "topk_vs_ddp_powersgd": {
            "value": ratio(rate("ours-topk-w2"), rate("ddp-powersgd-p2")),
            "target": ">= 1.3",
        },
        "time_to_95_vs_ddp": {
            "value": ratio(ttt, ddp_ttt) if ttt and ddp_ttt else None,
            "target": "<= 1.0",
        },
        "broadcast16_vs_ddp": {
            "value": ratio(rate("ours-broadcast16-w2"), ddp2),
            "target": "reported apart (a setting of its own)",
        },
        "two_vs_one_worker": {
            "value": ratio(rate("ours-none-w2"), rate("ours-none-w1")),
            "target": ">= 1.6",
        },
        "two_workers_vs_one_process": {
            "value": ratio(rate("ours-none-w2"), ddp1),
            "target": ">= 1.3",
        },
        "local_sgd_vs_post_local_sgd": {
            "value": ratio(rate("ours-local_sgd-w2"), rate("ddp-post_local_sgd-p2")),
            "target": ">= 0.9",
        },
        "local_sgd_accuracy_gap_points": {
            "value": round(
                100
                * (
                    (summ["ddp-post_local_sgd-p2"]["final_accuracy"]["median"] or 0)
                    - (summ["ours-local_sgd-w2"]["final_accuracy"]["median"] or 0)
                ),
                2,
            ),
            "target": "<= 0.5",
        },
    }


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
