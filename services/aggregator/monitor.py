"""The coordinator's monitor: it follows each running training job until the job ends.

Per job, one task polls the partitions' checkpoint pointers. When every one is final the job is
finished (``finish``); when a shard reports no progress for ``MAAS_JOB_STALL_TIMEOUT_MS`` it
fails; when the base version a fine-tune started from is deleted meanwhile, it fails at once
(its result could not be registered with that parent). The stall wait is counted from the last
progress seen, through any S3 or registry outage the monitor waits out meanwhile
(``StallClock``), and while it waits one out the job's status says so. A job also ends, at the
next poll, with an ending someone else asked for (``end``): a worker that reports a step it
cannot compute, an assignment the coordinator did not write, a ``cancel`` event. However a job
ends, its result is written to S3 first and then announced (``announce``), retrying through
outages: an ending not recorded would leave the job running for good, its workers counted busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from maas import events, jobs
from maas.config import Settings
from maas.errors import DeadlineExceeded, MaasError
from maas.training import checkpoint as ck
from maas.training.plan import JobPlan
from maas.training.storage import TrainingStore

log = logging.getLogger(__name__)

POLL_S = 0.5
RETRY_S = 2.0
BASE_CHECK_MS = 10_000  # how often a running job's base version is looked up

Finish = Callable[[JobPlan, list[ck.Pointer]], Awaitable[None]]
Announce = Callable[[str, Mapping[str, Any]], Awaitable[None]]
SendStatus = Callable[..., Awaitable[None]]  # (job_id, state, **fields)
CheckBase = Callable[[JobPlan], Awaitable[None]]  # raises when the job's base is gone


class JobStalled(DeadlineExceeded):
    """A running job whose shards made no progress for MAAS_JOB_STALL_TIMEOUT_MS: it fails (a
    deadline is retriable elsewhere, but retrying here only restarts the wait)."""


def ends_the_job(error: MaasError) -> bool:
    """Whether following a job gives up on ``error`` and fails the job: anything retrying cannot
    mend, and a stall (retrying would only start the wait again, forever)."""
    return not error.retriable or isinstance(error, JobStalled)


@dataclass
class StallClock:
    """When a running job last made progress. It lives as long as the job's monitor, not one
    attempt of its poll loop: an S3 or registry error restarts the poll after RETRY_S, and a
    clock started again with each attempt never reached the stall timeout when anything
    failed now and then (a job orphaned before a 15 s S3 outage stayed running for good)."""

    changed_ms: int
    seen: tuple[int, ...] | None = None

    def stalled_for(self, versions: tuple[int, ...], progress_ms: int, now_ms: int) -> int:
        """How long (ms) the job has made no progress, given the partitions' checkpoint
        versions and when a shard's status last showed its step move on."""
        if versions != self.seen or progress_ms > self.changed_ms:
            self.seen, self.changed_ms = versions, now_ms
        return now_ms - self.changed_ms


