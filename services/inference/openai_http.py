"""OpenAI-compatible HTTP routes for generative models: completions, chat completions, models.

The routes are a thin adapter over the same ``Generators`` the OIP ``ModelStreamInfer`` uses, so
both front doors share one engine (and its slots) per model version. ``stream: true`` answers as
server-sent events, one ``data:`` line per token and ``data: [DONE]`` at the end; a client that
disconnects mid-stream ends the stream, which frees its slot at once.

``model`` is a registry name, optionally ``name@version`` or ``name@alias`` (default
``production``). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
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
from maas.events import clip, shown
from maas.registry import ModelRef
from maas.text.sampling import SamplingParams, Token, prompt_ids
from services.inference.generation import Generators
from services.inference.http_app import (
    HTTP_STATUS,
    authorization_entries,
    checked_expect,
    read_json,
)

if TYPE_CHECKING:
    from maas.edge import Authorizer

log = logging.getLogger(__name__)

Authorize = Callable[[web.Request], object]  # raises Unauthenticated / PermissionDenied
# The gRPC method whose role the HTTP routes need: generating is what ModelStreamInfer does.
GENERATE_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
ROLES = ("system", "developer", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name"})
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
COMPLETION_DEFAULTS = {"max_tokens": 16, "temperature": 1.0}
CHAT_DEFAULTS = {"max_tokens": 64, "temperature": 1.0}
# OpenAI fields that change nothing here at their default values, and those values: one
# choice, no log-probabilities, no penalties, no suffix, free text. Any other value is refused
# by name rather than ignored, since a client that asked for it would read an answer without it.
DEFAULTS_ONLY: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}
# logprobs is a count in completions (0 still asks for the sampled tokens' log-probabilities)
# and a flag in chat.
LOGPROBS_OFF = {False: (None,), True: (None, False)}  # by chat
SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "logit_bias"})  # fmt: skip
COMMON = SAMPLING | {"model", "stream", "stream_options", "user", "n", "presence_penalty",
                     "frequency_penalty", "logprobs"}  # fmt: skip
# Each endpoint's own fields: one sent to the other endpoint is refused, not ignored (a chat
# body's ``prompt`` or a completion's ``messages`` was dropped without a word).
FIELDS = {
    False: COMMON | {"prompt", "echo", "suffix", "best_of"},
    True: COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"},
}
PATHS = {False: "/v1/completions", True: "/v1/chat/completions"}


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


def _split_model(model: Any) -> tuple[str, str]:
    """The body's ``model`` read as ``ModelRef.parse`` reads a ref everywhere else -> (name,
    the version or alias the data plane resolves: "" for the name's default)."""
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model must be a model name, e.g. 'gpt' or 'gpt@production'")
    try:
        ref = ModelRef.parse(model)
    except InvalidArgument as refused:
        raise InvalidArgument(f"model: {refused}") from None
    return ref.name, str(ref.version) if ref.version is not None else ref.alias or ""


def _sampling(body: Mapping[str, Any], *, chat: bool) -> SamplingParams:
    _check_fields(body, chat)
    for flag in ("stream", "echo"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise InvalidArgument(f"{flag}={_json(body[flag])} must be true or false")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidArgument(f"user={_json(body['user'])} must be a string")
    defaults = CHAT_DEFAULTS if chat else COMPLETION_DEFAULTS
    fields = dict(body)
    if fields.get("max_completion_tokens") is None:
        return SamplingParams.from_request(fields, **defaults)
    if fields.get("max_tokens") is not None:
        raise InvalidArgument(
            "max_completion_tokens and max_tokens are the same limit: send one of them"
        )
    fields["max_tokens"] = fields["max_completion_tokens"]
    try:
        return SamplingParams.from_request(fields, **defaults)
    except InvalidArgument as exc:  # the field the client sent, not the one it maps to
        raise InvalidArgument(exc.message.replace("max_tokens", "max_completion_tokens")) from None


def _check_fields(body: Mapping[str, Any], chat: bool) -> None:
    unknown = sorted(set(body) - FIELDS[chat])
    if unknown:
        elsewhere = [f for f in unknown if f in FIELDS[not chat]]
        where = f" (they belong to {PATHS[not chat]})" if elsewhere == unknown else ""
        raise InvalidArgument(  # led by a field's name: OpenAI's error names it as ``param``
            f"{unknown[0]}: unknown request fields {shown(unknown, 200)} for {PATHS[chat]}{where}"
        )
    limits = {**DEFAULTS_ONLY, "logprobs": LOGPROBS_OFF[chat]}
    for field, accepted in limits.items():
        if field in body and not any(_same(body[field], value) for value in accepted):
            send = f" or send {json.dumps(accepted[1])}" if len(accepted) > 1 else ""
            raise InvalidArgument(
                f"{field}={_json(body[field])} is not supported by this server: leave {field} "
                f"out{send}"
            )


def _json(value: object) -> str:
    return clip(json.dumps(value), 80)


def _same(value: object, default: object) -> bool:
    """Equal and of the same kind: ``true`` is not the count 1, nor ``1.0`` the flag true."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def include_usage(body: Mapping[str, Any]) -> bool:
    """``stream_options: {"include_usage": true}``: a last chunk carries the token counts."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise InvalidArgument("stream_options is only read with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidArgument(
            f"stream_options={shown(options, 80)} must be an object with include_usage only"
        )
    flag = options.get("include_usage", False)
    if not isinstance(flag, bool):
        raise InvalidArgument(f"stream_options.include_usage={shown(flag, 80)} must be a boolean")
    return flag


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "maas"}


def completion_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise InvalidArgument("prompt is required: the text to continue, one string")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise InvalidArgument("prompt must be text: token ids are not taken; send the string")
    raise InvalidArgument(
        f"prompt={_json(prompt)} must be one string (lists of prompts are not supported)"
    )


def chat_prompt(body: Mapping[str, Any]) -> str:
    """Messages as one text the model continues: ``role: content`` lines, then ``assistant:``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content}")
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}] must be an object {{role, content}}")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise InvalidArgument(
                f"messages[{i}] has unknown keys {shown(unknown, 120)}; a message takes "
                f"{sorted(MESSAGE_KEYS)}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role={role!r}: accepted roles are {list(ROLES)}")
        speaker = role if message.get("name") is None else f"{role} {_name(message['name'], i)}"
        lines.append(f"{speaker}: {_content(message.get('content'), i)}")
    return "\n".join(lines) + "\nassistant:"


def _name(name: object, i: int) -> str:
    """A participant's name, which the text says beside the role (OpenAI: 1-64 letters,
    digits, '_' or '-')."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidArgument(
            f"messages[{i}].name={_json(name)} must be 1 to 64 letters, digits, '_' or '-'"
        )
    return name


def _content(content: object, i: int) -> str:
    """A string, or OpenAI's list of content parts of which only ``text`` parts fit a text model."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise InvalidArgument(
        f"messages[{i}].content must be a string or a list of "
        '{"type": "text", "text": "..."} parts (a text model takes no other kind)'
    )


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
        name, ref = _split_model(model)
        await self._generators.engine(name, ref)  # NotFound (404) or not generative (400)
        return web.json_response(_model_object(model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._check(request)
        params = _sampling(body, chat=False)
        return await self._answer(request, body, completion_prompt(body), params, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._check(request)
        params = _sampling(body, chat=True)
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
        name, ref = _split_model(body.get("model"))
        engine = await self._generators.engine(name, ref)
        shape = _Shape(str(body["model"]), chat, len(prompt_ids(prompt, engine.block_size)))
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

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model = model
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
