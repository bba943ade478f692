"""TLS for gRPC from config: servers present MAAS_TLS_CERT_FILE + MAAS_TLS_KEY_FILE, clients
trust MAAS_TLS_CA_FILE (or the system roots). Both sides switch on with MAAS_GRPC_TLS."""

from __future__ import annotations

from pathlib import Path

import grpc

from maas.config import Settings
from maas.errors import InvalidArgument


def read_pem(path: str, setting: str) -> bytes:
    if not path:
        raise InvalidArgument(f"MAAS_GRPC_TLS is on but {setting} is not set")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{setting}={path} cannot be read: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    key = read_pem(settings.tls_key_file, "MAAS_TLS_KEY_FILE")
    cert = read_pem(settings.tls_cert_file, "MAAS_TLS_CERT_FILE")
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials:
    roots = read_pem(settings.tls_ca_file, "MAAS_TLS_CA_FILE") if settings.tls_ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)
