"""Hypothesis-generated HTTP requests against the real inference HTTP server (OIP REST and the
OpenAI-compatible API on one aiohttp app, auth on, a GPT and an MLP from an in-memory source):
every answer is below 500 with a JSON body, an error names the problem, and valid requests are
still answered correctly afterwards.

The bodies mix the shapes real clients send (OIP JSON tensors, Triton's binary extension,
OpenAI completions and chats) with values of every JSON kind in every field.
MAAS_FUZZ_HTTP_REQUESTS sets the count (CI: 300).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from maas import zoo
from maas.config import Settings
from maas.edge.auth import Authorizer
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, generate
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.generation import Generators
from services.inference.http_app import HttpServer
from services.inference.metrics import Metrics
from services.inference.openai_http import OpenAIRoutes, bearer_auth
from services.inference.rest import OipRestRoutes
from services.inference.sources import MemorySource
from tests.fuzz.fuzzing import drawing

pytestmark = pytest.mark.timeout(900)

REQUESTS = int(os.environ.get("MAAS_FUZZ_HTTP_REQUESTS", "300"))
MLP = {"in_features": 4, "hidden": [8], "num_classes": 3}
GPT_CONFIG = {"block_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 16}
TOKEN = "fuzz-http-token"
LIMIT = 64 * 1024


@dataclass
class Served:
    port: int
    mlp: torch.nn.Module
    gpt: GPT


def _serve(ready: Any, stop: threading.Event, tokens_file: str) -> None:
    async def main() -> None:
        mlp = zoo.build("mlp", MLP, seed=4).eval()
        gpt = zoo.build("gpt", GPT_CONFIG, seed=2).eval()
        assert isinstance(gpt, GPT)
        source = MemorySource()
        source.add("digits", mlp, "mlp", MLP, aliases=["production"])
        source.add("pygpt", gpt, "gpt", GPT_CONFIG, aliases=["production"])
        settings = Settings().replace(auth=True, auth_tokens_file=tokens_file)
        authorizer = Authorizer.from_settings(settings)
        metrics = Metrics()
        with ThreadPoolExecutor(2) as pool:
            plane = DataPlane(
                source, pool, batching=BatchingConfig(8, 0), cache_bytes=1 << 30, metrics=metrics
            )
            plane.ready = True
            generators = Generators(plane, slots=2)
            http = HttpServer("127.0.0.1:0", max_body_bytes=LIMIT)
            http.add(OipRestRoutes(plane, authorizer, metrics))
            http.add(OpenAIRoutes(generators, bearer_auth(authorizer)))
            await http.start()
            ready.put(Served(http.port, mlp, gpt))
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await http.stop()
            await generators.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    import queue

    table = tmp_path_factory.mktemp("fuzz-http") / "tokens.json"
    entry = {"identity": "f", "role": "read", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    table.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    ready: queue.Queue[Served] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(ready, stop, str(table)), daemon=True)
    thread.start()
    yield ready.get(timeout=60)
    stop.set()
    thread.join(timeout=30)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str | bytes] | None = None,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


# --- strategies ---------------------------------------------------------------------------------

names = st.sampled_from(["digits", "pygpt", "nope", "", "digits@production", "x" * 300])
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def maybe(field: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's plausible value, or any JSON value at all."""
    return st.one_of(field, field, anything)


