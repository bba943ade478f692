"""The HTTPS listener of the inference HTTP API, which answers plain HTTP with a refusal.

A TLS server that is sent plain HTTP (``curl http://`` to the HTTPS port, an OpenAI client with
an ``http://`` base URL) fails the handshake and closes: the client sees an empty reply, or a
connection error, and nothing says why. Each connection's first byte is looked at before TLS
starts (``MSG_PEEK``: nothing is consumed): a TLS handshake record (0x16) goes on to aiohttp over
TLS; anything else is answered ``400`` in plain HTTP, in the JSON error shape of the API its
path belongs to (``error_body``), saying to use https, and closed. Nothing but that refusal is
ever served in plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TLS_HANDSHAKE = 0x16  # the content type of a TLS record that opens a handshake
REQUEST_LINE_BYTES = 8192  # read for the path of a plain-HTTP request, at most
DRAIN_BYTES = 64 * 1024  # read (and dropped) after the refusal, so the close is no reset
DRAIN_S = 1.0  # each of those two reads waits this long at most

ErrorBody = Callable[[str, str, int], dict[str, Any]]  # (path, message, status) -> JSON body


def plain_error(path: str, message: str, status: int) -> dict[str, Any]:
    return {"error": message}


def refusal_message(port: int) -> str:
    return (
        f"this port ({port}) speaks HTTPS, and the request came as plain HTTP: use an https:// "
        "URL (MAAS_TLS_CA_FILE is the CA that signed the server's certificate)"
    )


def plain_http_refusal(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def request_path(head: bytes) -> str:
    """The path of an HTTP request line (``GET /v1/models HTTP/1.1``), or ``/``."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if len(parts) >= 3 else "/"


class TlsListener:
    """Accepts on ``host:port`` and hands TLS connections to ``protocol_factory`` (aiohttp's
    server); see the module doc. ``idle_timeout_s`` bounds the wait for a first byte."""

    def __init__(
        self,
        host: str,
        port: int,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: ssl.SSLContext,
        idle_timeout_s: float,
        error_body: ErrorBody = plain_error,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=512)
        self._socket.setblocking(False)
        self.port = int(self._socket.getsockname()[1])
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._idle_timeout_s = idle_timeout_s
        self._error_body = error_body
        self._accepting: asyncio.Task[None] | None = None
        self._routing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._accepting = asyncio.create_task(self._accept())

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._routing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._socket.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        failed = 0  # accepts failed in a row: the first is logged, the rest counted
        while True:
            try:
                conn, _ = await loop.sock_accept(self._socket)
            except OSError as exc:  # out of file descriptors, say: not the listener's end
                if not failed:
                    log.warning("HTTPS accept failed (%s); trying again every 0.1 s", exc)
                failed += 1
                await asyncio.sleep(0.1)
                continue
            if failed:
                log.warning("HTTPS accepting again, after %d failed tries", failed)
                failed = 0
            task = asyncio.create_task(self._route(conn))
            self._routing.add(task)
            task.add_done_callback(self._routing.discard)

    async def _route(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            async with asyncio.timeout(self._idle_timeout_s):
                first = await _peek(loop, conn)
            if first and first[0] == TLS_HANDSHAKE:
                # aiohttp owns the connection from here (and closes it).
                await loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
                return
            if first:
                await self._refuse(loop, conn)
        except (OSError, TimeoutError):
            pass  # a handshake that failed, a client gone or silent: nothing to answer
        except Exception:  # one connection's surprise must not go unseen, nor stop the others
            log.exception("HTTPS connection from %s failed", _peer(conn))
        conn.close()

    async def _refuse(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        """Answer in the error shape of the API the request's path belongs to. What the client
        sent is read first, briefly: closing with it unread would reset the connection, and a
        client may then lose the answer."""
        head = b""
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                while len(head) < REQUEST_LINE_BYTES and b"\r\n" not in head:
                    if not (chunk := await loop.sock_recv(conn, REQUEST_LINE_BYTES)):
                        break
                    head += chunk
        body = self._error_body(request_path(head), refusal_message(self.port), 400)
        await loop.sock_sendall(conn, plain_http_refusal(body))
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                drained = 0
                while drained < DRAIN_BYTES and (chunk := await loop.sock_recv(conn, 16384)):
                    drained += len(chunk)


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The connection's first byte, left unread (empty: the client closed)."""
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, wake)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return conn.recv(1, socket.MSG_PEEK)


def _peer(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername())
    except OSError:
        return "a client gone"
