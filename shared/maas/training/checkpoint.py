"""Checkpoints in ``maas-checkpoints``: what a shard writes and how a restart finds it.

Layout (all under ``jobs/<job_id>/``)::

    plan.json                      the JobPlan (written once when the job is accepted)
    init.safetensors               the full starting state (frozen tensors and buffers included)
    shards/<s>/v<version>.ckpt     msgpack: partition, optimizer state, version, dedup state
    shards/<s>/LATEST.json         pointer {version, key, sha256, final, ...}
    result.json                    the outcome (state, model, metrics or error)

and ``active/<job_id>`` marks a job that is not finished, for restarts to pick up;
``cluster/shards/<s>.json`` is where aggregator shard ``s`` serves the training data plane
(``{"address": "host:port"}``, written by the shard when it starts), for workers to dial.

A checkpoint is written data first, pointer last: S3 replaces an object atomically, so a crash
while writing the data leaves ``LATEST.json`` naming the previous, complete checkpoint, whose
sha256 the reader verifies. The coordinator writes version 0 of every shard the same way, so a
shard always starts from a pointer, fresh or restarted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

from maas.codec import map_to_tensor, tensor_to_map
from maas.errors import IntegrityError
from maas.training.aggregate import ShardSnapshot

FORMAT = "maas.shard-checkpoint/1"
ACTIVE_PREFIX = "active/"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


PLAN_FILE = "plan.json"
JOB_FILE = "job.json"  # what the plan was made from: a redelivery matches it, a reused id not
INIT_FILE = "init.safetensors"
ASSIGNMENT_FILE = "assignment.json"
RESULT_FILE = "result.json"


def job_key(job_id: str, name: str) -> str:
    """The key of one of a job's files (``PLAN_FILE``, ``INIT_FILE``, ...)."""
    return f"{job_prefix(job_id)}{name}"


def active_key(job_id: str) -> str:
    return f"{ACTIVE_PREFIX}{job_id}"


def shard_prefix(job_id: str, shard: int) -> str:
    return f"{job_prefix(job_id)}shards/{shard}/"


def pointer_key(job_id: str, shard: int) -> str:
    return f"{shard_prefix(job_id, shard)}LATEST.json"


def checkpoint_key(job_id: str, shard: int, version: int) -> str:
    return f"{shard_prefix(job_id, shard)}v{version:010d}.ckpt"


@dataclass(frozen=True)
class Pointer:
    """The small object that makes a checkpoint current."""

    version: int
    key: str
    sha256: str
    samples: int = 0
    started_ms: int = 0
    written_ms: int = 0
    final: bool = False
    epoch: int = 0  # of the assignment under which its shard wrote it (0: the coordinator's)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Pointer:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"checkpoint pointer is not valid: {exc}") from None


def encode_snapshot(snap: ShardSnapshot) -> bytes:
    """msgpack bytes of a snapshot (one copy of the arrays: safe to upload off the loop)."""
    return msgpack.packb(
        {
            "format": FORMAT,
            "version": snap.version,
            "theta": tensor_to_map(snap.theta),
            "optimizer_scalars": snap.optimizer_scalars,
            "optimizer_arrays": {k: tensor_to_map(v) for k, v in snap.optimizer_arrays.items()},
            "last_version": {str(k): v for k, v in snap.last_version.items()},
            "samples": snap.samples,
        },
        use_bin_type=True,
    )


def decode_snapshot(data: bytes) -> ShardSnapshot:
    try:
        obj: Mapping[str, Any] = msgpack.unpackb(data, raw=False)
        if obj.get("format") != FORMAT:
            raise ValueError(f"format {obj.get('format')!r}, expected {FORMAT}")
        return ShardSnapshot(
            version=int(obj["version"]),
            theta=np.array(map_to_tensor(obj["theta"]), copy=True),
            optimizer_scalars=dict(obj["optimizer_scalars"]),
            optimizer_arrays={k: map_to_tensor(v) for k, v in obj["optimizer_arrays"].items()},
            last_version={int(k): int(v) for k, v in obj["last_version"].items()},
            samples=int(obj["samples"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"shard checkpoint is not readable: {exc}") from None


def initial_snapshot(theta: np.ndarray) -> ShardSnapshot:
    return ShardSnapshot(0, theta, {}, {}, {}, 0)
