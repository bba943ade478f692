"""The gRPC edge, one home for every gRPC server and client of the platform.

Servers::

    server = grpc.aio.server(interceptors=[edge_interceptor(settings, observe)],
                             options=server_options(settings))
    port = add_port(server, settings.registry_listen, settings, "MAAS_REGISTRY_LISTEN")
    ...  # in a handler: current_identity().name is who called

Clients::

    channel = open_channel(settings, settings.registry_addr)   # TLS + bearer token

``auth`` (tokens, roles, the token table), ``server`` (interceptor, status mapping, ports),
``client`` (channels, call metadata), ``tls`` (credentials from config).
"""

from maas.edge.auth import (
    ANONYMOUS,
    STACK_IDENTITIES,
    Authorizer,
    Identity,
    Role,
    TokenTable,
    client_token,
    ensure_tokens,
    required_role,
)
from maas.edge.client import call_metadata, open_channel, open_sync_channel
from maas.edge.server import (
    EdgeInterceptor,
    Observer,
    add_port,
    current_identity,
    drain_unread,
    edge_interceptor,
    failure,
    serve_reflection,
    server_options,
    status_for,
)

__all__ = [
    "ANONYMOUS",
    "STACK_IDENTITIES",
    "Authorizer",
    "EdgeInterceptor",
    "Identity",
    "Observer",
    "Role",
    "TokenTable",
    "add_port",
    "call_metadata",
    "client_token",
    "current_identity",
    "drain_unread",
    "edge_interceptor",
    "ensure_tokens",
    "failure",
    "open_channel",
    "open_sync_channel",
    "required_role",
    "serve_reflection",
    "server_options",
    "status_for",
]
