"""The bench's clients of the three front doors: each returns a ``Run`` that sends one
generation request and times its replies (time to first token, total time, tokens)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import numpy as np

from maas.oip import grpc_predict_v2_pb2 as pb
from maas.text import wire

PROMPT = "def parse(text):\n    "
Run = Callable[[], Awaitable[tuple[float, float, int]]]  # -> (ttft_s, total_s, tokens)


def stream_request(name: str, tokens: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name, id=uuid.uuid4().hex)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(wire.encode_raw(np.array([PROMPT.encode()], dtype=object)))
    request.parameters["max_tokens"].int64_param = tokens
    request.parameters["temperature"].string_param = "0"
    return request


class Timing:
    """First-token and total time of one request's replies, counted as they arrive."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first, self.count = 0.0, 0

    def reply(self, reply: pb.ModelStreamInferResponse) -> bool:
        """Count ``reply``; True once it is the request's final one."""
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter() - self.started
        return reply.infer_response.parameters["triton_final_response"].bool_param

    def result(self) -> tuple[float, float, int]:
        return self.first, time.perf_counter() - self.started, self.count


def grpc_call_per_request(stub: Any, name: str, tokens: int) -> Run:
    """Each request opens a ModelStreamInfer call of its own (call set-up in every TTFT)."""

    async def run() -> tuple[float, float, int]:
        request = stream_request(name, tokens)
        timing = Timing()
        async for reply in stub.ModelStreamInfer(iter([request])):
            if timing.reply(reply):
                break
        return timing.result()

    return run


def grpc_open_streams(stub: Any, name: str, tokens: int, idle: list[Any]) -> Run:
    """Requests written on ModelStreamInfer calls kept open between them (``idle``), as
    tritonclient's ``start_stream`` keeps one: a concurrent request takes a call no other uses."""

    async def run() -> tuple[float, float, int]:
        call = idle.pop() if idle else stub.ModelStreamInfer()
        request = stream_request(name, tokens)
        timing = Timing()
        await call.write(request)
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise RuntimeError("the server ended the stream")
            if timing.reply(reply):
                break
        idle.append(call)
        return timing.result()

    return run


def http_stream(session: aiohttp.ClientSession, url: str, name: str, tokens: int) -> Run:
    body = {"model": name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}

    async def run() -> tuple[float, float, int]:
        started = time.perf_counter()
        first, count = 0.0, 0
        async with session.post(f"{url}/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.content:
                if not line.startswith(b"data: {"):
                    continue
                count += 1
                if count == 1:
                    first = time.perf_counter() - started
        return first, time.perf_counter() - started, count

    return run
