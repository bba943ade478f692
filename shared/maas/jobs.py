"""Jobs as users write them: load a job file, complete its envelope, check it, publish it, and
follow its status events.

``check_job`` is the one place a job is judged before it runs: the JSON Schema first, then the
checks a schema cannot express (an arch the zoo has, a config it accepts, a dataset that exists,
the sections each job type needs). ``maas jobs submit`` calls it before publishing, and the
services call it on every job they consume, so a mistake is reported the same way both times.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas import datasets, events, topics, zoo
from maas.bus import EventProducer
from maas.bus_reader import PartitionReader
from maas.config import Settings
from maas.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    MaasError,
    SchemaViolation,
)
from maas.events import json_failure, printable, shown
from maas.names import check_version
from maas.policy import POLICY_JOB_PREFIX, is_plan_id
from maas.textfile import parse_yaml, read_text_file

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
JOB_STATES = TERMINAL_STATES | {"queued", "accepted", "running", "checkpointed"}  # job-status
CANCEL = "cancel"  # the job type that stops the train/finetune job of the same job_id
# A job held up by an outage (S3, the model registry) says so in its status, at most this often:
# an outage of minutes is one line per job per note, not one per retry.
WAITING_NOTE_MS = 30_000


def waiting_reason(error: MaasError) -> str:
    """The ``reason`` of a status saying what a job waits for."""
    return f"waiting: {error.message}; retrying"


_REQUIRED_SECTIONS = {
    "train": ("model", "dataset"),
    "finetune": ("base", "dataset"),
    "compress": ("base", "compress"),
}
# Sections a job type never reads: sent, they would be ignored (a train job's base, a compress
# job's model), so they are refused.
_FOREIGN_SECTIONS = {
    "train": ("base", "compress"),
    "finetune": ("compress",),
    "compress": ("model",),
}


def _check_compress_training(training: Mapping[str, Any]) -> None:
    """A compress job's recovery and distillation train with Adam at ``optimizer.lr``, in
    batches of ``batch_size``, from ``seed``: any other training field would be ignored (a job
    asking for SGD with a frozen body got Adam on every layer), so it is refused."""
    unread = sorted(set(training) - {"batch_size", "optimizer", "seed"})
    optimizer = training.get("optimizer", {})
    unread += [f"optimizer.{key}" for key in sorted(set(optimizer) - {"name", "lr"})]
    if optimizer.get("name", "adam") != "adam":
        unread.append(f"optimizer.name={optimizer['name']!r}")
    if unread:
        raise SchemaViolation(
            f"a compress job does not read training.{', training.'.join(unread)}; it reads "
            "training.batch_size, training.optimizer.lr and training.seed (its recovery and "
            "distillation train with adam)"
        )


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job from YAML or JSON; the error names the file and what is wrong."""
    path = Path(path)
    text = read_text_file(path, "job file")
    if path.suffix != ".json":
        doc = parse_yaml(text, path, "job")
    else:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(f"{path} is not valid json: {json_failure(exc)}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{path} must hold a mapping (a job), not {type(doc).__name__}")
    return doc


