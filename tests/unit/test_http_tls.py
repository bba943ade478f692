"""The HTTPS listener: TLS clients reach the application; a plain-HTTP request gets a 400 in
plain HTTP saying to use https (not the empty reply of a failed handshake); a silent or broken
connection is closed without holding the listener."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.inference.http_tls import (
    TlsListener,
    plain_http_refusal,
    refusal_message,
    request_path,
)

IDLE_S = 0.3


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (``cert.pem``, ``key.pem``)."""
    directory = tmp_path_factory.mktemp("http-tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=test",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory


@pytest.fixture
async def listener(certificate: Path) -> AsyncIterator[TlsListener]:
    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hello")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    tls = TlsListener("127.0.0.1", 0, web.Server(hello), context, IDLE_S)
    tls.start()
    try:
        yield tls
    finally:
        await tls.stop()


async def https_get(port: int, certificate: Path) -> tuple[int, str]:
    trust = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/", ssl=trust) as reply,
    ):
        return reply.status, await reply.text()


async def test_a_tls_client_reaches_the_application(
    listener: TlsListener, certificate: Path
) -> None:
    assert await https_get(listener.port, certificate) == (200, "hello")


async def test_accepts_failing_in_a_row_log_once_and_once_more_when_they_work_again(
    listener: TlsListener,
    certificate: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    accept, failures = loop.sock_accept, 5

    async def out_of_files_at_first(sock: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await accept(sock)

    caplog.set_level(logging.WARNING, "services.inference.http_tls")
    monkeypatch.setattr(loop, "sock_accept", out_of_files_at_first)
    for _ in range(2):  # the first may be taken by an accept that started before the patch
        assert await https_get(listener.port, certificate) == (200, "hello")
    assert [r.getMessage() for r in caplog.records] == [
        "HTTPS accept failed ([Errno 24] Too many open files); trying again every 0.1 s",
        "HTTPS accepting again, after 5 failed tries",
    ]


async def test_plain_http_gets_a_400_saying_to_use_https(listener: TlsListener) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{listener.port}/v1/models") as reply,
    ):
        status, body = reply.status, await reply.json()
    assert status == 400
    assert f"this port ({listener.port}) speaks HTTPS" in body["error"]
    assert "use an https:// URL" in body["error"]


async def test_a_silent_connection_is_closed_after_the_idle_timeout(
    listener: TlsListener, certificate: Path
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    assert await https_get(listener.port, certificate) == (200, "hello")  # not held up by it
    assert await asyncio.wait_for(reader.read(), 5 * IDLE_S) == b""
    writer.close()


async def test_a_broken_handshake_is_closed_and_the_listener_goes_on(
    listener: TlsListener, certificate: Path
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"\x16\x03\x01\x00\x05hello")  # a handshake record holding no ClientHello
    await writer.drain()
    closing = await asyncio.wait_for(reader.read(), 5)  # read to the end: it was closed
    assert closing == b"" or closing[0] == 0x15  # at most a TLS alert first
    writer.close()
    assert await https_get(listener.port, certificate) == (200, "hello")


def test_the_refusal_is_http_with_a_json_body_of_its_length() -> None:
    head, _, body = plain_http_refusal({"error": refusal_message(8443)}).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert f"Content-Length: {len(body)}".encode() in head
    assert "this port (8443) speaks HTTPS" in json.loads(body)["error"]


def test_the_refusal_takes_the_shape_of_the_api_the_path_belongs_to() -> None:
    assert request_path(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n") == (
        "/v1/chat/completions"
    )
    assert request_path(b"\x00garbage") == "/"
