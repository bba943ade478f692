"""The client side of every gRPC edge: channels with TLS (from config) and the bearer token.

    channel = open_channel(settings, settings.registry_addr)        # grpc.aio, token on each call
    stub = ModelRegistryStub(channel)

``call_metadata(settings)`` is the same token as metadata, for clients that attach it per call
(one long-lived stream, tritonclient's ``headers=``), on a channel from
``open_channel(..., with_token=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from maas.config import Settings
from maas.edge.auth import client_token
from maas.edge.tls import channel_credentials

ChannelOption = tuple[str, Any]


def call_metadata(settings: Settings) -> list[tuple[str, str]]:
    """``[("authorization", "Bearer <token>")]``, or ``[]`` when this process has no token."""
    token = client_token(settings)
    return [("authorization", f"Bearer {token}")] if token else []


def channel_options(settings: Settings, extra: Sequence[ChannelOption] = ()) -> list[ChannelOption]:
    limit = settings.grpc_max_message_bytes
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        *extra,
    ]


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._entry)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined,no-any-return]


# grpc.aio files an interceptor under the first kind it is an instance of: one class per kind.
class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` on every kind of call."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def open_channel(
    settings: Settings,
    target: str,
    *,
    options: Sequence[ChannelOption] = (),
    with_token: bool = True,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``: TLS when MAAS_GRPC_TLS, message limits from settings,
    and (``with_token``) this process's bearer token on every call."""
    token = client_token(settings) if with_token else None
    interceptors = bearer_interceptors(token) if token else None
    opts = channel_options(settings, options)
    if settings.grpc_tls:
        return grpc.aio.secure_channel(
            target, channel_credentials(settings), opts, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, opts, interceptors=interceptors)


def open_sync_channel(settings: Settings, target: str) -> grpc.Channel:
    """A blocking channel without a token (health checks, readiness probes), TLS as configured."""
    if settings.grpc_tls:
        return grpc.secure_channel(target, channel_credentials(settings))
    return grpc.insecure_channel(target)
