"""One worker's stream to one aggregator shard for one job (``maas.training.v1.Exchange``).

Pushes go out in the order they were made and are kept until the shard says a checkpoint
covers their version (``durable_version`` on every parameter piece): if the shard restarts from
that checkpoint, the reconnected stream sends them again and the shard replays the steps it lost,
exactly (its core drops what it already has). A worker that cannot push the versions the shard
is at (it took its rank over after that checkpoint, or its other partitions are past them) says
from which version it can (``declare``), and the shard goes on without it until then.

Parameters come in piece by piece and reach the job whole. The link asks for the partition's
address (the job's newest assignment) at every dial and dials again, with backoff, whenever the
stream breaks: either side may have restarted, or the partition may have moved to another shard.
A move ends the stream at once (``follow``): the shard that lost the partition may be hung,
its connection open and silent, and its keepalive pings would end the stream seconds later.

A shard the link gets nothing from for ``MAAS_WORKER_HEARTBEAT_TIMEOUT_MS`` (every dial refused,
ended before a reply or left unanswered, at one address) is reported through ``on_unreachable``,
then again every timeout while it lasts: a member that heartbeats ``up`` with an address nobody
can dial would otherwise hold the job at its step, silently, until the stall timeout.

A shard that refuses the worker's token (UNAUTHENTICATED, PERMISSION_DENIED) ends the link with
``refused`` set: dialling again with the same token cannot help, and the worker fails the job
saying which token it needs, rather than report the shard unreachable until the stall timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc

from maas import events
from maas.config import Settings
from maas.errors import MaasError
from maas.training.broadcast import ParamsAssembler, ShardParams, read_shard_message
from maas.training.dataplane import AUTH_REFUSALS, exchange, open_channel
from maas.training.protocol import OutgoingPush, pushes_from_frame
from maas.training.v1 import training_pb2 as pb

log = logging.getLogger(__name__)

RETRY_S = 0.2
MAX_RETRY_S = 2.0
ERROR_CHARS = 500  # of a stream's error, in a report

# (partition, address, what failed): the shard at that address sent nothing for a timeout
Unreachable = Callable[[int, str, str], Awaitable[None]]


@dataclass
class Failing:
    """Since when every dial of one address failed, and when that was last reported."""

    address: str
    since_ms: int
    reported_ms: int | None = None


class ShardLink:
    def __init__(
        self,
        *,
        job_id: str,
        worker: int,
        member: str,
        shard: int,
        partition_size: int,
        settings: Settings,
        address: Callable[[int], str],
        on_params: Callable[[int, ShardParams], None],
        on_unreachable: Unreachable | None = None,
    ) -> None:
        self.job_id = job_id
        self.worker = worker
        self.member = member
        self.shard = shard
        self.over = False  # the shard says the job is over, or sent its final version
        self._closed = False  # the worker left the job (``close``)
        self.refused: str | None = None  # why the shard refused this worker's token
        self.refused_at = ""  # the address of the shard that refused it
        self._settings = settings
        self._address = address
        self._on_params = on_params
        self._assembler = ParamsAssembler(partition_size)
        self._retained: list[OutgoingPush] = []
        self._durable = -1
        self._outbox: asyncio.Queue[bytes] | None = None
        self._on_unreachable = on_unreachable
        self._dialled = ""  # the address of the newest dial
        self._failing: Failing | None = None
        self.shard_version = -1  # of the newest whole parameters on this stream (-1: none yet)
        self._declared: int | None = None  # the PushesFrom version sent on this stream
        self._moved = asyncio.Event()  # the partition's address is not the streamed one's

    def push(self, push: OutgoingPush) -> None:
        """Send ``push`` now if connected, and keep it until a checkpoint covers its version."""
        self._retained.append(push)
        if self._outbox is not None:
            self._outbox.put_nowait(push.frame)

    @property
    def retained(self) -> int:
        return len(self._retained)

    @property
    def streaming(self) -> bool:
        """A stream to the shard is open."""
        return self._outbox is not None

    def kept_versions(self) -> Iterator[int]:
        """The versions of the pushes kept for a restarted shard (see ``push``), read lazily:
        most steps never need them."""
        return (push.version for push in self._retained)

    def close(self) -> None:
        """The worker leaves the job: the link ends at its next step, its stream at once,
        whatever becomes of the cancellation of its task (Python 3.11's ``asyncio.wait_for``
        once lost one here: the link dialled on, and the worker's wait for it never returned;
        see ``maas.waiting``)."""
        self._closed = True
        self._moved.set()

    def follow(self) -> None:
        """The job's assignment changed: end a stream to an address the partition has left,
        so the next dial reaches its new shard."""
        if self._outbox is not None and self._address(self.shard) != self._dialled:
            self._moved.set()

    def declare(self, version: int | None) -> None:
        """Tell the shard this worker can push from ``version`` on only (None: nothing to
        tell). Said once per stream until the shard reaches it: it goes on without this worker
        up to there anyway, and a declaration per version would be a status per step."""
        if version is None or self._outbox is None:
            return
        if self._declared is not None and (
            version == self._declared or self.shard_version < self._declared
        ):
            return
        self._declared = version
        log.info(
            "job %s: shard %d is at version %d; this worker can push it from %d on",
            self.job_id,
            self.shard,
            self.shard_version,
            version,
        )
        self._outbox.put_nowait(pushes_from_frame(version))

    async def run(self) -> None:
        delay = RETRY_S
        while not (self.over or self._closed):
            failure = ""
            try:
                failure = await self._exchange()
                if not failure:
                    delay = RETRY_S
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.info("job %s is over on shard %d", self.job_id, self.shard)
                    self.over = True
                    return
                if exc.code() in AUTH_REFUSALS:
                    self.refused, self.refused_at = self._refusal(exc), self._dialled
                    log.error("job %s: %s", self.job_id, self.refused)
                    return
                log.info(
                    "job %s, shard %d: stream ended (%s: %s); joining again",
                    self.job_id,
                    self.shard,
                    exc.code().name,
                    exc.details(),
                )
                failure = f"{exc.code().name}: {exc.details()}"
            except MaasError as exc:  # no shard assigned yet, bad reply
                log.info("job %s, shard %d: %s; trying again", self.job_id, self.shard, exc)
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise  # the worker leaves the job
                # grpc.aio raises it from a call cancelled on this side (_raise_for_status), not
                # only when this task is cancelled: the stream ended, the link did not.
                failure = "the stream was cancelled under the worker (by grpc)"
                log.info("job %s, shard %d: %s; joining again", self.job_id, self.shard, failure)
            except Exception as exc:  # a link that ends leaves its job stalled: never for this
                failure = f"{type(exc).__name__}: {exc}"
                log.exception(
                    "job %s, shard %d: stream failed; joining again", self.job_id, self.shard
                )
            if _cancelled_here():
                raise asyncio.CancelledError  # a cancellation lost inside (see ``close``)
            if failure and self._failing is not None:
                await self._failed(self._failing, failure)
            await asyncio.sleep(delay)
            delay = min(MAX_RETRY_S, delay * 2)

    def _refusal(self, exc: grpc.aio.AioRpcError) -> str:
        details = (exc.details() or "")[:ERROR_CHARS]
        return (
            f"the shard of partition {self.shard} at {self._dialled} refused this gradient "
            f"worker's token ({exc.code().name}: {details}); gradient workers need a token "
            "with the service role, as `maas stack up` gives them (MAAS_AUTH_TOKEN_FILE="
            "<state dir>/auth/services.token)"
        )

    async def _failed(self, failing: Failing, failure: str) -> None:
        """A dial of ``failing.address`` got nothing: report it once it has lasted a timeout,
        and then once more per timeout."""
        now, every = events.now_ms(), self._settings.worker_heartbeat_timeout_ms
        if now - failing.since_ms < every:
            return
        if failing.reported_ms is not None and now - failing.reported_ms < every:
            return
        failing.reported_ms = now
        what = f"nothing from it for {now - failing.since_ms} ms; last: {failure[:ERROR_CHARS]}"
        log.warning(
            "job %s: the shard of partition %d at %s is unreachable (%s)",
            self.job_id,
            self.shard,
            failing.address,
            what,
        )
        if self._on_unreachable is not None:
            await self._on_unreachable(self.shard, failing.address, what)

    async def _exchange(self) -> str:
        """One stream, until it ends: "" if the shard replied, else what failed. A shard
        answers a join at once (with its parameters); one that sends nothing for a heartbeat
        timeout (its process hung, a stranger's port) counts as unreachable, like a refusal."""
        address = self._dialled = self._address(self.shard)
        if self._failing is None or self._failing.address != address:
            # Failures count per address: a partition that moved starts with a clean slate.
            self._failing = Failing(address, events.now_ms())
        outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.shard_version, self._declared = -1, None  # a new stream: maybe a restarted shard
        for push in self._retained:
            outbox.put_nowait(push.frame)
        silence_ms = self._settings.worker_heartbeat_timeout_ms
        async with open_channel(address, self._settings) as channel:
            call = exchange(channel, self._settings)
            self._outbox = outbox
            writer = asyncio.create_task(self._write(call, outbox))
            try:
                try:
                    async with asyncio.timeout(silence_ms / 1000):
                        reply = await call.read()
                except TimeoutError:
                    return f"the shard accepted the stream but sent nothing in {silence_ms} ms"
                if reply is grpc.aio.EOF:
                    return "the stream ended before the shard sent anything"
                self._failing = None  # it answers: whatever failed before is over
                self.receive(reply)
                await self._read_until_moved(call)
            finally:
                self._outbox = None
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                call.cancel()
        return ""

    async def _read_until_moved(self, call: grpc.aio.StreamStreamCall) -> None:
        """Read the stream until it ends (its error raised) or the partition moves away."""
        self._moved.clear()
        if self._closed:
            return
        self.follow()  # a move while the stream opened
        reading = asyncio.create_task(self._read_all(call))
        moved = asyncio.create_task(self._moved.wait())
        try:
            await asyncio.wait({reading, moved}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            if not reading.done():
                reading.cancel()
            await asyncio.gather(reading, moved, return_exceptions=True)
        if self._closed:
            return  # the worker left the job
        if not reading.cancelled():
            reading.result()  # the stream's own end: its error, if any, is the caller's
            return
        log.info(
            "job %s: partition %d moved from %s to %s; dialling it",
            self.job_id,
            self.shard,
            self._dialled,
            self._address(self.shard),
        )

    async def _read_all(self, call: grpc.aio.StreamStreamCall) -> None:
        reply = await call.read()
        while reply is not grpc.aio.EOF:
            self.receive(reply)
            reply = await call.read()

    async def _write(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[bytes]) -> None:
        join = pb.Join(job_id=self.job_id, worker=self.worker, shard=self.shard, member=self.member)
        await call.write(pb.WorkerMessage(join=join).SerializeToString())
        while True:
            await call.write(await outbox.get())

    def receive(self, frame: bytes) -> None:
        """A parameter piece from the shard: trims what its checkpoint covers, and hands a
        complete version to the job."""
        piece = read_shard_message(frame)
        durable = piece.params.durable_version
        if durable > self._durable:
            self._durable = durable
            self._retained = [p for p in self._retained if p.version >= durable]
        whole = self._assembler.add(piece)
        if whole is None:
            return
        if whole.final:
            self.over = True
        self.shard_version = whole.version
        self._on_params(self.shard, whole)


def _cancelled_here() -> bool:
    """Whether the running task itself is being cancelled (not a call inside it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
