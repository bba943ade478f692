"""The compressor's job flow, transport-neutral: take a ``compress`` job (parsed, and its
statuses built, in ``services.compressor.job``), fetch the parent from the registry, run each
method, measure every variant as it will be served, register it.

Kafka stays in ``service.py``; the registry and the dataset fetch are passed in, so this runs in
unit tests against fakes. Torch work runs on a worker thread, never on the event loop.

Idempotency: a job id seen here is not run twice, and after a crash a redelivered job skips
every variant already registered for it (found by ``job_id`` + method index in the registry),
so it finishes where it stopped instead of registering duplicates.

Cancel: ``cancel(job_id)`` (the service calls it for every ``cancel`` job event, read beside
the job consumer) ends that job before its next variant is registered — a method under way
finishes its torch work, and its variant is dropped — or, if the job has not started, before it
starts. Variants registered before the cancel stay. The job's status becomes ``cancelled``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from maas import artifacts, jobs, zoo
from maas.compression.measure import artifact_metrics, relative_metrics
from maas.compression.pipeline import Plan, check_dataset, check_method, parent_variant, run
from maas.compression.train import FitConfig, Progress, Stopped, Tensors
from maas.config import Settings
from maas.errors import (
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    ResourceExhausted,
)
from maas.events import clip
from maas.manifest import Manifest
from maas.recent import RecentKeys
from maas.registry.types import ModelRef, ModelVersion
from maas.training.prepare import FetchDataset, load_dataset
from services.compressor.core_types import (
    Built,
    ClaimId,
    Conclude,
    Outcome,
    Parent,
    Publish,
    Registry,
    Wanted,
    dataset_mismatch,
    dataset_of,
)
from services.compressor.job import (
    JOB_TYPE,
    CompressJob,
    check_same_job,
    parse_job,
    progress_status,
    status,
)

log = logging.getLogger(__name__)

MAX_LINEAGE_DEPTH = 32
# Every cancel event is remembered, whichever job type it names (the event does not say): the
# oldest are forgotten past this many.
REMEMBERED_CANCELS = 10_000


class Compressor:
    def __init__(
        self,
        registry: Registry,
        publish: Publish,
        fetch_dataset: FetchDataset | None = None,
        *,
        settings: Settings | None = None,
        latency_repeats: int = 50,
        on_registered: Callable[[ModelVersion], None] | None = None,
        claim: ClaimId | None = None,
    ) -> None:
        self._settings = settings or Settings()
        self._claim = claim  # holds a job's id across the services that run jobs (job_ids)
        # Told of each variant as it is registered (not of those a redelivery finds done).
        self._on_registered = on_registered
        self._registry = registry
        self._publish = publish
        self._fetch_dataset = fetch_dataset
        self._latency_repeats = latency_repeats
        self._finished: dict[str, str] = {}  # job id -> the fingerprint of the job run under it
        self._cancelled = RecentKeys(REMEMBERED_CANCELS)
        self._one_job = asyncio.Lock()
        self._current = ""  # the id of the job (or plan) running
        self._waiting: dict[str, asyncio.Event] = {}  # jobs waiting for their turn: cancel sets

    def cancel(self, job_id: str) -> None:
        """End ``job_id`` before its next variant is registered, or before it starts (at once
        when it waits for its turn)."""
        self._cancelled.add(job_id)
        waiting = self._waiting.get(job_id)
        if waiting is not None:
            waiting.set()

    async def handle(self, event: Mapping[str, Any]) -> list[ModelVersion]:
        """Run one job event; other job types are not ours and are ignored."""
        if event.get("type") != JOB_TYPE:
            return []
        job = parse_job(jobs.check_job(dict(event), self._settings))
        if self._claim is not None:
            await self._claim(job.job_id, JOB_TYPE, job.fingerprint)
        if job.job_id in self._finished:
            check_same_job(job, self._finished[job.job_id])
            log.info("job %s already done here; ignoring the redelivery", job.job_id)
            return []
        outcome = await self.run(job)
        self._finished[job.job_id] = job.fingerprint
        return outcome.versions

    def done(self, job_id: str) -> bool:
        """Whether a job under ``job_id`` ran here (since this process started)."""
        return job_id in self._finished

    def _is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def _stop_if_cancelled(self, job_id: str, done: int) -> None:
        if self._is_cancelled(job_id):
            raise _Cancelled(done)

    async def _stop_if_unwanted(self, job_id: str, done: int, wanted: Wanted | None) -> None:
        self._stop_if_cancelled(job_id, done)
        why = await wanted() if wanted is not None else ""
        if why:
            raise _Cancelled(done, why)

    async def run(
        self, job: CompressJob, *, conclude: Conclude | None = None, wanted: Wanted | None = None
    ) -> Outcome:
        """Run a job's plans, registering each variant not yet registered for its id; a
        cancelled job ends ``cancelled`` with the variants registered before the cancel.
        ``conclude`` (a policy's promotion) acts on the outcome before the job says
        ``succeeded``, which carries what it returns as the reason: a job ends once.
        ``wanted`` (a policy's plan: is the policy still on?) is asked before each variant; a
        reason it returns ends the job ``cancelled`` with that reason.

        One job at a time, compress jobs and policy plans alike (they share the cores): one
        that arrives while another runs is told ``queued``, naming that one, and a cancel
        ends it while it waits."""
        if self._one_job.locked():
            reason = (
                f"waiting for job {self._current} to finish: the compressor runs one job at a "
                "time, compress jobs and policy plans alike"
            )
            await self._publish(status(job.job_id, "queued", reason=reason))
        if not await self._turn(job.job_id):
            return await self._ended(job, _Cancelled(0))
        try:
            self._current = job.job_id
            return await self._run(job, conclude, wanted)
        except _Cancelled as cancelled:
            return await self._ended(job, cancelled)
        finally:
            self._current = ""
            self._one_job.release()

    async def _turn(self, job_id: str) -> bool:
        """Take the one-job lock (True), unless ``job_id`` is cancelled while it waits."""
        if not self._one_job.locked():
            await self._one_job.acquire()
            return True
        cancelled = self._waiting.setdefault(job_id, asyncio.Event())
        taken = asyncio.ensure_future(self._one_job.acquire())
        heard = asyncio.ensure_future(cancelled.wait())
        try:
            await asyncio.wait({taken, heard}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            heard.cancel()
            self._waiting.pop(job_id, None)
        if taken.done():
            return True
        taken.cancel()  # asyncio.Lock hands a grant cancelled before it resumed to the next
        return False

    async def _ended(self, job: CompressJob, cancelled: _Cancelled) -> Outcome:
        log.info("job %s cancelled after %d of its variants", job.job_id, cancelled.done)
        await self._publish(
            status(
                job.job_id,
                "cancelled",
                step=cancelled.done,
                total_steps=len(job.plans),
                reason=cancelled.reason,
            )
        )
        return Outcome({}, [], cancelled=True)

    async def _run(
        self, job: CompressJob, conclude: Conclude | None, wanted: Wanted | None
    ) -> Outcome:
        total = len(job.plans)
        await self._stop_if_unwanted(job.job_id, 0, wanted)
        # A policy's plan has no job event, so no fingerprint to say.
        said = {"content_sha256": job.fingerprint} if job.fingerprint else {}
        # Loading and measuring a large base takes minutes (MiniLM: about 2): say so, or a
        # watcher sees nothing move.
        doing = f"loading the base {job.base} and measuring it (accuracy, size, latency)"
        await self._publish(
            status(job.job_id, "accepted", step=0, total_steps=total, reason=doing, **said)
        )
        parent = await self._load_parent(job)
        name = job.register_name or parent.version.name
        done = await self._registered(name, job)
        for index, plan in enumerate(job.plans):
            if index not in done:
                manifest = parent.manifest
                check_method(
                    index,
                    plan,
                    manifest.arch,
                    manifest.config,
                    parent.data.task,
                    parent.version.ref,
                )
        versions: list[ModelVersion] = []
        deadline = time.monotonic() + self._job_budget_s
        for index, plan in enumerate(job.plans):
            await self._stop_if_unwanted(job.job_id, index, wanted)
            try:
                if index and index not in done:
                    await self._check_parent_kept(parent)
                version = done.get(index) or await self._compress_one(
                    job, index, plan, parent, name, deadline
                )
            except MaasError as exc:  # the job fails: say what it leaves behind
                if not versions or exc.retriable:  # a retried job resumes after them
                    raise
                made = ", ".join(str(v.ref) for v in versions)
                raise type(exc)(f"{exc.message}; registered before it: {made}") from None
            versions.append(version)
            await self._publish(progress_status(job.job_id, "running", index + 1, total, versions))
        outcome = Outcome(parent.metrics, versions)
        said = await conclude(outcome) if conclude is not None else ""
        ending = progress_status(job.job_id, "succeeded", total, total, versions)
        await self._publish({**ending, "reason": said} if said else ending)
        return outcome

    async def _check_parent_kept(self, parent: Parent) -> None:
        """Between variants: a parent deleted while the job ran fails it now, not after the next
        variant's training (a 15 000-step distill ran on, then failed to register)."""
        try:
            await self._registry.get(parent.version.ref)
        except NotFound:
            raise FailedPrecondition(
                f"the base {parent.version.ref} was deleted while the job ran; its variants "
                "cannot be registered with it as parent"
            ) from None

    @property
    def _job_budget_s(self) -> float:
        # A consumer busy past max.poll.interval.ms loses its partition: the job would be
        # redelivered to another compressor and run again, for ever. A margin is left for the
        # last variant's registration.
        return 0.9 * self._settings.compressor_max_poll_interval_ms / 1000

    def _out_of_time(self, index: int, plan: Plan) -> ResourceExhausted:
        limit = self._settings.compressor_max_poll_interval_ms
        return ResourceExhausted(
            f"compress.methods[{index}] ({plan.method}) was stopped: the job ran past "
            f"{self._job_budget_s:.0f} s, 90% of MAAS_COMPRESSOR_MAX_POLL_INTERVAL_MS={limit}, "
            "the longest one compress job may run; ask for fewer steps (distill.steps, "
            "prune.recovery_steps) or split the methods over several jobs"
        )

    async def _load_parent(self, job: CompressJob) -> Parent:
        # fetch verifies every file against the sha256 the registry recorded: a tampered
        # parent raises IntegrityError here, before anything is deserialized.
        version, manifest, files = await self._registry.fetch(job.base)
        if manifest.format != "dense":
            raise FailedPrecondition(
                f"{version.ref} is a {manifest.format!r} artifact; compress its dense ancestor "
                "(compressing a compressed model compounds its rounding and sparsity)"
            )
        dataset = job.dataset or await self._lineage_dataset(version, manifest)

        def load() -> Parent:
            raw = load_dataset(dataset, seed=job.fit.seed, fetch=self._fetch_dataset)
            features = math.prod(zoo.input_shape(manifest.arch, manifest.config))
            if raw.num_features != features:
                raise InvalidArgument(
                    dataset_mismatch(
                        dataset["uri"], raw.num_features, features, version.ref, manifest.arch
                    )
                )
            check_dataset(manifest.arch, manifest.config, raw, str(version.ref))
            data = Tensors.of(raw)
            model = artifacts.materialize(manifest, files)
            metrics = artifact_metrics(manifest, files, data, latency_repeats=self._latency_repeats)
            return Parent(version, manifest, model, data, dict(dataset), metrics)

        return await asyncio.to_thread(load)

    async def _lineage_dataset(self, version: ModelVersion, manifest: Manifest) -> dict[str, Any]:
        """Walk up the lineage to the first version that records its dataset."""
        for _ in range(MAX_LINEAGE_DEPTH):
            found = dataset_of(manifest)
            if found is not None:
                return found
            if not manifest.parent:
                break
            version = await self._registry.get(
                ModelRef(manifest.parent["name"], version=int(manifest.parent["version"]))
            )
            manifest = Manifest.from_json(version.manifest_json)
        raise InvalidArgument(
            f"no dataset recorded in the lineage of {version.ref}; name one in the job: "
            "dataset: {uri: builtin:<name> | s3://bucket/key.npz}"
        )

    async def _registered(self, name: str, job: CompressJob) -> dict[int, ModelVersion]:
        """Variants this job already registered (a redelivery after a crash), by method index;
        AlreadyExists if variants under its id came from another job."""
        found: dict[int, ModelVersion] = {}
        try:
            async for version in self._registry.iter_versions(name):
                if version.job_id == job.job_id:
                    settings = Manifest.from_json(version.manifest_json).settings
                    check_same_job(job, settings.get("job_sha256", job.fingerprint))
                    index = settings.get("job_item")
                    if isinstance(index, int):
                        found[index] = version
        except NotFound:
            pass  # a new name: nothing registered yet
        return found

    async def _compress_one(
        self, job: CompressJob, index: int, plan: Plan, parent: Parent, name: str, deadline: float
    ) -> ModelVersion:
        # The build runs in a thread; its training asks between steps whether the job was
        # cancelled (a dict lookup: the event loop adds to it, the thread only reads) or is out
        # of time.
        def stop() -> bool:
            return self._is_cancelled(job.job_id) or time.monotonic() > deadline

        fit = dataclasses.replace(
            job.fit, stop=stop, progress=self._progress(job, index, plan.method)
        )
        try:
            if time.monotonic() > deadline:
                raise Stopped("out of time before it started")
            built = await asyncio.to_thread(self._build, plan, parent, fit)
        except Stopped:
            if self._is_cancelled(job.job_id):
                raise _Cancelled(index) from None
            raise self._out_of_time(index, plan) from None
        except (ValueError, RuntimeError) as exc:
            # torch refusing these settings fails the same way on every redelivery: retried,
            # it held the compressor for five attempts and ended as handler_failed.
            raise _uncomputable(index, plan.method, exc) from None
        self._stop_if_cancelled(job.job_id, index)
        version = await self._registry.register(
            built.tensors,
            name,
            built.arch,
            built.config,
            parent=parent.version,
            method=plan.method,
            # The dataset goes into lineage so a later job on this variant finds its data.
            settings={
                **plan.settings(),
                "dataset": parent.dataset,
                "seed": job.fit.seed,
                "job_item": index,
                "job_sha256": job.fingerprint,
            },
            job_id=job.job_id,
            metrics=built.metrics,
            format=built.format,
            alias=job.alias,
        )
        if self._on_registered is not None:
            self._on_registered(version)
        log.info(
            "job %s: %s -> %s (%s, %.1fx smaller)",
            job.job_id,
            plan.method,
            version.ref,
            built.format,
            built.metrics["compression_ratio"],
        )
        return version

    def _progress(self, job: CompressJob, index: int, method: str) -> Progress:
        """What the training thread calls with its progress: a `running` status, sent from the
        event loop (the thread only schedules it; one that cannot be sent is only news lost)."""
        loop = asyncio.get_running_loop()
        total = len(job.plans)

        def report(step: int, steps: int, loss: float) -> None:
            said = f"compress.methods[{index}] ({method}): step {step} of {steps}, loss {loss:.4g}"
            update = status(job.job_id, "running", step=index, total_steps=total, reason=said)
            sent = asyncio.run_coroutine_threadsafe(self._publish(update), loop)
            sent.add_done_callback(_log_unsent)

        return report

    def _build(self, plan: Plan, parent: Parent, fit: FitConfig) -> Built:
        start = parent_variant(parent.model, parent.manifest.arch, parent.manifest.config)
        variant = run(plan, start, parent.data, fit)
        diverged = [
            name
            for name, value in variant.model.state_dict().items()
            if isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ]
        if diverged:  # said as the artifact's refusal, it named a tensor, not what to change
            raise FailedPrecondition(
                f"{plan.method} diverged: its weights ({clip(diverged[0], 60)}, ...) hold NaN or "
                f"infinite values after training; lower training.optimizer.lr (it is {fit.lr:g})"
            )
        fmt, tensors = variant.encode()
        files, manifest = artifacts.pack(tensors, variant.arch, variant.config, format=fmt)
        metrics = artifact_metrics(
            manifest, files, parent.data, latency_repeats=self._latency_repeats, parent=parent.model
        )
        metrics |= relative_metrics(metrics, parent.metrics)
        return Built(variant.arch, variant.config, fmt, tensors, metrics)


def _log_unsent(sent: Any) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.info("a progress status was not sent: %s", sent.exception())


def _uncomputable(index: int, method: str, exc: Exception) -> MaasError:
    said = str(exc).splitlines()[0] if str(exc) else ""
    if "allocate" in said:
        return ResourceExhausted(f"compress.methods[{index}] ({method}): no memory: {said}")
    return FailedPrecondition(
        f"compress.methods[{index}] ({method}) could not be computed with these settings: "
        f"{type(exc).__name__}: {clip(said, 300)}"
    )


class _Cancelled(Exception):
    """The job was cancelled with ``done`` of its variants registered, for ``reason``."""

    def __init__(self, done: int, reason: str = "a cancel event asked for it") -> None:
        super().__init__(done, reason)
        self.done = done
        self.reason = reason
