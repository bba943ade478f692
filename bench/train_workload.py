"""The job bench.train gives ours and torch DDP alike: model, optimizer, target, evaluation."""

from __future__ import annotations

from typing import Any

MODEL = {"hidden": [1024, 896]}  # 993,930 parameters on 64 digit features
TARGET_ACCURACY = 0.95
EVAL_EVERY = 5  # steps (versions) between the evaluations that time the target
SHARDS = 2
LOCAL_SGD_WARMUP = 1  # torch's post-local-SGD needs at least one globally synced step


def optimizer() -> dict[str, Any]:
    return {"name": "sgd", "lr": 0.05, "momentum": 0.9}
