"""The inference service's HTTP listener: one aiohttp application that route modules add to.

A module that serves HTTP (the OpenAI-compatible API, the OIP REST endpoints) exposes an object
with ``add_to(app)``, the path ``prefix`` it serves and its ``error_body`` shape; the server calls
``add`` for each before ``start`` and owns the listener's lifetime. Handlers run on the server's
event loop, beside the gRPC server. What aiohttp itself refuses (no such route, a method the route
does not take, a body over the limit) is answered in the error shape of the module whose prefix
the path has, so every client gets JSON it can parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from maas.edge.auth import redact_credentials
from maas.errors import Cancelled, InvalidArgument, MaasError, ResourceExhausted
from maas.events import clip
from maas.names import small_number
from services.inference.http_tls import TlsListener

log = logging.getLogger(__name__)

# Bodies above this are parsed on a worker thread, which keeps the event loop turning between
# the parser's own steps; json.loads holds the GIL throughout, though, so the size of a JSON
# document is bounded too (MAX_JSON_BYTES: ~0.1 s of parsing a MiB on this machine).
THREADED_PARSE_BYTES = 256 * 1024
DEFAULT_MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_JSON_BYTES = web.AppKey("max_json_bytes", int)
# A client that opens a request and sends its body slowly, or never, holds a connection and a
# handler; these bound how long (nginx's defaults are 60 s for a body and 75 s idle).
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_IDLE_TIMEOUT_S = 75.0
# After answering a request whose body it did not read to the end (refused, or over the size
# limit), aiohttp reads and drops the rest for this long, so the client reads the answer rather
# than a reset; a gzip/deflate remainder is inflated as it is read, on the event loop. aiohttp's
# 10 s let one 16 MiB gzip upload stall every other request for 10 s after its 413.
LINGER_S = 1.0
# Every connection's handler: no access log (the service's metrics count requests).
HANDLER_OPTIONS: dict[str, Any] = {"access_log": None, "lingering_time": LINGER_S}
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


# What aiohttp logs at ERROR with a traceback although the client caused it: a request line or
# header over its limits, a body it cannot decode (raised again while it drains the rest of the
# body after the answer), a connection lost mid-request.
CLIENT_FAULTS = (HttpProcessingError, web.RequestPayloadError, ConnectionResetError)


class ClientFaultsAsInfo(logging.Filter):
    """Turns aiohttp's ERROR records about a client's own faults into one INFO line (no
    traceback): a client cannot fill the server's log with tracebacks by sending garbage."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CLIENT_FAULTS):
            said = parser_reason(" ".join(str(exc).split()))  # aiohttp's texts span lines
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {said}"
            record.args = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def quiet_client_faults() -> None:
    """Install ``ClientFaultsAsInfo`` on aiohttp's server logger, once per process."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientFaultsAsInfo) for f in server_log.filters):
        server_log.addFilter(ClientFaultsAsInfo())


def parser_reason(message: str) -> str:
    """An HTTP parser's refusal without the request's bytes it quotes (from the first quote
    on): a folded ``Authorization`` header is quoted as its continuation line alone, the token
    and nothing that names it. What is left says what was wrong."""
    # A quote opens a quoted literal at the start or after a space or colon; one inside a word
    # is an apostrophe ("can't be present with Content-Length" was cut to "can").
    reason = re.split(r"""(?:^|(?<=[\s:=(\[]))b?['"]""", message, maxsplit=1)[0]
    reason = reason.rstrip(" :\n\t")
    cut = "" if reason == message else " (the request's bytes are withheld)"
    return redact_credentials(reason) + cut


class _Connection(web.RequestHandler):
    """aiohttp's handler of one connection, but what it refuses before any route runs (a
    request it cannot parse) is answered as JSON and quotes no credential: the parser's message
    holds the raw header bytes, the bearer token among them (a request with LF-only line ends
    had its token echoed in the 400 and written to the log)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500 or message is None:
            return super().handle_error(request, status, exc, message)
        withheld = parser_reason(message)
        response = super().handle_error(request, status, exc, withheld)
        if isinstance(response, web.Response):
            response.text = json.dumps({"error": withheld})
            response.content_type = "application/json"
        return response


class Routes(Protocol):
    prefix: str  # e.g. "/v1": the paths whose refusals take this module's error shape

    def add_to(self, app: web.Application) -> None: ...

    def error_body(self, message: str, status: int) -> dict[str, Any]: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 413,  # what the inference edges run out of is room for a request
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,  # the client closed the connection (nginx's code): no one reads it
}


class HttpServer:
    def __init__(
        self,
        listen: str,
        *,
        setting: str = "MAAS_INFERENCE_HTTP_LISTEN",
        max_body_bytes: int = 1024 * 1024,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        for name, seconds in (("BODY", body_timeout_s), ("IDLE", idle_timeout_s)):
            if not seconds > 0:
                raise InvalidArgument(f"MAAS_INFERENCE_HTTP_{name}_TIMEOUT_S={seconds} must be > 0")
        host, sep, port_text = listen.rpartition(":")
        port = small_number(port_text, max_digits=5)
        if not sep or port is None or port > 65535:
            raise InvalidArgument(
                f"{setting}={listen!r} must be host:port with a port from 0 to 65535, e.g. "
                "127.0.0.1:8000"
            )
        self._host, self._port, self._setting = host.strip("[]") or "0.0.0.0", port, setting
        self._routes: list[Routes] = []
        self.app = web.Application(
            client_max_size=max_body_bytes, middlewares=[self._json_refusals]
        )
        self.app[MAX_JSON_BYTES] = max_json_bytes
        self.app[MAX_BODY_BYTES] = max_body_bytes
        self.app[BODY_TIMEOUT_S] = body_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        self._tls: TlsListener | None = None  # with TLS: the listener (see http_tls)
        self._plain: asyncio.Server | None = None  # without TLS: the listener
        self.port = 0

    def add(self, routes: Routes) -> None:
        routes.add_to(self.app)
        self._routes.append(routes)

    @web.middleware
    async def _json_refusals(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = self._error_body(request.path, _refusal(request, exc), exc.status)
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            response = web.json_response(body, status=exc.status, headers=headers)
            if exc.headers.get("Connection", "").lower() == "close":
                response.force_close()
            return response

    def _error_body(self, path: str, message: str, status: int) -> dict[str, Any]:
        for routes in self._routes:
            if path == routes.prefix or path.startswith(routes.prefix + "/"):
                return routes.error_body(message, status)
        return {"error": message}

    async def start(self) -> None:
        quiet_client_faults()
        # A client that leaves cancels its handler, so what it asked stops with it: a
        # non-streaming completion went on generating every token for nobody (1 500 departed
        # clients cost 185 607 tokens and the next caller 16 s).
        self._runner = web.AppRunner(self.app, handler_cancellation=True)
        await self._runner.setup()
        try:
            self.port = await self._listen(self._runner)
        except OSError as exc:
            await self._runner.cleanup()
            raise InvalidArgument(f"cannot bind {self._setting}: {exc}") from None
        scheme = "HTTPS" if self._ssl_context else "HTTP"
        log.info("inference %s on %s:%d", scheme, self._host, self.port)

    async def _listen(self, runner: web.AppRunner) -> int:
        """Start accepting; the port (port 0 binds a free one: the one the listener got)."""
        server = runner.server
        assert server is not None  # set up
        loop = asyncio.get_running_loop()

        def connection() -> _Connection:
            # aiohttp's keep-alive timer also runs while a request's headers are still
            # arriving, so it closes a connection that never completes them.
            idle = self._idle_timeout_s
            return _Connection(server, loop=loop, keepalive_timeout=idle, **HANDLER_OPTIONS)

        if self._ssl_context is None:
            self._plain = await loop.create_server(connection, self._host, self._port, backlog=512)
            return int(self._plain.sockets[0].getsockname()[1])
        self._tls = TlsListener(
            self._host,
            self._port,
            connection,
            self._ssl_context,
            self._idle_timeout_s,
            error_body=self._error_body,
        )
        self._tls.start()
        return self._tls.port

    async def stop(self) -> None:
        if self._plain is not None:
            self._plain.close()
            self._plain = None
        if self._tls is not None:
            await self._tls.stop()
            self._tls = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _refusal(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        paths = sorted({r.canonical for r in request.app.router.resources()})
        return f"no endpoint {request.path!r}; the endpoints are {', '.join(paths)}"
    if exc.status == 405:
        return f"{request.path} does not take {request.method}; it takes {exc.headers.get('Allow')}"
    if exc.status == 413:
        return too_large(exc)
    return exc.text or exc.reason


def too_large(exc: web.HTTPException) -> str:
    return (
        f"the request body is over the server's limit ({exc.text}); send smaller requests, "
        "use gRPC, or raise MAAS_INFERENCE_HTTP_MAX_BODY_BYTES"
    )


def authorization_entries(request: web.Request) -> list[tuple[str, str]]:
    """The request's ``Authorization`` headers as the gRPC edge's metadata (all of them: the
    edge refuses a call with more than one)."""
    return [("authorization", value) for value in request.headers.getall("Authorization", [])]


# What aiohttp decodes; any other coding it hands over as is, and that was read as plain JSON.
CONTENT_ENCODINGS = ("identity", "gzip", "deflate")


def check_content_encoding(request: web.Request) -> None:
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in CONTENT_ENCODINGS:
        raise InvalidArgument(
            f"Content-Encoding {clip(coding, 40)!r} is not one this server decodes; send the "
            f"body as one of {', '.join(CONTENT_ENCODINGS)}"
        )


async def read_body(request: web.Request) -> bytes:
    """The request's body; one aiohttp cannot decode is InvalidArgument, one that does not arrive
    within the server's body timeout is a 408 that closes the connection."""
    check_declared_length(request)
    check_content_encoding(request)
    timeout = request.app.get(BODY_TIMEOUT_S, DEFAULT_BODY_TIMEOUT_S)
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=(
                f"the request body did not arrive within {timeout:g} s "
                f"(MAAS_INFERENCE_HTTP_BODY_TIMEOUT_S); send it in one go, or raise the setting"
            ),
            headers={"Connection": "close"},
        ) from None
    except web.RequestPayloadError as exc:  # an unknown content-encoding, a broken chunk
        raise InvalidArgument(
            f"the request body cannot be read ({exc}); send it plain or gzip/deflate-encoded"
        ) from None
    except ConnectionResetError:
        raise Cancelled("the client closed the connection before its body arrived") from None


def parse_json(data: bytes | memoryview) -> Any:
    """A JSON document, or InvalidArgument saying why not."""
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        if "integer string conversion" in str(exc):  # Python's own advice is for the server
            digits = sys.get_int_max_str_digits()
            raise InvalidArgument(
                f"the request body holds a whole number of more than {digits} digits; no field "
                "takes one"
            ) from None
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(
            "the request body nests JSON arrays or objects deeper than the server reads"
        ) from None


async def off_loop_if_large(size: int, work: Callable[[], Any]) -> Any:
    """``work()`` here for a small body, on a worker thread for a large one."""
    if size > THREADED_PARSE_BYTES:
        return await asyncio.to_thread(work)
    return work()


def check_json_size(request: web.Request, size: int) -> None:
    """ResourceExhausted (413) for a JSON document over the server's MAX_JSON_BYTES."""
    limit = request.app.get(MAX_JSON_BYTES, DEFAULT_MAX_JSON_BYTES)
    if size > limit:
        raise ResourceExhausted(
            f"the request's JSON is {size} bytes, over MAAS_INFERENCE_HTTP_MAX_JSON_BYTES={limit} "
            "(the server answers nothing else while it parses JSON); send tensors as binary "
            "data (Inference-Header-Content-Length) or over gRPC"
        )


def check_declared_length(request: web.Request) -> None:
    """A 413 at once for a body whose Content-Length is over the limit: aiohttp would read up
    to the limit first, and wait for the rest of a length no client will ever send."""
    limit, declared = request.app.get(MAX_BODY_BYTES), request.content_length
    if limit is not None and declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit,
            text=f"Content-Length {declared} is over {limit} bytes",
            headers={"Connection": "close"},
        )


async def read_json(request: web.Request) -> Any:
    data = await read_body(request)
    check_json_size(request, len(data))
    return await off_loop_if_large(len(data), lambda: parse_json(data))


def checked_expect(
    check: Callable[[web.Request], object], error_body: Callable[[str, int], dict[str, Any]]
) -> ExpectHandler:
    """An ``Expect: 100-continue`` handler that runs the route's token ``check`` before it
    invites the body (aiohttp's own says 100 Continue to anyone): a client without a valid token
    is refused before it uploads megabytes, in the route's error shape."""

    def refuse(message: str, status: int) -> web.StreamResponse:
        response = web.json_response(error_body(message, status), status=status)
        response.force_close()  # the body the client held back is never read
        return response

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None  # HTTP/1.0 has no interim responses: the body simply follows
        value = request.headers.get("Expect", "")
        if value.lower() != "100-continue":
            return refuse(f"Expect: {value!r} is not supported; send 100-continue or none", 417)
        try:
            check(request)
            check_declared_length(request)
        except MaasError as exc:
            return refuse(exc.message, HTTP_STATUS.get(exc.grpc_code, 500))
        except web.HTTPRequestEntityTooLarge as exc:
            return refuse(too_large(exc), exc.status)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim line is not part of the response's size
        return None

    return expect
