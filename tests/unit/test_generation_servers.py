"""Both front doors of generation on a real gRPC server and a real HTTP server in this process
(models from memory instead of the registry): tritonclient's stream and the official openai
client, unmodified, get the in-process model's tokens."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as triton
from openai.types.chat import ChatCompletionMessageParam
from tritonclient.utils import InferenceServerException

from maas import zoo
from maas.config import Settings
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from maas.text import byte_tokenizer
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, Token, generate
from maas.text.stream import stream_completion
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.generation import Generators
from services.inference.http_app import HttpServer
from services.inference.oip_stream import MAX_REQUESTS_PER_STREAM
from services.inference.openai_http import OpenAIRoutes
from services.inference.servicer import InferenceServicer, add_to_server
from services.inference.sources import MemorySource

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"block_size": 1024, "n_layer": 2, "n_head": 2, "n_embd": 32}
NAME = "tiny-gpt"


@dataclass
class Served:
    grpc_addr: str
    http_url: str
    model: GPT
    generators: Generators


def _serve(ready: queue.Queue[Any], stop: threading.Event, model: GPT) -> None:
    async def main() -> None:
        source = MemorySource()
        source.add(NAME, model, "gpt", CONFIG, aliases=["production"])
        source.add(NAME, zoo.build("gpt", CONFIG, seed=5), "gpt", CONFIG)
        source.set_split(NAME, "canary", ((1, 50), (2, 50)))
        source.add("not-a-gpt", zoo.build("mlp"), "mlp", {}, aliases=["production"])
        with ThreadPoolExecutor(2) as pool:
            plane = DataPlane(source, pool, batching=BatchingConfig(), cache_bytes=1 << 30)
            plane.ready = True
            # A decode thread, not a process: ``slow_decoding`` patches GPT in this process.
            generators = Generators(plane, slots=2, isolated=False)
            server = grpc.aio.server()
            add_to_server(InferenceServicer(plane, generators), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            http = HttpServer("127.0.0.1:0")
            http.add(OpenAIRoutes(generators))
            await http.start()
            ready.put(
                Served(f"127.0.0.1:{port}", f"http://127.0.0.1:{http.port}/v1", model, generators)
            )
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await server.stop(1)
            await http.stop()
            await generators.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    model = zoo.build("gpt", CONFIG, seed=4).eval()
    assert isinstance(model, GPT)
    ready: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(ready, stop, model), daemon=True)
    thread.start()
    yield ready.get(timeout=60)
    stop.set()
    thread.join(timeout=30)


def _solo(model: GPT, prompt: str, **params: Any) -> list[Token]:
    return list(generate(model, prompt, SamplingParams(**params)))


def _triton_stream(
    addr: str,
    prompt: str,
    *,
    model: str = NAME,
    headers: dict[str, str] | None = None,
    **parameters: Any,
) -> list[Any]:
    """Every callback of one streamed request, until the final response (or an error)."""
    results: queue.Queue[Any] = queue.Queue()
    client = triton.InferenceServerClient(url=addr)
    client.start_stream(
        callback=lambda result, error: results.put(error or result), headers=headers
    )
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    name, _, version = model.partition("@")
    client.async_stream_infer(
        name, [text], model_version=version, request_id="r1", parameters=parameters
    )
    seen = []
    while True:
        item = results.get(timeout=60)
        seen.append(item)
        if isinstance(item, InferenceServerException):
            break
        final = item.get_response().parameters["triton_final_response"].bool_param
        if final:
            break
    client.stop_stream()
    client.close()
    return seen


def test_tritonclient_streams_one_response_per_token_the_last_final(served: Served) -> None:
    results = _triton_stream(served.grpc_addr, "def add(a, b):", max_tokens=12, temperature="0")
    expected = _solo(served.model, "def add(a, b):", max_tokens=12, temperature=0)
    assert [int(r.as_numpy("token_id")[0]) for r in results] == [t.id for t in expected]
    assert b"".join(r.as_numpy("text_output")[0] for r in results).decode() == "".join(
        t.text for t in expected
    )
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert flags == [False] * (len(results) - 1) + [True]
    assert results[-1].get_response().parameters["finish_reason"].string_param == "length"


def test_tritonclient_reads_the_streaming_interface_from_the_model_config(served: Served) -> None:
    client = triton.InferenceServerClient(url=served.grpc_addr)
    try:
        parameters = client.get_model_config(NAME).config.parameters  # Triton's own message
    finally:
        client.close()
    assert parameters["stream_inputs"].string_value.startswith("text_input BYTES [1]")
    assert "text_output BYTES [1]" in parameters["stream_outputs"].string_value
    assert "max_tokens, temperature, top_p" in parameters["stream_parameters"].string_value


def test_a_bad_request_on_the_stream_answers_an_error_naming_the_field(served: Served) -> None:
    (error,) = _triton_stream(served.grpc_addr, "x", temperature="5")
    assert isinstance(error, InferenceServerException)
    assert "temperature" in str(error)


def test_an_error_on_a_shared_stream_names_the_request_that_failed(served: Served) -> None:
    def generation(request_id: str, max_tokens: int) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=NAME, id=request_id)
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(b"\x01\x00\x00\x00a")
        request.parameters["max_tokens"].int64_param = max_tokens
        request.parameters["temperature"].int64_param = 0
        return request

    with grpc.insecure_channel(served.grpc_addr) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter([generation("A", 0), generation("B", 1)])))
    errors = [r for r in replies if r.error_message]
    assert [(r.infer_response.id, r.infer_response.model_name) for r in errors] == [("A", NAME)]
    assert "max_tokens" in errors[0].error_message
    assert [r.infer_response.id for r in replies if not r.error_message] == ["B"]


KEYS = [f"user-{i}" for i in range(12)]


def test_a_routing_key_keeps_a_split_aliass_streams_on_one_version(served: Served) -> None:
    def version(key: str, *, as_metadata: bool) -> str:
        parameters = {} if as_metadata else {"maas-routing-key": key}
        headers = {"maas-routing-key": key} if as_metadata else None
        (first, *_) = _triton_stream(
            served.grpc_addr,
            "a",
            model=f"{NAME}@canary",
            headers=headers,
            max_tokens=1,
            **parameters,
        )
        return str(first.get_response().model_version)

    by_parameter = [version(key, as_metadata=False) for key in KEYS]
    assert by_parameter == [version(key, as_metadata=True) for key in KEYS]
    assert by_parameter == [version(key, as_metadata=False) for key in KEYS]
    assert set(by_parameter) == {"1", "2"}


def test_an_openai_answer_names_its_version_sticky_by_the_routing_key_header(
    served: Served,
) -> None:
    def answered(key: str) -> str | None:
        reply = _openai(served).completions.create(
            model=f"{NAME}@canary",
            prompt="a",
            max_tokens=1,
            extra_headers={"maas-routing-key": key},
        )
        return reply.system_fingerprint

    first = [answered(key) for key in KEYS]
    assert first == [answered(key) for key in KEYS]
    assert set(first) == {f"{NAME}@1", f"{NAME}@2"}


def test_a_request_id_too_long_to_send_back_with_every_token_is_refused(served: Served) -> None:
    request = pb.ModelInferRequest(model_name=NAME, id="x" * 5000)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\x01\x00\x00\x00a")
    with grpc.insecure_channel(served.grpc_addr) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        (reply,) = stub.ModelStreamInfer(iter([request]))
    assert "the request id has 5000 characters" in reply.error_message
    assert len(reply.infer_response.id) == 1024  # named, not echoed whole


def _openai(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.http_url, api_key="unused", max_retries=0)


def test_openai_client_streams_a_completion_token_by_token(served: Served) -> None:
    stream = _openai(served).completions.create(
        model=NAME, prompt="import os\n", max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    expected = _solo(served.model, "import os\n", max_tokens=10, temperature=0)
    assert [c.choices[0].text for c in chunks] == [t.text for t in expected]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_streams_a_chat_completion(served: Served) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "write a loop"}]
    stream = _openai(served).chat.completions.create(
        model=f"{NAME}@production", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    expected = _solo(served.model, "user: write a loop\nassistant:", max_tokens=8, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(
        t.text for t in expected
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_gets_a_whole_completion_with_usage(served: Served) -> None:
    reply = _openai(served).completions.create(
        model=NAME, prompt="ab", max_tokens=5, temperature=0.7, seed=3
    )
    expected = _solo(served.model, "ab", max_tokens=5, temperature=0.7, seed=3)
    assert reply.choices[0].text == "".join(t.text for t in expected)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 5)


def test_the_defaults_of_fields_this_server_cannot_vary_are_accepted(served: Served) -> None:
    reply = _openai(served).completions.create(
        model=NAME, prompt="ab", max_tokens=3, temperature=0, n=1, best_of=1,
        presence_penalty=0, frequency_penalty=0.0, suffix="", user="u", stream=None, echo=None,
    )  # fmt: skip
    assert reply.choices[0].text == "".join(
        t.text for t in _solo(served.model, "ab", max_tokens=3, temperature=0)
    )


def test_echo_puts_the_prompt_before_the_completion(served: Served) -> None:
    client, completion = (
        _openai(served),
        "".join(t.text for t in _solo(served.model, "ab", max_tokens=4, temperature=0)),
    )
    whole = client.completions.create(
        model=NAME, prompt="ab", max_tokens=4, temperature=0, echo=True
    )
    assert whole.choices[0].text == "ab" + completion
    stream = client.completions.create(
        model=NAME, prompt="ab", max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == "ab" + completion


def test_include_usage_ends_a_stream_with_the_token_counts(served: Served) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    chunks = list(
        _openai(served).chat.completions.create(
            model=NAME, messages=messages, max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == len("user: hi\nassistant:")
    assert all(c.usage is None for c in chunks[:-1])


def test_logit_bias_reaches_the_sampler_through_both_doors(served: Served) -> None:
    forced = {str(ord("z")): 100}
    reply = _openai(served).completions.create(
        model=NAME, prompt="x", max_tokens=4, temperature=0, logit_bias=forced
    )
    assert reply.choices[0].text == "zzzz"
    results = _triton_stream(
        served.grpc_addr, "x", max_tokens=3, temperature="0", logit_bias=json.dumps(forced)
    )
    assert [int(r.as_numpy("token_id")[0]) for r in results] == [ord("z")] * 3


def test_openai_models_lists_the_loaded_generative_models(served: Served) -> None:
    _openai(served).completions.create(model=NAME, prompt="a", max_tokens=1)
    assert NAME in [m.id for m in _openai(served).models.list()]


def test_openai_errors_name_the_problem_with_the_right_status(served: Served) -> None:
    client = _openai(served)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.completions.create(model="no-such-model", prompt="a")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=NAME, prompt="a", top_p=0)
    with pytest.raises(openai.BadRequestError, match="not a text-generation model"):
        client.completions.create(model="not-a-gpt", prompt="a")


def test_a_version_of_more_digits_than_int64_has_is_a_bad_request(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match=r"\(5000 digits\) is malformed"):
        _openai(served).completions.create(model=f"{NAME}@{'9' * 5000}", prompt="a")


def test_an_unexpected_failure_is_a_500_in_the_openai_shape_carrying_only_a_request_id(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(name: str, ref: str) -> None:
        raise RuntimeError("a secret detail")

    monkeypatch.setattr(served.generators, "engine", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        _openai(served).completions.create(model=NAME, prompt="a")
    assert re.fullmatch(
        r"internal error \(request id [0-9a-f]{16}; see the server log\)",
        caught.value.body["message"],  # type: ignore[index]
    )
    assert caught.value.body["type"] == "server_error"  # type: ignore[index]


def test_chat_content_given_as_text_parts_reads_as_one_string(served: Served) -> None:
    def chat(content: Any) -> str | None:
        reply = _openai(served).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
        )
        return reply.choices[0].message.content

    parts = [{"type": "text", "text": "write "}, {"type": "text", "text": "a loop"}]
    assert chat(parts) == chat("write a loop")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"prompt": "a", "stop": 5}, "stop"),
        ({"model": f"{NAME}@", "prompt": "a"}, "nothing after '@'"),
        ({"prompt": "a", "seed": 2**70}, "seed"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "content"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"prompt": "a\ud800"}, "lone surrogate"),
        ({"prompt": "a", "stream": "yes"}, 'stream="yes" must be true or false'),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3},
            "max_completion_tokens=-3",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 3,
                "max_tokens": 9,
            },
            "send one of them",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "prompt": "a", "echo": True},
            "unknown request fields ['echo', 'prompt'] for /v1/chat/completions (they belong to "
            "/v1/completions)",
        ),
        ({"prompt": "a", "max_completion_tokens": 3}, "for /v1/completions (they belong to"),
        (
            {"prompt": "a", "logprobs": 0},
            "logprobs=0 is not supported by this server: leave logprobs out",
        ),
        ({"prompt": "a", "user": 12}, "user=12 must be a string"),
        ({"prompt": [100, 101]}, "token ids are not taken"),
        ({"max_tokens": 3}, "prompt is required"),
        ({"prompt": "a", "stop": "\ud800"}, "a lone surrogate can never be generated"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0] has unknown keys ['tool_calls']",
        ),
        ({"messages": [{"role": "user", "content": "x", "name": "a b"}]}, "messages[0].name"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "lone surrogate"),
        ({"prompt": "a", "n": 2}, "n=2 is not supported by this server: leave n out or send 1"),
        ({"prompt": "a", "logprobs": 5}, "logprobs=5 is not supported"),
        ({"prompt": "a", "best_of": 3}, "best_of=3"),
        ({"prompt": "a", "suffix": "}"}, "suffix"),
        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, "presence_pen"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            '{"type": "text"}',
        ),
        ({"prompt": "a", "echo": 1}, "echo=1 must be true or false"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "only read with stream"),
        ({"prompt": "a", "stream": True, "stream_options": {"x": 1}}, "include_usage only"),
    ],
)
def test_a_malformed_body_gets_400_naming_the_field(
    served: Served, body: dict[str, Any], named: str
) -> None:
    path = "/chat/completions" if "messages" in body else "/completions"
    request = urllib.request.Request(
        served.http_url + path,
        data=json.dumps({"model": NAME, **body}).encode(),
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert named in json.loads(caught.value.read())["error"]["message"]


def test_the_openai_client_reads_which_field_was_refused_from_the_error(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _openai(served).completions.create(model=NAME, prompt="a", temperature=5)
    assert caught.value.param == "temperature"
    assert "temperature=5 must be a number in [0, 2]" in caught.value.message


def test_openai_client_retrieves_a_model_and_gets_404_for_an_unknown_one(served: Served) -> None:
    client = _openai(served)
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_the_openai_client_reads_which_unknown_field_was_refused(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _openai(served).completions.create(model=NAME, prompt="a", extra_body={"tools": []})
    assert caught.value.param == "tools"


def test_an_unknown_openai_path_answers_in_the_openai_error_shape(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match="/v1/embeddings"):
        _openai(served).embeddings.create(model=NAME, input="a")


def _ended(served: Served, reason: str) -> float:
    return float(served.generators.metrics.streams.labels(NAME, reason)._value.get())


def _wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


NO_END_OF_TEXT = {str(byte_tokenizer.EOT): -100}


@pytest.fixture
def slow_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decode step takes 20 ms or more, so a 1 000-token stream that may not pick
    end-of-text (``NO_END_OF_TEXT``) cannot end by itself before its client leaves. (On an idle
    machine the tiny model once wrote all 1 000 tokens first; under load a sampled end-of-text
    once ended the stream before the server saw the client go.) The class is patched: the server
    decodes with its own copy."""
    step = GPT.step

    def slowed(self: GPT, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "step", slowed)


