"""TLS from config: what a server refuses to start with names the setting and says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas.config import Settings
from maas.edge.tls import server_credentials, server_ssl_context
from maas.errors import InvalidArgument

MAKERS = [server_credentials, server_ssl_context]


@pytest.mark.parametrize("make", MAKERS)
def test_tls_without_a_certificate_names_the_setting(make) -> None:
    with pytest.raises(InvalidArgument, match="MAAS_GRPC_TLS is on but MAAS_TLS_KEY_FILE"):
        make(Settings(grpc_tls=True))


@pytest.mark.parametrize("make", MAKERS)
def test_an_unreadable_certificate_names_the_file(make, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text("not a key")
    settings = Settings(
        grpc_tls=True, tls_key_file=str(key), tls_cert_file=str(tmp_path / "missing.pem")
    )
    with pytest.raises(InvalidArgument, match=r"MAAS_TLS_CERT_FILE=.*missing.pem cannot be read"):
        make(settings)


def test_https_refuses_files_that_are_no_pem_chain_and_key(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    key.write_text("not a key")
    settings = Settings(grpc_tls=True, tls_cert_file=str(cert), tls_key_file=str(key))
    with pytest.raises(InvalidArgument, match="are not a PEM certificate chain and its private"):
        server_ssl_context(settings)
