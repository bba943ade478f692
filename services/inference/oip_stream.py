"""OIP ``ModelStreamInfer`` for generative models: one response per token, the last flagged final.

A request names a GPT version and carries the prompt as a ``BYTES`` input ``text_input`` (shape
[1]); sampling settings are request parameters (``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed`` — numbers may be sent as text, since tritonclient's parameters carry only
str, int and bool —, ``stop`` as a string or a JSON list of strings, and ``logit_bias`` as a JSON
object of token id -> bias, as in the OpenAI API); a split alias's ``maas-routing-key`` comes as a
parameter or as call metadata, as on ModelInfer. Each token comes back as
a ``ModelInferResponse`` with outputs ``text_output`` (BYTES [1], the text it released) and
``token_id`` (INT64 [1]) and the parameter ``triton_final_response`` (true on the last one, which
also carries ``finish_reason``), as Triton's decoupled models answer. With the request parameter
``triton_enable_empty_final_response`` (tritonclient's ``enable_empty_final_response``) every
token is non-final and an empty response closes the request.

Several requests may share one stream; they decode concurrently. A request that fails answers
``error_message`` and the stream goes on. When the client cancels the stream, every request on
it stops and its slot is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeAlias

from maas.edge import failure
from maas.errors import InvalidArgument
from maas.events import clip
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.text import wire
from maas.text.sampling import SamplingParams, Token
from maas.training.frames import length_delimited
from services.inference.canary import ROUTING_KEY, routing_key
from services.inference.generation import GenerationEngine, Generators
from services.inference.tensors import RAW_OUTPUT_CONTENTS, decode_inputs

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
# A model reads only its prompt's last block_size - 1 bytes; a bigger one is refused before it
# is decoded (copying and checking 50 MiB stalled every client for seconds). The OpenAI door's
# prompts are bounded by its JSON body limit instead (MAAS_INFERENCE_HTTP_MAX_JSON_BYTES).
MAX_PROMPT_BYTES = 1 << 20
# Every token's response carries the request's id: a 20 MiB id came back 124 times.
MAX_REQUEST_ID_CHARS = 1024
MAX_NUMBER_TEXT = 100  # a sampling number sent as text: no setting needs more characters
TOKEN_ID = "token_id"
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
_LENGTH = struct.Struct("<I")
_INT64 = struct.Struct("<q")
# Requests one stream may have being answered at once; more are refused on the stream. Their
# tokens are decoded whether or not the client reads them.
MAX_REQUESTS_PER_STREAM = 64
log = logging.getLogger(__name__)
Response: TypeAlias = pb.ModelStreamInferResponse | bytes  # bytes: serialized (TokenResponses)
Send = Callable[[Response], Awaitable[None]]
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]  # the call's invocation metadata
NUMBERS: dict[str, type[int] | type[float]] = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
}
STREAM_PARAMETERS = (*NUMBERS, "stop", "logit_bias", EMPTY_FINAL, ROUTING_KEY)


def streaming_interface() -> dict[str, str]:
    """What a client needs to call ModelStreamInfer, as ModelConfig's parameters say it."""
    return {
        "stream_inputs": f"{TEXT_INPUT} BYTES [1]: the prompt, UTF-8",
        "stream_outputs": (
            f"{TEXT_OUTPUT} BYTES [1] and {TOKEN_ID} INT64 [1], one response per token; "
            f"the last has {FINAL}=true and finish_reason"
        ),
        "stream_parameters": (
            ", ".join(STREAM_PARAMETERS) + " (request parameters; numbers may be sent as text)"
        ),
    }


def _check_id(request: pb.ModelInferRequest) -> None:
    if len(request.id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"the request id has {len(request.id)} characters; a generation request's id (sent "
            f"back with every token) may have at most {MAX_REQUEST_ID_CHARS}"
        )


def _check_prompt_size(request: pb.ModelInferRequest) -> None:
    # A raw BYTES element is a 4-byte length, then the bytes.
    raw = sum(max(len(contents) - 4, 0) for contents in request.raw_input_contents)
    sent = raw + sum(
        len(element) for tensor in request.inputs for element in tensor.contents.bytes_contents
    )
    if sent > MAX_PROMPT_BYTES:
        raise InvalidArgument(
            f"input {TEXT_INPUT!r} holds {sent} bytes; a prompt may hold at most "
            f"{MAX_PROMPT_BYTES} (1 MiB), and the model reads only its last block_size - 1 "
            "tokens: send the end of the text"
        )


