"""The data plane's gRPC edge on a real server (127.0.0.1): whatever bytes a client streams, a
malformed message ends its stream with INVALID_ARGUMENT naming the problem, and a well-formed
push reaches the shard with its tensor viewed in place. (The shard itself is a stand-in that
records what it is handed: the streams, not the shard's logic, are under test.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from pool_kit import link_to

from maas.config import Settings
from maas.edge import STACK_IDENTITIES, ensure_tokens
from maas.training import dataplane
from maas.training.protocol import PushFrame
from maas.training.v1 import training_pb2 as pb
from services.aggregator import dataplane as aggregator_dataplane
from services.aggregator.dataplane import DataPlaneServicer
from services.aggregator.shard_job import Peer
from services.gradient_worker.link import ShardLink

SETTINGS = Settings(auth=False)


@dataclass
class RecordingShard:
    pushes: list[PushFrame] = field(default_factory=list)
    pushes_from: list[int] = field(default_factory=list)

    async def attach(self, join: pb.Join) -> Peer:
        return Peer(join.job_id, join.shard, join.worker)

    def detach(self, peer: Peer) -> None:
        pass

    async def on_push(self, peer: Peer, push: PushFrame) -> None:
        self.pushes.append(push)
        peer.close()  # ends the stream once the push is in

    async def on_pushes_from(self, peer: Peer, version: int) -> None:
        self.pushes_from.append(version)


@contextlib.asynccontextmanager
async def serving(shard: RecordingShard, settings: Settings) -> AsyncIterator[str]:
    """The data-plane server of ``shard`` on 127.0.0.1, started; its address."""
    server, port = dataplane.build_server(
        DataPlaneServicer(shard),  # type: ignore[arg-type]
        settings,
        "127.0.0.1:0",
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def shard() -> AsyncIterator[tuple[RecordingShard, str]]:
    recording = RecordingShard()
    async with serving(recording, SETTINGS) as address:
        yield recording, address


async def _stream(address: str, *frames: bytes) -> grpc.StatusCode:
    async with dataplane.open_channel(address, SETTINGS) as channel:
        call = dataplane.exchange(channel, SETTINGS)
        for frame in frames:
            await call.write(frame)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        return await asyncio.wait_for(call.code(), 10)


def _join() -> bytes:
    return pb.WorkerMessage(join=pb.Join(job_id="j", worker=0, shard=0)).SerializeToString()


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([b"\xff\xff"], "malformed maas.training.v1.WorkerMessage"),
        ([_join(), b"\x12\x05\x08"], "malformed maas.training.v1.WorkerMessage"),
        ([_join(), _join()], "carries pushes, not joins"),
        ([pb.WorkerMessage(push=pb.Push()).SerializeToString()], "starts with a join"),
    ],
)
async def test_a_malformed_stream_ends_with_invalid_argument_naming_it(
    shard: tuple[RecordingShard, str], frames: list[bytes], message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(shard[1], *frames)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


async def test_a_push_reaches_the_shard_with_its_values_intact(
    shard: tuple[RecordingShard, str],
) -> None:
    push = pb.WorkerMessage(push=pb.Push(version=3, values=b"\x00\x00\x80\x3f"))
    assert await _stream(shard[1], _join(), push.SerializeToString()) == grpc.StatusCode.OK
    (got,) = shard[0].pushes
    assert got.push.version == 3 and bytes(got.values) == b"\x00\x00\x80\x3f"


async def test_a_stream_that_never_joins_is_ended_naming_the_join_it_lacks(
    shard: tuple[RecordingShard, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aggregator_dataplane, "JOIN_TIMEOUT_S", 0.2)
    async with dataplane.open_channel(shard[1], SETTINGS) as channel:
        call = dataplane.exchange(channel, SETTINGS)  # opened, then silent
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no join message" in (caught.value.details() or "")


async def test_a_worker_whose_token_the_shard_refuses_stops_dialling_and_says_which_it_needs(
    tmp_path: Path,
) -> None:
    ensure_tokens(tmp_path / "auth", STACK_IDENTITIES)
    settings = Settings(state_dir=str(tmp_path), auth_token="")  # sends the admin token
    unreachable: list[str] = []

    async def report(partition: int, address: str, what: str) -> None:
        unreachable.append(what)

    async with serving(RecordingShard(), settings) as address:
        link = link_to(address, settings, report)
        await asyncio.wait_for(link.run(), 30)
    assert link.refused is not None and not unreachable and not link.over
    assert f"partition 0 at {address} refused" in link.refused
    assert link.refused_at == address
    assert "PERMISSION_DENIED: 'admin' has role write; Exchange needs service" in link.refused
    assert "services.token" in link.refused


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[Settings, str]]:
    """A shard that checks tokens (its stack's), and that stack's settings."""
    ensure_tokens(tmp_path / "auth", STACK_IDENTITIES)
    settings = Settings(state_dir=str(tmp_path))
    async with serving(RecordingShard(), settings) as address:
        yield settings, address


@pytest.mark.parametrize(
    ("token", "accepted"),
    [("services.token", True), ("admin.token", False), ("no such token", False)],
)
async def test_a_shard_says_whether_it_takes_a_token_without_a_join(
    guarded: tuple[Settings, str], token: str, accepted: bool, tmp_path: Path
) -> None:
    settings, address = guarded
    token_file = tmp_path / "auth" / token
    if not token_file.exists():
        token_file.write_text("a token of some other stack\n")
    caller = settings.replace(auth_token_file=str(token_file))
    assert await dataplane.token_accepted(address, caller) is accepted


async def test_a_shard_that_cannot_be_reached_cannot_say(
    guarded: tuple[Settings, str], unused_tcp_port: int
) -> None:
    settings, _ = guarded
    assert await dataplane.token_accepted(f"127.0.0.1:{unused_tcp_port}", settings) is None


@contextlib.asynccontextmanager
async def streaming_link(address: str) -> AsyncIterator[ShardLink]:
    """Rank 0's link to the shard at ``address``, its stream open."""

    async def report(partition: int, address: str, what: str) -> None:
        pass

    link = link_to(address, SETTINGS, report)
    running = asyncio.create_task(link.run())
    try:
        for _ in range(200):
            if link.streaming:
                break
            await asyncio.sleep(0.05)
        yield link
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def _heard(recording: RecordingShard, count: int) -> list[int]:
    """What the shard was told it pushes from, once ``count`` arrived (and a moment more, for
    one too many)."""
    for _ in range(200):
        if len(recording.pushes_from) >= count:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return recording.pushes_from


async def test_a_link_says_once_per_stream_from_which_version_it_pushes(
    shard: tuple[RecordingShard, str],
) -> None:
    # What a shard that resumed from an older checkpoint needs to hear from a worker that
    # cannot push the versions it is at (tests/unit/test_training_pushes_from.py).
    async with streaming_link(shard[1]) as link:
        link.declare(47)
        link.declare(47)
        assert await _heard(shard[0], 1) == [47]


async def test_a_link_says_it_again_only_once_the_shard_reached_what_it_said(
    shard: tuple[RecordingShard, str],
) -> None:
    async with streaming_link(shard[1]) as link:
        link.shard_version = 10
        link.declare(20)
        link.shard_version = 11
        link.declare(21)  # the shard goes on without this worker up to 20 already
        link.shard_version = 20
        link.declare(30)
        assert await _heard(shard[0], 2) == [20, 30]


@dataclass
class FloodingShard(RecordingShard):
    """Queues more replies than a stream's flow-control window holds as a worker joins, and
    says when the stream's handler let go of the worker."""

    detached: asyncio.Event = field(default_factory=asyncio.Event)

    async def attach(self, join: pb.Join) -> Peer:
        peer = await super().attach(join)
        peer.send([bytes(1 << 20)] * 64)
        return peer

    def detach(self, peer: Peer) -> None:
        self.detached.set()


async def test_a_worker_gone_while_replies_wait_on_its_stream_ends_it_without_an_error_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A frozen worker reads nothing: the shard's write waits on flow control until the stream
    # is cancelled. That is a worker leaving, not the shard failing: no traceback at ERROR.
    flooding = FloodingShard()
    async with serving(flooding, SETTINGS) as address:
        async with dataplane.open_channel(address, SETTINGS) as channel:
            call = dataplane.exchange(channel, SETTINGS)
            await call.write(_join())
            await call.read()  # a reply arrived: the others wait on the window
            await asyncio.sleep(0.2)
            call.cancel()
        await asyncio.wait_for(flooding.detached.wait(), 10)
        await asyncio.sleep(0.2)  # the server's own handling of the handler's end
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
