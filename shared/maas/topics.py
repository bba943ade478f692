"""The Kafka topics (v1), as docs/ARCHITECTURE.md ("The contract") lists them; the S3 buckets
are in ``maas.store``. Bootstrap creates exactly these (with these partition counts); nothing
relies on broker auto-create. Records with the same key land on the same partition, so per-key
order (one job, one model) holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    key: str  # what the record key holds, for docs and `maas stack status`
    payload: str = ""

    def __str__(self) -> str:
        return self.name


JOBS = Topic("maas.jobs.v1", 3, "job_id", "job event (maas.job/1)")
JOB_STATUS = Topic("maas.job-status.v1", 3, "job_id", "job status/progress (maas.job-status/1)")
MODELS = Topic("maas.models.v1", 3, "model name", "registry events")
DLQ = Topic("maas.dlq.v1", 1, "original key", "rejected records: reason + original bytes")
# One partition: the coordinator sees heartbeats and its own assignments in one order.
TRAINING_CONTROL = Topic(
    "maas.training-control.v1",
    1,
    "member_id or job_id",
    "training pool: heartbeats (maas.member/1), assignments (maas.assignment/1)",
)

# Stream inference: requests in, predictions out, each keyed by request id (transactional).
INFER = Topic("maas.infer.v1", 3, "request id", "inference requests (maas.infer/1)")
PREDICTIONS = Topic("maas.predictions.v1", 3, "request id", "predictions (maas.prediction/1)")

# Gradients and parameters are not here: they travel over the gRPC data plane (maas.training.v1).
ALL_TOPICS: tuple[Topic, ...] = (
    JOBS,
    JOB_STATUS,
    MODELS,
    DLQ,
    TRAINING_CONTROL,
    INFER,
    PREDICTIONS,
)


def by_name(name: str) -> Topic:
    for topic in ALL_TOPICS:
        if topic.name == name:
            return topic
    known = ", ".join(t.name for t in ALL_TOPICS)
    raise KeyError(f"unknown topic {name!r}; known topics: {known}")