@st.composite
def oip_bodies(draw: st.DrawFn) -> dict[str, Any]:
    tensor = draw(
        st.fixed_dictionaries(
            {
                "name": maybe(st.sampled_from(["input", "text", "text_input"])),
                "shape": maybe(st.lists(st.integers(-2, 5) | st.just(2**62), max_size=3)),
                "datatype": maybe(st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16"])),
                "data": maybe(st.lists(st.floats(-1e3, 1e3) | st.text(max_size=4), max_size=8)),
            },
            optional={"parameters": maybe(st.just({"binary_data_size": 16}))},
        )
    )
    return draw(
        st.fixed_dictionaries(
            {"inputs": maybe(st.lists(st.just(tensor), max_size=2))},
            optional={"outputs": anything, "parameters": anything, "id": anything},
        )
    )


@st.composite
def openai_bodies(draw: st.DrawFn) -> dict[str, Any]:
    message = st.fixed_dictionaries(
        {
            "role": maybe(st.sampled_from(["user", "system", "assistant", "tool"])),
            "content": maybe(st.text(max_size=10)),
        }
    )
    return draw(
        st.fixed_dictionaries(
            {"model": maybe(names)},
            optional={
                "prompt": maybe(st.text(max_size=10)),
                "messages": maybe(st.lists(message, max_size=3)),
                "max_tokens": maybe(st.integers(-1, 8)),
                "temperature": maybe(st.floats(0, 2.5)),
                "top_p": maybe(st.floats(0, 1)),
                "top_k": maybe(st.integers(-1, 300)),
                "seed": maybe(st.integers(-(2**65), 2**65)),
                "stop": maybe(st.lists(st.text(max_size=3), max_size=5)),
                "logit_bias": maybe(
                    st.dictionaries(st.integers(-5, 300).map(str), st.floats(-200, 200), max_size=3)
                ),
                "stream": maybe(st.booleans()),
                "n": maybe(st.integers(0, 3)),
            },
        )
    )


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str | bytes]]:
    name = draw(names)
    kind = draw(st.sampled_from(["oip", "oip-binary", "openai", "chat", "get", "raw"]))
    method = "POST"
    headers: dict[str, str | bytes] = {"content-type": "application/json"}
    if kind in ("oip", "oip-binary"):
        path = f"/v2/models/{name}/infer"
        body = json.dumps(draw(oip_bodies())).encode()
        if kind == "oip-binary":
            tail = draw(st.binary(max_size=40))
            headers["Inference-Header-Content-Length"] = draw(
                st.sampled_from([len(body), 0, -1, len(body) + 100]).map(str)
                | st.integers().map(str)
                | st.sampled_from(["²".encode(), "٣".encode(), "9" * 5000])  # str.isdigit passes
            )
            body += tail
    elif kind in ("openai", "chat"):
        path = "/v1/completions" if kind == "openai" else "/v1/chat/completions"
        body = json.dumps(draw(openai_bodies())).encode()
    elif kind == "get":
        method, body = "GET", b""
        path = draw(
            st.sampled_from(
                ["/v1/models", "/v2", f"/v2/models/{name}", f"/v2/models/{name}/ready",
                 f"/v2/models/{name}/config", f"/v2/models/{name}/stats", "/v2/models/stats"]
            )
        )  # fmt: skip
    else:
        path = draw(st.sampled_from(["/v1/completions", f"/v2/models/{name}/infer"]))
        body = draw(st.binary(max_size=200) | st.just(b"{" * 5000) | st.just(b"[]" * 10))
    if draw(st.integers(0, 19)) == 0:  # over the body limit
        body = bytes(LIMIT + 1)
    # "\xff\xfe" goes out as those two bytes (http.client sends str headers as latin-1): a token
    # that is not UTF-8
    token = draw(st.sampled_from([TOKEN, TOKEN, TOKEN, "", "wrong", "\xff\xfe"]))
    if token:
        headers["authorization"] = f"Bearer {token}"
    return method, path, body, headers


# --- the property --------------------------------------------------------------------------------


def test_fuzzed_http_requests_get_only_client_errors_and_valid_ones_still_work(served) -> None:
    seen: dict[int, int] = {}

    @drawing(REQUESTS)
    @given(http_requests())
    def one(case: tuple[str, str, bytes, dict[str, str | bytes]]) -> None:
        status, body = call(served.port, *case)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, body[:300], case[:2], case[2][:300])
        if status >= 400:  # an error that says what went wrong, or a readiness probe's "no"
            answer = json.loads(body)
            assert answer.get("error") or answer.get("ready") is False, body[:300]

    one()
    assert sum(seen.values()) >= REQUESTS * 0.9
    assert 200 in seen and 400 in seen and 401 in seen and 404 in seen, seen
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    tensor = {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}
    status, body = call(
        served.port,
        "POST",
        "/v2/models/digits/infer",
        json.dumps({"inputs": [tensor]}).encode(),
        auth,
    )
    assert status == 200, body
    out = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(2, 3)
    with torch.inference_mode():
        np.testing.assert_allclose(out, served.mlp(torch.from_numpy(x)).numpy(), rtol=1e-5)
    request = {"model": "pygpt", "prompt": "def", "max_tokens": 5, "temperature": 0}
    status, body = call(served.port, "POST", "/v1/completions", json.dumps(request).encode(), auth)
    assert status == 200, body
    expected = generate(served.gpt, "def", SamplingParams(max_tokens=5, temperature=0))
    assert json.loads(body)["choices"][0]["text"] == "".join(t.text for t in expected)