def prepare_job(doc: Mapping[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """A complete ``maas.job/1`` event from a user's job document (envelope filled in)."""
    job = dict(doc)
    job.setdefault("schema", events.JOB)
    job.setdefault("id", uuid.uuid4().hex)
    job.setdefault("ts", events.now_ms())
    if job_id:
        job["job_id"] = job_id
    if not job.get("job_id"):
        kind = re.sub(r"[^A-Za-z0-9-]", "", str(job.get("type", "job"))) or "job"
        job["job_id"] = f"{kind}-{uuid.uuid4().hex[:10]}"
    return job


def check_job(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Every check a job gets before it runs, the same in the CLI and in every service.

    The schema rejects unknown keys at every level (naming the path and the nearest known key);
    then the model zoo judges each {arch, config} and its size (counted, never allocated) against
    MAAS_MAX_MODEL_PARAMS, a compress job's methods and a training job's ``training`` section
    as the services read them, and the dataset uri against the builtins and MAAS_DATASET_BUCKETS.
    What needs the dataset's rows, the base model or the pool is judged by the service that runs
    the job. Raises InvalidArgument naming the field and what is accepted.
    """
    events.validate(job, events.JOB)
    events.check_numbers(job)
    kind = job["type"]
    if kind == CANCEL:
        return job  # the schema allowed nothing beside the id of the job to stop
    if is_plan_id(job.get("job_id")):
        raise InvalidArgument(
            f"job_id={shown(job['job_id'])}: ids starting {POLICY_JOB_PREFIX!r} are the policy "
            "plans' own (policy-NAME-VERSION, watched and cancelled under that id); pick another "
            "job_id"
        )
    missing = [s for s in _REQUIRED_SECTIONS[kind] if s not in job]
    if missing:
        raise SchemaViolation(f"a {kind} job needs {', '.join(missing)}; add the section(s)")
    foreign = [s for s in _FOREIGN_SECTIONS[kind] if s in job]
    if foreign:
        raise SchemaViolation(
            f"a {kind} job does not read {', '.join(foreign)}; remove the section(s) (or set "
            "type to the job that uses them)"
        )
    if kind == "compress":
        _check_compress_training(job.get("training", {}))
    if {"version", "alias"} <= set(job.get("base", {})):
        raise SchemaViolation("base: give version or alias, not both")
    if isinstance(job.get("base", {}).get("version"), int):
        try:
            check_version(job["base"]["version"])
        except InvalidArgument as exc:  # "version 0 is malformed" named no field
            raise InvalidArgument(f"base.{exc.message}") from None
    model = job.get("model", {})
    if "arch" in model:
        zoo.check_size(model["arch"], model.get("config"), settings.max_model_params)
    for where, student in _students(job.get("compress", {})):
        if "arch" in student:
            limit = settings.max_model_params
            zoo.check_size(student["arch"], student.get("config"), limit, where)
    if kind == "compress":
        # What the compressor checks before it starts, said here too (--dry-run included);
        # torch loads for compress jobs only.
        from maas.compression.pipeline import parse_methods

        parse_methods(job["compress"].get("methods") or [])
        batch = (job.get("training") or {}).get("batch_size")  # absent: the default, 64
        for where, student in _students(job["compress"]):
            if "arch" in student and batch is not None:
                zoo.check_batch_rows(
                    student["arch"], student.get("config"), batch, where, "training.batch_size"
                )
    else:
        # The training section as the coordinator reads it (its ranges beyond the schema's);
        # what needs the dataset or the pool is judged there.
        from maas.training.plan import MAX_JOB_SHARDS, MAX_JOB_WORKERS, TrainingSpec

        spec = TrainingSpec.from_job(
            job.get("training"),
            max_workers=MAX_JOB_WORKERS,
            max_shards=MAX_JOB_SHARDS,
            default_deadline_ms=settings.step_deadline_ms,
        )
        if "arch" in model:
            zoo.check_batch_rows(
                model["arch"], model.get("config"), spec.batch_size, "model.config",
                "training.batch_size",
            )  # fmt: skip
    if "dataset" in job:
        datasets.check_uri(job["dataset"]["uri"], settings)
    if kind == "train" and "name" not in model and "name" not in job.get("register_as", {}):
        raise InvalidArgument("model.name (or register_as.name) is required to register the result")
    return job


def _students(compress: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where its config is, student) for each distill method, chained ones included."""
    found = []
    for i, method in enumerate(compress.get("methods", [])):
        steps = [(f"compress.methods[{i}]", method)]
        steps += [
            (f"compress.methods[{i}].chain[{j}]", step)
            for j, step in enumerate(method.get("chain", []))
        ]
        for where, step in steps:
            if "student" in step.get("distill", {}):
                found.append((f"{where}.distill.student.config", step["distill"]["student"]))
    return found


async def publish_job(settings: Settings, job: dict[str, Any]) -> None:
    async with EventProducer(settings, client_id="maas-cli") as producer:
        await producer.send(topics.JOBS, job, key=job["job_id"])


# --- following status -----------------------------------------------------------------------


@dataclass
class JobSummary:
    """The latest known state of one job, folded from its status events."""

    job_id: str
    state: str = "unknown"
    step: int = 0
    total_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    models: list[dict[str, Any]] = field(default_factory=list)  # every version registered
    error: dict[str, str] | None = None
    reason: str = ""  # the latest status's (queued: what it waits for; succeeded: a promotion)
    updated_ms: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, event: Mapping[str, Any]) -> None:
        self.history.append(dict(event))
        self.updated_ms = max(self.updated_ms, int(event.get("ts", 0)))
        # A terminal state is final; a late "running" from another replica must not undo it.
        if self.state in TERMINAL_STATES and event["state"] not in TERMINAL_STATES:
            return
        self.state = event["state"]
        self.step = int(event.get("step", self.step))
        self.total_steps = int(event.get("total_steps", self.total_steps))
        self.metrics.update(event.get("metrics") or {})
        self.model = event.get("model") or self.model
        self.models = event.get("models") or self.models or ([self.model] if self.model else [])
        self.error = event.get("error") or self.error
        self.reason = str(event.get("reason") or "")

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def accepted_content(self) -> str | None:
        """The ``content_sha256`` its ``accepted`` status recorded; None when none says one
        (an unknown id, or a service older than the field)."""
        for event in self.history:
            if isinstance(event.get("content_sha256"), str):
                return str(event["content_sha256"])
        return None


def job_content(job: Mapping[str, Any]) -> dict[str, Any]:
    """What a job asks for: the event without its envelope (``id``, ``ts``), which a client's
    retry or a redelivery may change."""
    return {k: v for k, v in job.items() if k not in ("id", "ts")}


def content_sha256(job: Mapping[str, Any]) -> str:
    """A fingerprint of ``job_content``: equal for a redelivery or a retry, not for another job."""
    canonical = json.dumps(job_content(job), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def status_event(job_id: str, state: str, *, service: str, **fields: Any) -> dict[str, Any]:
    """A ``maas.job-status/1`` event, as the services that run a job publish it."""
    return events.new_event(
        events.JOB_STATUS, job_id=job_id, state=state, service=service, **fields
    )


async def status_events(
    settings: Settings, *, follow: bool, idle_timeout_s: float = 2.0
) -> AsyncIterator[dict[str, Any]]:
    """Every valid status event from the beginning; with ``follow``, keep waiting for more.
    What is not a valid status is skipped: not ours to judge here (the services dead-letter
    it). Read without a consumer group, so it steals partitions from no one."""
    async with PartitionReader(settings, topics.JOB_STATUS, client_id="maas-jobs") as reader:
        await reader.from_beginning()
        end = await reader.end_offsets()
        timeout_ms = int(idle_timeout_s * 1000)
        while True:
            for record in await reader.next_records([events.JOB_STATUS], timeout_ms):
                yield record.event
            if not follow and await reader.reached(end):
                return


async def summary_of(settings: Settings, job_id: str) -> JobSummary:
    """Every status of ``job_id`` so far, folded (state ``unknown`` when there is none)."""
    summary = JobSummary(job_id)
    async for event in status_events(settings, follow=False):
        if event["job_id"] == job_id:
            summary.apply(event)
    return summary


def check_id_free(job: Mapping[str, Any], known: JobSummary) -> None:
    """AlreadyExists when ``job``'s id was accepted for other content (``known``'s accepted
    status says): the services would dead-letter this job, and watching the id would show the
    other job."""
    accepted = known.accepted_content
    if accepted is not None and accepted != content_sha256(job):
        raise AlreadyExists(
            f"job_id {job['job_id']!r} belongs to another job, accepted earlier with other "
            "content (`maas jobs watch` shows it); the services would refuse this one. Submit "
            "it under a new --job-id, or leave job_id out for a fresh one"
        )


async def summaries(settings: Settings) -> dict[str, JobSummary]:
    jobs: dict[str, JobSummary] = {}
    async for event in status_events(settings, follow=False):
        jobs.setdefault(event["job_id"], JobSummary(event["job_id"])).apply(event)
    return jobs


def check_states(states: Iterable[str]) -> set[str]:
    """``states`` as a set, each a job state; InvalidArgument naming the first that is not."""
    wanted = set(states)
    unknown = sorted(wanted - JOB_STATES)
    if unknown:
        raise InvalidArgument(
            f"--state {unknown[0]!r} is no job state; accepted: {', '.join(sorted(JOB_STATES))}"
        )
    return wanted


def latest(
    summaries: Iterable[JobSummary], *, states: Iterable[str] = (), last: int | None = None
) -> list[JobSummary]:
    """The jobs in any of ``states`` (all when none named; ``check_states`` says which are
    states), oldest update first, only the ``last`` most recently updated when given."""
    wanted = set(states)
    chosen = [s for s in summaries if not wanted or s.state in wanted]
    chosen.sort(key=lambda s: s.updated_ms)
    return chosen[-last:] if last else chosen


async def has_status(settings: Settings, job_id: str) -> bool:
    """Whether any service has published a status for ``job_id`` (the topic read to its end)."""
    async for event in status_events(settings, follow=False):
        if event["job_id"] == job_id:
            return True
    return False


async def watch(
    settings: Settings, job_id: str, *, timeout_s: float | None = None
) -> AsyncIterator[JobSummary]:
    """Yield the job's summary after each of its status events, until it is terminal."""
    summary = JobSummary(job_id)

    async def follow() -> AsyncGenerator[JobSummary, None]:
        async for event in status_events(settings, follow=True, idle_timeout_s=0.5):
            if event["job_id"] == job_id:
                summary.apply(event)
                yield summary
                if summary.done:
                    return

    stream = follow()
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                progress = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await stream.aclose()
            raise DeadlineExceeded(_not_finished(job_id, summary, timeout_s)) from None
        yield progress  # outside the timeout: the consumer's time is not the stream's


def _not_finished(job_id: str, summary: JobSummary, timeout_s: float | None) -> str:
    name = printable(job_id)
    waited = f"within {timeout_s or 0:.0f} s (--timeout-s)"
    if summary.state == "unknown":  # nothing ever said it runs: do not say it goes on
        return (
            f"no service reported on job {name} {waited}: check the id (`maas jobs list`); "
            f"a job event no service could read is in {topics.DLQ.name} with the reason"
        )
    return (
        f"job {name} did not finish {waited}; last seen: {summary.state}; it goes on: "
        f"`maas jobs watch {name}` follows it again"
    )
