"""The gRPC edge of the training data plane: the shard's server and the worker's channel, built
on the shared edge (``maas.edge``) like every other gRPC server: bearer tokens (the data plane's
one method needs a write token, which workers hold), TLS when configured, one error mapping.

Keepalive pings on both sides make a peer that vanished without closing its connection (a
powered-off host) look like a closed stream within seconds; a killed process is seen at once.

``token_accepted`` asks a shard whether it takes this process's token without joining anything:
a worker the shards refused looks before it offers itself to the pool again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from maas.config import Settings
from maas.edge.client import call_metadata
from maas.edge.client import open_channel as open_edge_channel
from maas.edge.server import add_port, edge_interceptor, keepalive_options, server_options
from maas.training.v1 import training_pb2_grpc as pb_grpc

SERVICE_NAME = "maas.training.v1.TrainingDataPlane"
AUTH_REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
PROBE_TIMEOUT_S = 10.0
_KEEPALIVE_MS = 2_000
# Both ends of a stream ping, with or without calls: a frozen shard or worker is found in seconds.
_KEEPALIVE: tuple[tuple[str, int], ...] = (
    *keepalive_options(_KEEPALIVE_MS, peer_pings_ms=_KEEPALIVE_MS // 2),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_time_between_pings_ms", _KEEPALIVE_MS // 2),
)


def build_server(
    servicer: pb_grpc.TrainingDataPlaneServicer, settings: Settings, listen: str
) -> tuple[grpc.aio.Server, int]:
    """The data-plane server bound to ``listen`` (not started) and the port it got."""
    server = grpc.aio.server(
        interceptors=[edge_interceptor(settings)],
        options=[*server_options(settings, keepalive=False), *_KEEPALIVE],
    )
    server.add_generic_rpc_handlers((_handlers(servicer),))
    port = add_port(server, listen, settings, "MAAS_AGGREGATOR_LISTEN")
    return server, port


def _handlers(servicer: pb_grpc.TrainingDataPlaneServicer) -> grpc.GenericRpcHandler:
    """``Exchange`` as the generated code registers it, except that messages stay the frames
    they are on the wire, both ways (``maas.training.protocol`` reads and writes them): a shard
    views received tensors in place and serializes each parameter version once for all its
    workers."""
    handler = grpc.stream_stream_rpc_method_handler(servicer.Exchange)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Exchange": handler})


def open_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    """A channel to a shard, TLS as configured. Without the token interceptor: an intercepted
    stream passes every written frame through a queue and a generator of grpc's (and, ended by
    the server, leaves that generator's task pending); ``exchange`` sends the token itself."""
    return open_edge_channel(settings, address, options=_KEEPALIVE, with_token=False)


def exchange(
    channel: grpc.aio.Channel, settings: Settings, frames: Iterable[bytes] | None = None
) -> grpc.aio.StreamStreamCall:
    """An ``Exchange`` stream that writes and reads frames (bytes), not messages, with this
    process's bearer token in its metadata: the caller writes them, or grpc sends ``frames``
    and then closes the caller's side."""
    call = channel.stream_stream(f"/{SERVICE_NAME}/Exchange")
    return call(frames, metadata=call_metadata(settings))


async def token_accepted(address: str, settings: Settings) -> bool | None:
    """Whether the shard at ``address`` takes this process's token, asked with an ``Exchange``
    closed before its first message (a shard ends such a stream at once, OK, with nothing):
    False when it refuses the token, None when it cannot say (unreachable, silent for
    PROBE_TIMEOUT_S, any other status)."""
    async with open_channel(address, settings) as channel:
        call = exchange(channel, settings, frames=())
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                code = await call.code()
        except TimeoutError:
            call.cancel()
            return None
    if code in AUTH_REFUSALS:
        return False
    return True if code == grpc.StatusCode.OK else None
