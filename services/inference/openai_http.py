"""OpenAI-compatible HTTP routes for generative models: completions, chat completions, models.

The routes are a thin adapter over the same ``Generators`` the OIP ``ModelStreamInfer`` uses, so
both front doors share one engine (and its slots) per model version. ``stream: true`` answers as
server-sent events, one ``data:`` line per token and ``data: [DONE]`` at the end; a client that
disconnects mid-stream ends the stream, which frees its slot at once.

``model`` is a registry name, optionally ``name@version`` or ``name@alias`` (default
``production``); a split alias draws a version per request, sticky by the ``maas-routing-key``
header, and every answer names the version that answered as ``system_fingerprint``
(``name@version``). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
with the HTTP status of the ``MaasError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from maas.edge import failure
from maas.errors import InvalidArgument, MaasError
from maas.text.sampling import SamplingParams, Token, prompt_ids
from services.inference.canary import ROUTING_KEY
from services.inference.generation import Generators
from services.inference.http_app import (
    HTTP_STATUS,
    authorization_entries,
    checked_expect,
    read_json,
)
from services.inference.openai_request import (
    chat_prompt,
    completion_prompt,
    include_usage,
    sampling,
    split_model,
)

if TYPE_CHECKING:
    from maas.edge import Authorizer

log = logging.getLogger(__name__)

Authorize = Callable[[web.Request], object]  # raises Unauthenticated / PermissionDenied
# The gRPC method whose role the HTTP routes need: generating is what ModelStreamInfer does.
GENERATE_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    param = _param_of(message) if status == 400 else None
    code = "model_not_found" if status == 404 else None  # OpenAI's, for an unknown model
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# A refusal starts with the request field it is about ("temperature=3 must be ...",
# "messages[1].role='x': ..."), which OpenAI's error shape carries as ``param``.
_PARAM = re.compile(r"([A-Za-z_]\w*(?:\[\d+\])?(?:\.\w+)*)(?:=|\s+must\b|:)")


def _param_of(message: str) -> str | None:
    found = _PARAM.match(message)
    return found.group(1) if found else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def openai_errors(handler: Handler) -> Handler:
    """A failure -> OpenAI's error shape: a MaasError with its message and the matching HTTP
    status, anything else 500 carrying only a request id (``maas.edge.failure``), as over gRPC.
    aiohttp's own refusals (``HTTPException``) go on to the listener's JSON refusals."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            code, message = failure(exc, f"http {request.method} {request.path}")
            status = HTTP_STATUS.get(code.name, 500)
            return web.json_response(error_body(message, status), status=status)

    return handle


