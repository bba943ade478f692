"""The shard's servicer for ``maas.training.v1``: a thin edge over ``ShardService``.

``Exchange`` reads the stream's ``Join``, attaches the worker, then runs two things at once: a
reader that hands every ``Push`` (and ``PushesFrom``) to the shard, and the replies the shard
queues for this worker.
A malformed message ends the stream with INVALID_ARGUMENT (naming what is wrong), and so does a
stream without a join for ``JOIN_TIMEOUT_S``; a partition
this shard does not serve (yet) with UNAVAILABLE (it may still be loading it, or it moved); a
finished one with FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from maas.config import Settings
from maas.errors import InvalidArgument, MaasError
from maas.training.dataplane import build_server
from maas.training.pool import check_shard_address
from maas.training.protocol import PushFrame, read_stream_message, read_worker_message
from maas.training.v1 import training_pb2 as pb
from maas.training.v1 import training_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the shard imports this module to serve itself
    from services.aggregator.shard import ShardService
    from services.aggregator.shard_job import Peer

log = logging.getLogger(__name__)

# A worker sends its join first thing; a stream that says nothing is a stranger's, and would
# hold a connection and a handler for as long as its client liked.
JOIN_TIMEOUT_S = 30.0
NO_JOIN = f"no join message within {JOIN_TIMEOUT_S:g} s: an Exchange stream starts with one"


async def _abort(context: grpc.aio.ServicerContext, error: MaasError) -> None:
    await context.abort(grpc.StatusCode[error.grpc_code], error.message)


async def _written(context: grpc.aio.ServicerContext, message: bytes, peer: Peer) -> bool:
    """Write one reply; False once the stream can take no more. A worker that froze reads
    nothing, so the write waits on flow control until the worker is removed and its stream
    cancelled. Written by this handler, not yielded to grpc (which logged that end as an
    ERROR with a traceback), it is what it is: the worker left."""
    try:
        await context.write(message)
    except Exception as exc:  # grpc's error for a call that is over varies by cause
        log.info(
            "worker %d of job %s: its stream ended before a reply could be written (%s)",
            peer.worker,
            peer.job_id,
            type(exc).__name__,
        )
        return False
    return True


class DataPlaneServicer(pb_grpc.TrainingDataPlaneServicer):
    def __init__(self, shard: ShardService) -> None:
        self._shard = shard

    async def Exchange(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        requests = aiter(request_iterator)
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                first = await anext(requests)
            peer = await self._attach(first)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await _abort(context, InvalidArgument(NO_JOIN))
            return
        except MaasError as exc:
            await _abort(context, exc)
            return
        reader = asyncio.create_task(self._read(requests, peer))
        try:
            while (message := await peer.outbox.get()) is not None:
                if not await _written(context, message, peer):
                    return
            if peer.error is not None:
                await _abort(context, peer.error)
        finally:
            reader.cancel()
            self._shard.detach(peer)

    async def _attach(self, first: bytes) -> Peer:
        join = read_worker_message(first)
        if not isinstance(join, pb.Join):
            raise InvalidArgument("an Exchange stream starts with a join message")
        return await self._shard.attach(join)

    async def _read(self, requests: AsyncIterator[bytes], peer: Peer) -> None:
        try:
            async for data in requests:
                message = read_stream_message(data)
                if isinstance(message, PushFrame):
                    await self._shard.on_push(peer, message)
                else:
                    await self._shard.on_pushes_from(peer, message.version)
        except MaasError as exc:
            peer.error = exc
            peer.close()
        except Exception:
            log.exception("worker %d of job %s: push failed", peer.worker, peer.job_id)
            peer.error = MaasError("the shard failed on a push; see its log")
            peer.close()


async def serve_data_plane(shard: ShardService, settings: Settings) -> tuple[grpc.aio.Server, int]:
    server, port = build_server(DataPlaneServicer(shard), settings, settings.aggregator_listen)
    await server.start()
    return server, port


def advertised(listen: str, port: int, advertise: str) -> str:
    """The address workers dial: as configured, else the listen host with the bound port."""
    if advertise:
        return check_shard_address(advertise, "MAAS_AGGREGATOR_ADVERTISE")
    host = listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        # This host's address as its name resolves here (a container's on a compose network).
        host = socket.gethostname()
        with contextlib.suppress(OSError):  # else the name: workers may resolve it elsewhere
            host = socket.gethostbyname(host)
    return f"{host}:{port}"
