"""The gRPC edge of the training data plane: one way to build the shard's server and the
worker's channel, so auth and TLS plug in at a single seam (``interceptors``, ``credentials``).

Keepalive pings on both sides make a peer that vanished without closing its connection (a
powered-off host) look like a closed stream within seconds; a killed process is seen at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from maas.config import Settings
from maas.training.v1 import training_pb2_grpc as pb_grpc

SERVICE_NAME = "maas.training.v1.TrainingDataPlane"
_KEEPALIVE_MS = 2_000


def _options(settings: Settings) -> list[tuple[str, int]]:
    limit = settings.grpc_max_message_bytes
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", _KEEPALIVE_MS // 2),
        ("grpc.http2.min_time_between_pings_ms", _KEEPALIVE_MS // 2),
        # A second shard on a taken port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
    ]


def build_server(
    servicer: pb_grpc.TrainingDataPlaneServicer,
    settings: Settings,
    listen: str,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The data-plane server bound to ``listen`` (not started) and the port it got."""
    server = grpc.aio.server(interceptors=list(interceptors), options=_options(settings))
    pb_grpc.add_TrainingDataPlaneServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    return server, port


def open_channel(
    address: str, settings: Settings, *, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=_options(settings))
    return grpc.aio.secure_channel(address, credentials, options=_options(settings))