def bearer_auth(authorizer: Authorizer) -> Authorize:
    """The gRPC edge's token check on the ``Authorization`` header (same tokens, same roles)."""

    def authorize(request: web.Request) -> object:
        return authorizer.authorize(GENERATE_METHOD, authorization_entries(request))

    return authorize


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "maas"}


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class OpenAIRoutes:
    """The handlers; ``add_to(app)`` registers them on the server's aiohttp application."""

    prefix = "/v1"

    def __init__(self, generators: Generators, authorize: Authorize | None = None) -> None:
        self._generators = generators
        self._authorize = authorize

    def error_body(self, message: str, status: int) -> dict[str, Any]:
        return error_body(message, status)

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", openai_errors(self.models))
        app.router.add_get("/v1/models/{model}", openai_errors(self.model))
        expect = checked_expect(self._authorized, error_body)
        for path, handler in (
            ("/v1/completions", self.completions),
            ("/v1/chat/completions", self.chat_completions),
        ):
            app.router.add_post(path, openai_errors(handler), expect_handler=expect)

    def _authorized(self, request: web.Request) -> object:
        return self._authorize(request) if self._authorize is not None else None

    async def _check(self, request: web.Request) -> dict[str, Any]:
        self._authorized(request)
        if request.method != "POST":
            return {}
        body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return body

    async def models(self, request: web.Request) -> web.Response:
        await self._check(request)
        data = [_model_object(name) for name in self._generators.names()]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """One model (``client.models.retrieve``): one the server can generate with now or
        load for a request (a gpt version in the registry)."""
        await self._check(request)
        model = request.match_info["model"]
        name, ref = split_model(model)
        await self._generators.engine(name, ref)  # NotFound (404) or not generative (400)
        return web.json_response(_model_object(model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._check(request)
        params = sampling(body, chat=False)
        return await self._answer(request, body, completion_prompt(body), params, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._check(request)
        params = sampling(body, chat=True)
        return await self._answer(request, body, chat_prompt(body), params, chat=True)

    async def _answer(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        prompt: str,
        params: SamplingParams,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        usage = include_usage(body)
        echo = body.get("echo") is True and not chat  # chat has no echo: OpenAI's is completions'
        name, ref = split_model(body.get("model"))
        # A split alias draws a version per request, sticky by the header (as gRPC metadata).
        engine = await self._generators.engine(name, ref, request.headers.get(ROUTING_KEY, ""))
        answering = f"{engine.model_name}@{engine.model_version}"
        read = len(prompt_ids(prompt, engine.block_size))
        shape = _Shape(str(body["model"]), chat, read, answering)
        tokens = engine.stream(prompt, params)
        if body.get("stream"):
            return await self._stream(request, shape, tokens, prompt if echo else "", usage)
        async with contextlib.aclosing(tokens):
            pieces = [token async for token in tokens]
        return web.json_response(shape.whole(pieces, prompt if echo else ""))

    async def _stream(
        self,
        request: web.Request,
        shape: _Shape,
        tokens: AsyncGenerator[Token, None],
        echoed: str,
        usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        async with contextlib.aclosing(tokens):
            first = await anext(tokens)  # errors before the first token still get a status
            try:
                await response.prepare(request)
                if shape.chat:
                    await response.write(_sse(shape.chunk({"role": "assistant", "content": ""})))
                if echoed:
                    await response.write(_sse(shape.piece(Token(-1, echoed))))
                token: Token | None = first
                count = 0
                while token is not None:
                    await response.write(_sse(shape.piece(token)))
                    count += 1
                    token = await anext(tokens, None)
                if usage:
                    await response.write(_sse(shape.usage_chunk(count)))
                await response.write(_sse("[DONE]"))
                await response.write_eof()
            except ConnectionResetError:  # the client left: ordinary, and its slot is freed
                log.debug("a %s stream's client left before its end", shape.model)
            except MaasError as exc:  # past the status line: the stream itself says it failed
                await _end_with_error(response, exc, request)
        return response


async def _end_with_error(
    response: web.StreamResponse, exc: MaasError, request: web.Request
) -> None:
    """End a started stream with an error event, as OpenAI does (its client raises it): the
    decode loop died mid-answer, and the stream was cut without an end or a reason."""
    code, message = failure(exc, f"http {request.method} {request.path}")
    with contextlib.suppress(ConnectionResetError):
        await response.write(_sse(error_body(message, HTTP_STATUS.get(code.name, 500))))
        await response.write_eof()


class _Shape:
    """OpenAI's response objects for one request (ids, timestamps, usage)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, answering: str) -> None:
        self.model = model
        self.fingerprint = answering  # the version that answers, as name@version
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, **choice}],
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk", {"delta": delta, "finish_reason": finish})

    def piece(self, token: Token) -> dict[str, Any]:
        if self.chat:
            return self.chunk({"content": token.text}, token.finish)
        return self._envelope(
            "text_completion", {"text": token.text, "logprobs": None, "finish_reason": token.finish}
        )

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        """The last chunk of a stream with ``include_usage``: no choices, the counts."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = self._envelope(obj, {})
        chunk["choices"] = []
        chunk["usage"] = self._usage(completion_tokens)
        return chunk

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def whole(self, tokens: list[Token], echoed: str = "") -> dict[str, Any]:
        text = echoed + "".join(t.text for t in tokens)
        finish = tokens[-1].finish if tokens else None
        if self.chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text, "logprobs": None}
        reply = self._envelope(self.object, {**choice, "finish_reason": finish})
        reply["usage"] = self._usage(len(tokens))
        return reply
