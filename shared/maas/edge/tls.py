"""TLS from config: servers present MAAS_TLS_CERT_FILE + MAAS_TLS_KEY_FILE, clients trust
MAAS_TLS_CA_FILE (or the system roots). Both sides switch on with MAAS_GRPC_TLS, which also puts
the inference HTTP API (OIP REST, OpenAI) on HTTPS with the same certificate: its callers send
the same bearer tokens."""

from __future__ import annotations

import ssl
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


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The HTTPS side of ``server_credentials``: the same certificate and key, TLS 1.2 or later."""
    # Read first for the same refusals as gRPC's: a setting not set, a file that cannot be read.
    read_pem(settings.tls_key_file, "MAAS_TLS_KEY_FILE")
    read_pem(settings.tls_cert_file, "MAAS_TLS_CERT_FILE")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidArgument(
            f"MAAS_TLS_CERT_FILE={settings.tls_cert_file} and MAAS_TLS_KEY_FILE="
            f"{settings.tls_key_file} are not a PEM certificate chain and its private key ({exc})"
        ) from None
    return context
