"""A ``compress`` job as the compressor reads it, and the statuses it sends about one.

``parse_job`` turns a checked ``maas.job/1`` event into a ``CompressJob`` (InvalidArgument naming
the field otherwise); ``plan_job`` builds the job a promotion policy's plan stands for. Plain
Python: no Kafka, no registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maas import events, jobs
from maas.compression.pipeline import Plan, parse_methods
from maas.compression.train import FitConfig
from maas.errors import AlreadyExists, InvalidArgument
from maas.registry.types import ModelRef, ModelVersion

SERVICE = "compressor"
JOB_TYPE = "compress"
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class CompressJob:
    job_id: str
    base: ModelRef
    plans: tuple[Plan, ...]
    dataset: dict[str, Any] | None  # None: use the dataset of the parent's lineage
    fit: FitConfig  # batch size, lr and seed for recovery fine-tuning and distillation
    register_name: str | None  # None: register under the parent's name
    alias: str | None
    fingerprint: str = ""  # jobs.content_sha256: tells a redelivery from another job's reuse


def _base_ref(base: Mapping[str, Any] | None) -> ModelRef:
    if not base or "name" not in base:
        raise InvalidArgument("base is required for a compress job: {name, version | alias}")
    if "version" in base and "alias" in base:
        raise InvalidArgument("base: give version or alias, not both")
    selector = base.get("version", base.get("alias"))
    return ModelRef.parse(f"{base['name']}@{selector}" if selector is not None else base["name"])


def parse_job(event: Mapping[str, Any]) -> CompressJob:
    """A validated ``maas.job/1`` event of type compress -> a checked job, or InvalidArgument."""
    compress = event.get("compress")
    if not compress:
        raise InvalidArgument("compress is required: {methods: [{quantize: {dtype: int8}}, ...]}")
    plans = tuple(parse_methods(compress.get("methods") or []))
    training = event.get("training") or {}
    fit = FitConfig(
        steps=0,  # each method says how long it trains
        batch_size=int(training.get("batch_size", DEFAULT_BATCH_SIZE)),
        lr=float((training.get("optimizer") or {}).get("lr", DEFAULT_LR)),
        seed=int(training.get("seed", 0)),
    )
    register_as = event.get("register_as") or {}
    alias = register_as.get("alias")
    if alias is not None and len(plans) != 1:
        raise InvalidArgument(
            f"register_as.alias needs exactly one method (it names one version); got {len(plans)}"
        )
    return CompressJob(
        job_id=str(event["job_id"]),
        base=_base_ref(event.get("base")),
        plans=plans,
        dataset=dict(event["dataset"]) if event.get("dataset") else None,
        fit=fit,
        register_name=register_as.get("name"),
        fingerprint=jobs.content_sha256(event),
        alias=alias,
    )


def status(job_id: str, state: str, **fields: Any) -> dict[str, Any]:
    return events.new_event(
        events.JOB_STATUS, job_id=job_id, state=state, service=SERVICE, **fields
    )


def check_same_job(job: CompressJob, fingerprint: str) -> None:
    if fingerprint != job.fingerprint:
        raise AlreadyExists(
            f"job_id={job.job_id!r} belongs to another compress job, run earlier with other "
            "content; send this one under a new job_id"
        )


def plan_job(job_id: str, base: ModelRef, methods: Sequence[Mapping[str, Any]]) -> CompressJob:
    """The compress job a policy's plan stands for: the job defaults, the parent's dataset."""
    fit = FitConfig(steps=0, batch_size=DEFAULT_BATCH_SIZE, lr=DEFAULT_LR, seed=0)
    plans = tuple(parse_methods(methods))
    return CompressJob(job_id, base, plans, None, fit, None, None)


def progress_status(
    job_id: str, state: str, step: int, total: int, versions: Sequence[ModelVersion]
) -> dict[str, Any]:
    """Progress naming the latest variant as ``model`` and every one so far as ``models``."""
    latest = versions[-1]
    return status(
        job_id,
        state,
        step=step,
        total_steps=total,
        model={"name": latest.name, "version": latest.version},
        models=[
            {"name": v.name, "version": v.version, "method": v.method or "", "format": v.format}
            for v in versions
        ],
        metrics=status_metrics(latest.metrics),
    )


def status_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("loss", "accuracy") if k in metrics}


def failed_status(job_id: str, code: str, message: str) -> dict[str, Any]:
    return status(job_id, "failed", error={"code": code, "message": message})