def _parameter(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def prompt_of(request: pb.ModelInferRequest) -> str:
    """The single ``text_input`` BYTES element, decoded as UTF-8; the request asks for no
    output but the stream's own."""
    _check_outputs(request)
    _check_prompt_size(request)
    arrays = decode_inputs(request)
    datatypes = {tensor.name: tensor.datatype for tensor in request.inputs}
    array = arrays.get(TEXT_INPUT)
    if len(arrays) != 1 or array is None or datatypes[TEXT_INPUT] != wire.BYTES or array.size != 1:
        sent = [(clip(t.name, 40), clip(t.datatype, 20), list(t.shape)) for t in request.inputs]
        raise InvalidArgument(
            f"a generation request needs one input {TEXT_INPUT!r} of datatype BYTES and shape "
            f"[1] holding the prompt, and no other; it has {clip(str(sent), 300)}"
        )
    try:
        return bytes(array.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"input {TEXT_INPUT!r} is not valid UTF-8 ({exc.reason} at byte {exc.start}); send "
            "the prompt UTF-8 encoded"
        ) from None


def _check_outputs(request: pb.ModelInferRequest) -> None:
    """Every response carries ``text_output`` and ``token_id``; asking for another output, or
    for a transformation of them (``classification``), is refused rather than ignored."""
    for output in request.outputs:
        if output.name not in (TEXT_OUTPUT, TOKEN_ID):
            raise InvalidArgument(
                f"requested output {clip(output.name, 80)!r} does not exist; a generation "
                f"stream answers {TEXT_OUTPUT!r} and {TOKEN_ID!r}"
            )
        if output.parameters:
            names = ", ".join(sorted(clip(k, 40) for k in output.parameters))
            raise InvalidArgument(
                f"output {output.name!r} has parameters ({names}); a generation stream takes "
                "none on its outputs"
            )


def _number(key: str, value: object, kind: type[int] | type[float]) -> object:
    """tritonclient sends parameters as str, int or bool only: numbers may come as text. A
    bool is no number here (``temperature=True`` is not 1.0); the sampling check says so."""
    if isinstance(value, str) or (kind is float and type(value) is int):
        wanted = "a whole number" if kind is int else "a number"
        if len(str(value)) > MAX_NUMBER_TEXT:  # int() refuses over 4300 digits, as "not a number"
            raise InvalidArgument(
                f"parameter {key} holds {len(str(value))} characters; it must be {wanted} of "
                f"at most {MAX_NUMBER_TEXT}"
            )
        try:
            return kind(value)
        except ValueError:
            raise InvalidArgument(
                f"parameter {key}={clip(repr(value), 80)} must be {wanted}"
            ) from None
    return value


def _flag(key: str, value: object) -> bool:
    """A bool parameter, also as the text ``true``/``false`` (``bool("false")`` is true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidArgument(f"parameter {key}={value!r} must be a bool (true or false)")


def sampling_of(request: pb.ModelInferRequest) -> tuple[SamplingParams, bool]:
    """Sampling settings from the request parameters, and whether an empty final is wanted."""
    params = {k: _parameter(v) for k, v in request.parameters.items()}
    unknown = sorted(set(params) - set(STREAM_PARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown request parameter(s) {clip(', '.join(unknown), 200)}; a generation "
            f"stream takes {', '.join(STREAM_PARAMETERS)}"
        )
    empty_final = _flag(EMPTY_FINAL, params.pop(EMPTY_FINAL, False))
    fields: dict[str, object] = {}
    for key, kind in NUMBERS.items():
        if params.get(key) is not None:
            fields[key] = _number(key, params[key], kind)
    stop = params.get("stop")
    if isinstance(stop, str) and stop.startswith("["):
        stop = _json(stop, "stop", "a JSON list of strings")
    if stop is not None:
        fields["stop"] = stop
    if params.get("logit_bias") is not None:
        bias = params["logit_bias"]
        shape = 'a JSON object of token id -> bias, e.g. {"256": -100}'
        fields["logit_bias"] = _json(bias, "logit_bias", shape) if isinstance(bias, str) else bias
    return SamplingParams.from_request(fields), empty_final


def _json(text: str, key: str, shape: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise InvalidArgument(f"parameter {key}={clip(repr(text), 200)} is not {shape}") from None


def empty_final_response(
    request: pb.ModelInferRequest, engine: GenerationEngine
) -> pb.ModelStreamInferResponse:
    """The response that closes a request asking ``triton_enable_empty_final_response``."""
    response = pb.ModelInferResponse(
        model_name=engine.model_name, model_version=str(engine.model_version), id=request.id
    )
    response.parameters[FINAL].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=response)


def _parameter_entry(key: str, value: bool | str) -> bytes:
    """One entry of ``ModelInferResponse.parameters``, serialized."""
    response = pb.ModelInferResponse()
    if isinstance(value, bool):
        response.parameters[key].bool_param = value
    else:
        response.parameters[key].string_param = value
    return response.SerializeToString()


# Field numbers of grpc_predict_v2.proto. Serialized messages written one after the other parse
# as one message (repeated fields append, map entries add): a response is its parts joined.
_INFER_RESPONSE = 2  # ModelStreamInferResponse.infer_response
_FINAL_PARAMETER = {final: _parameter_entry(FINAL, final) for final in (False, True)}


def _raw_output(content: bytes) -> bytes:
    return length_delimited(RAW_OUTPUT_CONTENTS, len(content)) + content


class TokenResponses:
    """One request's token responses, serialized without building a message per token.

    What every response of the request shares (model, version, id, the two output tensors) is
    serialized once; a token appends its final flag, its two raw outputs (the text as one OIP
    BYTES element: 4-byte little-endian length, then the bytes; the id as INT64) and, on the
    last one, its finish reason: 1.8-2.6 us a token, against 5.3-6.8 us to build the message
    and serialize it. (A bare grpc.aio server spends 40-70 us of CPU per streamed message on
    this 2-vCPU VM, most of it in grpc's write path, which this does not change.) The fields
    are joined here with ``frames.length_delimited`` rather than through ``frames.write``'s
    generic tensor views, which measured 3 us more a token.
    """

    def __init__(self, request: pb.ModelInferRequest, engine: GenerationEngine) -> None:
        shared = pb.ModelInferResponse(
            model_name=engine.model_name, model_version=str(engine.model_version), id=request.id
        )
        shared.outputs.add(name=TEXT_OUTPUT, datatype=wire.BYTES, shape=[1])
        shared.outputs.add(name=TOKEN_ID, datatype="INT64", shape=[1])
        self._shared = shared.SerializeToString()

    def encode(self, token: Token, final: bool) -> bytes:
        text = token.text.encode()
        body = b"".join(
            (
                self._shared,
                _FINAL_PARAMETER[final],
                _raw_output(_LENGTH.pack(len(text)) + text),
                _raw_output(_INT64.pack(token.id)),
                b"" if token.finish is None else _parameter_entry("finish_reason", token.finish),
            )
        )
        return length_delimited(_INFER_RESPONSE, len(body)) + body


async def _one(
    generators: Generators, request: pb.ModelInferRequest, send: Send, metadata: Metadata
) -> None:
    try:
        _check_id(request)
        prompt = prompt_of(request)
        params, empty_final = sampling_of(request)
        key = routing_key(request.parameters, metadata)
        engine = await generators.engine(request.model_name, request.model_version, key)
        responses = TokenResponses(request, engine)
        async with contextlib.aclosing(engine.stream(prompt, params)) as tokens:
            async for token in tokens:
                last = token.finish is not None
                await send(responses.encode(token, last and not empty_final))
        if empty_final:
            await send(empty_final_response(request, engine))
    except _StreamGone:
        raise
    except Exception as exc:  # one request's failure is answered on the stream, which goes on
        _, message = failure(exc, "stream request")
        await send(_error_response(request, message))


def _error_response(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A failed request's answer on the stream, named like the request, so a client with
    several on the stream knows which failed."""
    named = pb.ModelInferResponse(
        id=request.id[:MAX_REQUEST_ID_CHARS],
        model_name=clip(request.model_name, 200),
        model_version=clip(request.model_version, 40),
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=named)


def _too_many(running: int) -> str:
    return (
        f"this stream has {running} requests being answered, the most one "
        "stream may; send more as their final responses arrive"
    )


class _StreamGone(Exception):
    """The call can take no more writes (the client left or it ended): stop, nothing to tell."""


async def serve(
    generators: Generators,
    requests: AsyncIterator[pb.ModelInferRequest],
    write: Callable[[Response], Awaitable[None]],
    metadata: Metadata = (),
) -> None:
    """Answer every request arriving on one stream through ``write`` (the call's
    ``context.write``), each token as it is produced; returns once all are answered. The call's
    ``metadata`` may hold a split alias's routing key for every request on it."""
    running: set[asyncio.Task[None]] = set()
    one_writer = asyncio.Lock()  # requests on one stream decode concurrently; writes take turns

    async def send(response: Response) -> None:
        async with one_writer:
            try:
                await write(response)
            except Exception as exc:  # grpc's error for a call that is over varies by cause
                raise _StreamGone(f"{type(exc).__name__}: {exc}") from exc

    try:
        async for request in requests:
            if len(running) >= MAX_REQUESTS_PER_STREAM:
                await send(_error_response(request, _too_many(len(running))))
                continue
            task = asyncio.create_task(_one(generators, request, send, metadata))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)  # the client's half-close: finish what it asked
    except _StreamGone as gone:
        log.info("stream ended before its answers were written (%s)", gone)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