class JobMonitor:
    def __init__(
        self,
        settings: Settings,
        store: TrainingStore,
        *,
        finish: Finish,
        announce: Announce,
        send_status: SendStatus,
        check_base: CheckBase,
    ) -> None:
        self._stall_timeout_ms = settings.job_stall_timeout_ms
        self._check_base = check_base
        self._store = store
        self._finish = finish
        self._announce = announce
        self._send_status = send_status
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._progress_ms: dict[str, int] = {}
        self._shard_steps: dict[str, dict[str, int]] = {}  # job -> shard service -> its step
        # Jobs to end at their monitor's next poll (the one place a running job ends). The first
        # reason wins.
        self._endings: dict[str, Mapping[str, Any]] = {}

    def follow(self, job_id: str) -> None:
        """Follow ``job_id`` until it ends (a no-op while it is followed already)."""
        if not self.following(job_id):
            self._tasks[job_id] = asyncio.create_task(self._follow(job_id), name=job_id)

    def following(self, job_id: str) -> bool:
        task = self._tasks.get(job_id)
        return task is not None and not task.done()

    def end(self, job_id: str, ending: Mapping[str, Any]) -> None:
        """End the job at its next poll with ``ending`` (a result), unless it already ends."""
        self._endings.setdefault(job_id, ending)

    def forget(self, job_id: str) -> None:
        """Drop what was kept about a job that was announced ended."""
        self._progress_ms.pop(job_id, None)
        self._shard_steps.pop(job_id, None)
        self._endings.pop(job_id, None)

    def shard_reported(self, event: Mapping[str, Any]) -> None:
        """A shard's status is progress when its step moved on: a shard whose job has lost
        every worker still reports, at the same step, every interval."""
        job_id, step = event["job_id"], event.get("step")
        if job_id not in self._tasks or not isinstance(step, int):
            return
        steps = self._shard_steps.setdefault(job_id, {})
        if step > steps.get(event["service"], -1):
            steps[event["service"]] = step
            self._progress_ms[job_id] = events.now_ms()

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _follow(self, job_id: str) -> None:
        clock = StallClock(events.now_ms())
        noted_ms: int | None = None
        while True:
            try:
                await self._follow_until_done(job_id, clock)
                return
            except asyncio.CancelledError:
                raise
            except MaasError as exc:
                if ends_the_job(exc):
                    await self._fail(job_id, exc)
                    return
                now = events.now_ms()
                if noted_ms is None or now - noted_ms >= jobs.WAITING_NOTE_MS:
                    # Once per note, not per retry: an S3 outage of minutes is one line a
                    # jobs.WAITING_NOTE_MS per job, not one every RETRY_S.
                    noted_ms = now
                    log.warning("job %s: %s; retrying every %g s", job_id, exc.message, RETRY_S)
                    await self._note_waiting(job_id, exc)
                else:
                    log.debug("job %s: %s; retrying", job_id, exc.message)
                await asyncio.sleep(RETRY_S)
            except Exception as exc:
                log.exception("job %s: finishing failed", job_id)
                await self._fail(job_id, MaasError(f"{type(exc).__name__}: {exc}"))
                return

    async def _note_waiting(self, job_id: str, exc: MaasError) -> None:
        """Say in the job's status what it waits for (S3, the model registry), rather than sit
        silently at its last step; it is only news, so one that cannot be sent is dropped."""
        reason = jobs.waiting_reason(exc)
        try:
            await self._send_status(job_id, "running", reason=reason)
        except MaasError as error:
            log.warning("job %s: status not sent (%s)", job_id, error.message)

    async def _follow_until_done(self, job_id: str, clock: StallClock) -> None:
        result = await self._store.read_result(job_id)
        if result is not None:  # finished before a restart; only the last steps are left
            await self._announce(job_id, result)
            return
        plan = await self._store.read_plan(job_id)
        base_checked_ms: int | None = None
        while True:
            pointers = [await self._store.pointer(job_id, s) for s in range(plan.shards)]
            if all(p is not None and p.final for p in pointers):
                await self._finish(plan, [p for p in pointers if p is not None])
                return
            if job_id in self._endings:
                ending = self._endings[job_id]
                await self._store.write_result(job_id, ending)
                await self._announce(job_id, ending)
                return
            now = events.now_ms()
            if base_checked_ms is None or now - base_checked_ms >= BASE_CHECK_MS:
                base_checked_ms = now
                await self._check_base(plan)  # a deleted base ends the job now, not at its end
            versions = tuple(p.version if p else -1 for p in pointers)
            progress_ms = self._progress_ms.get(job_id, 0)
            if clock.stalled_for(versions, progress_ms, now) > self._stall_timeout_ms:
                raise JobStalled(
                    f"no progress for {self._stall_timeout_ms} ms (shard versions "
                    f"{list(versions)}); are gradient workers and aggregator shards running? "
                    "(`maas stack status`, and the job's last `running` status names them) If "
                    "they are, their logs say why they do not step (a shard holding a version "
                    "until S3 takes its checkpoint, a worker that cannot reach its shard)"
                )
            await asyncio.sleep(POLL_S)

    async def _fail(self, job_id: str, error: MaasError) -> None:
        """Record and announce the failure, retrying while S3 or Kafka is away: a failure not
        recorded would leave the job running for good, its workers counted busy."""
        result = {"state": "failed", "error": {"code": error.reason_code, "message": error.message}}
        while True:
            try:
                await self._store.write_result(job_id, result)
                await self._announce(job_id, result)
                return
            except MaasError as exc:
                if not exc.retriable:
                    log.error(
                        "job %s failed (%s) and even that could not be recorded: %s",
                        job_id,
                        error.message,
                        exc.message,
                    )
                    return
                log.warning(
                    "job %s failed (%s); recording it: %s; retrying",
                    job_id,
                    error.message,
                    exc.message,
                )
                await asyncio.sleep(RETRY_S)