@pytest.mark.usefixtures("slow_decoding")
def test_a_client_leaving_an_http_stream_frees_its_slot_quietly(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    before = _ended(served, "cancelled")
    stream = _openai(served).completions.create(
        model=NAME,
        prompt="a",
        max_tokens=1000,
        temperature=1.0,
        stream=True,
        logit_bias=NO_END_OF_TEXT,
    )
    next(iter(stream))
    stream.close()
    _wait_for(lambda: _ended(served, "cancelled") == before + 1)
    time.sleep(0.1)  # the handler's last write, after the slot was freed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]  # a client leaving is not an error


@pytest.mark.usefixtures("slow_decoding")
def test_a_client_leaving_before_its_whole_completion_frees_its_slot(served: Served) -> None:
    before, tokens = _ended(served, "cancelled"), served.generators.metrics.tokens.labels(NAME)
    decoded = tokens._value.get()
    body = json.dumps(
        {"model": NAME, "prompt": "a", "max_tokens": 1000, "logit_bias": NO_END_OF_TEXT}
    ).encode()
    host, port = served.http_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        _wait_for(lambda: tokens._value.get() > decoded)  # its generation started
    _wait_for(lambda: _ended(served, "cancelled") == before + 1)


@pytest.mark.usefixtures("slow_decoding")
def test_cancelling_a_triton_stream_frees_its_slot(served: Served) -> None:
    before = _ended(served, "cancelled")
    first: queue.Queue[Any] = queue.Queue()
    client = triton.InferenceServerClient(url=served.grpc_addr)
    client.start_stream(callback=lambda result, error: first.put(error or result))
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"a"], dtype=object))
    parameters = {"max_tokens": 1000, "logit_bias": json.dumps(NO_END_OF_TEXT)}
    client.async_stream_infer(NAME, [text], parameters=parameters)
    assert not isinstance(first.get(timeout=60), InferenceServerException)
    client.stop_stream(cancel_requests=True)
    client.close()
    _wait_for(lambda: _ended(served, "cancelled") == before + 1)


