"""What the inference HTTP listener refuses before any route runs (a request aiohttp cannot
parse): a JSON answer that quotes no credential, and a log line that quotes none either."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from services.inference.http_app import HttpServer, parser_reason

TOKEN = "maas_SECRETmarker0123456789"

MALFORMED = {
    "LF-only line ends": f"GET /v2 HTTP/1.1\nHost: x\nAuthorization: Bearer {TOKEN}\n\n",
    "a folded header": (
        f"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n {TOKEN}\r\n"
        "Connection: close\r\n\r\n"
    ),
    "a control byte in the header": (
        f"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x01\r\n\r\n"
    ),
    "a bare CR after the header": (
        f"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\rX: y\r\n\r\n"
    ),
}


@pytest.fixture
async def port() -> AsyncIterator[int]:
    http = HttpServer("127.0.0.1:0")
    await http.start()
    try:
        yield http.port
    finally:
        await http.stop()


async def exchange(port: int, request: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("request_text", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_request_the_parser_refuses_gets_json_that_quotes_no_token(
    port: int, request_text: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        answer = await exchange(port, request_text)
        await asyncio.sleep(0.1)  # the refusal's log line
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"
    assert b"application/json" in head
    assert "error" in json.loads(body)
    assert TOKEN.encode() not in answer
    assert TOKEN not in caplog.text and "withheld" in caplog.text


def test_a_parsers_reason_loses_the_quoted_bytes_not_its_apostrophes() -> None:
    whole = "Transfer-Encoding can't be present with Content-Length"
    assert parser_reason(whole) == whole
    quoted = f"Invalid header value char: b'Bearer {TOKEN}'"
    assert parser_reason(quoted) == "Invalid header value char (the request's bytes are withheld)"
    assert parser_reason(f'Bad status line "{TOKEN}"').startswith("Bad status line (")


async def test_a_well_formed_request_is_still_served(port: int) -> None:
    answer = await exchange(
        port, "GET /v2/nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 404")