@pytest.mark.usefixtures("slow_decoding")
def test_requests_past_the_most_one_stream_may_have_are_refused_on_it(served: Served) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    client = triton.InferenceServerClient(url=served.grpc_addr)
    client.start_stream(callback=lambda result, error: answers.put(error))
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"a"], dtype=object))
    parameters = {"max_tokens": 1000, "logit_bias": json.dumps(NO_END_OF_TEXT)}
    try:
        for i in range(MAX_REQUESTS_PER_STREAM + 1):  # each takes 20 s or more
            client.async_stream_infer(NAME, [text], request_id=str(i), parameters=parameters)
        refused = answers.get(timeout=60)
        while refused is None:  # a token of one of the first requests
            refused = answers.get(timeout=60)
        assert f"this stream has {MAX_REQUESTS_PER_STREAM} requests being answered" in str(refused)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    _wait_for(lambda: served.generators.metrics.active.labels(NAME, "1")._value.get() == 0)


def test_stream_completion_shows_every_token_as_it_arrives(served: Served) -> None:
    settings = Settings.from_env().replace(inference_addr=served.grpc_addr, auth_token="")
    shown: list[str] = []
    text = stream_completion(
        settings, NAME, "for i in", max_tokens=10, temperature=0, write=shown.append
    )
    expected = _solo(served.model, "for i in", max_tokens=10, temperature=0)
    assert shown == [t.text for t in expected] and text == "".join(shown)


@pytest.fixture
def decoding_fails_after_a_few_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode step after the fifth of this test fails (the prefill passes)."""
    step, taken = GPT.step, itertools.count()

    def failing(self: GPT, *args: Any, **kwargs: Any) -> Any:
        if next(taken) >= 5:
            raise RuntimeError("the decode step failed")
        time.sleep(0.02)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "step", failing)


@pytest.mark.usefixtures("decoding_fails_after_a_few_steps")
def test_a_stream_failing_after_its_first_token_ends_with_an_error_event(served: Served) -> None:
    stream = _openai(served).completions.create(
        model=NAME, prompt="a", max_tokens=100, stream=True, logit_bias=NO_END_OF_TEXT
    )
    pieces = []
    with pytest.raises(openai.APIError, match="generation failed"):
        for chunk in stream:  # the openai client raises the error event it reads
            pieces.append(chunk.choices[0].text)
    assert pieces  # it had started: the failure came on the stream, not as a status
