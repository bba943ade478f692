"""Text generation as clients see it: a GPT registered in the real registry, served by the real
inference process, streamed to the unmodified tritonclient (ModelStreamInfer) and the official
openai client (HTTP, server-sent events), behind the same bearer tokens as gRPC."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai
import psutil
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from infra.harness.serving import ServiceProcesses
from infra.proc import free_port
from maas import zoo
from maas.registry import RegistryClient
from maas.text.byte_tokenizer import EOT
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, Token, generate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CONFIG = {"block_size": 1024, "n_layer": 2, "n_head": 2, "n_embd": 48}
USABLE = sorted(os.sched_getaffinity(0))
# With two CPUs or more, the server reserves the last one for its decode processes.
DECODE_CPUS = {USABLE[-1]} if len(USABLE) > 1 else set()
TOKEN = "generate-read-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@dataclass
class Servers:
    processes: ServiceProcesses
    registry: str
    grpc: str
    http: str  # base URL of the OpenAI-compatible API


@pytest.fixture(scope="module")
def servers(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generate")
    table = workdir / "tokens.json"
    entry = {"identity": "it", "role": "read", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    table.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    http_port = free_port()
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        grpc_addr = processes.start_inference(
            "inference-generate",
            registry,
            MAAS_AUTH_TOKENS_FILE=str(table),
            MAAS_INFERENCE_HTTP_LISTEN=f"127.0.0.1:{http_port}",
            # One slot: a request can only start once the previous stream gave its slot back.
            MAAS_INFERENCE_GENERATION_SLOTS="1",
            MAAS_INFERENCE_DECODE_CPUS=",".join(map(str, DECODE_CPUS)),
        )
        yield Servers(processes, registry, grpc_addr, f"http://127.0.0.1:{http_port}/v1")


@dataclass
class Registered:
    name: str
    model: GPT


@pytest.fixture(scope="module")
async def gpt(stack, servers) -> Registered:
    model = zoo.build("gpt", CONFIG, seed=21).eval()
    assert isinstance(model, GPT)
    name = f"it-gpt-{uuid.uuid4().hex[:8]}"
    settings = stack.settings.replace(registry_addr=servers.registry)
    async with RegistryClient(settings, actor="test-generate") as registry:
        await registry.register(model, name, "gpt", CONFIG, alias="production")
    return Registered(name, model)


def solo(model: GPT, prompt: str, **params: Any) -> list[Token]:
    return list(generate(model, prompt, SamplingParams(**params)))


def client(servers: Servers, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=servers.http, api_key=key, max_retries=0, timeout=120)


def ended(servers: Servers, name: str) -> dict[str, float]:
    port = servers.processes.metrics_port("inference-generate")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = rf'maas_generation_streams_total{{model="{re.escape(name)}",reason="(\w+)"}} (\S+)'
    return {reason: float(value) for reason, value in re.findall(pattern, text)}


def test_tritonclient_streams_the_in_process_greedy_tokens(servers, gpt):
    prompt = "def main(argv):\n    "
    results: queue.Queue[Any] = queue.Queue()
    tc = triton.InferenceServerClient(url=servers.grpc)
    tc.start_stream(callback=lambda result, error: results.put(error or result), headers=AUTH)
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    tc.async_stream_infer(gpt.name, [text], parameters={"max_tokens": 24, "temperature": "0"})
    responses = []
    while (
        not responses
        or not responses[-1].get_response().parameters["triton_final_response"].bool_param
    ):
        item = results.get(timeout=120)
        assert not isinstance(item, InferenceServerException), item
        responses.append(item)
    tc.stop_stream()
    tc.close()
    expected = solo(gpt.model, prompt, max_tokens=24, temperature=0)
    assert [int(r.as_numpy("token_id")[0]) for r in responses] == [t.id for t in expected]
    assert responses[-1].get_response().model_version == "1"


def test_openai_client_streams_a_chat_completion_and_a_completion(servers, gpt):
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = list(
        client(servers).chat.completions.create(
            model=gpt.name, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    expected = solo(
        gpt.model, "system: be brief\nuser: hi\nassistant:", max_tokens=16, temperature=0
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat) == "".join(
        t.text for t in expected
    )
    assert chat[-1].choices[0].finish_reason in ("stop", "length")
    completion = list(
        client(servers).completions.create(
            model=f"{gpt.name}@production",
            prompt="import",
            max_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    expected = solo(gpt.model, "import", max_tokens=16, temperature=0)
    assert [c.choices[0].text for c in completion] == [t.text for t in expected]


def test_a_cancelled_stream_frees_the_only_slot_for_the_next_request(servers, gpt):
    before = ended(servers, gpt.name).get("cancelled", 0.0)
    # End-of-text banned: the stream cannot finish by itself before the server sees it go.
    long = client(servers).completions.create(
        model=gpt.name,
        prompt="a",
        max_tokens=1000,
        temperature=1.0,
        stream=True,
        logit_bias={str(EOT): -100},
    )
    next(iter(long))
    long.close()
    reply = client(servers).completions.create(model=gpt.name, prompt="b", max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens <= 4
    counts = ended(servers, gpt.name)
    assert counts.get("cancelled", 0.0) == before + 1
    # The cancelled stream stopped early: all tokens so far are far fewer than it asked for.
    port = servers.processes.metrics_port("inference-generate")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    (tokens,) = re.findall(
        rf'maas_generation_tokens_total{{model="{re.escape(gpt.name)}"}} (\S+)', text
    )
    assert float(tokens) < 1000


def test_http_needs_the_same_bearer_token_as_grpc(servers, gpt):
    with pytest.raises(openai.AuthenticationError, match="authorization"):
        client(servers, key="wrong").completions.create(model=gpt.name, prompt="a", max_tokens=1)
    assert client(servers).models.list().data is not None


@pytest.mark.skipif(not DECODE_CPUS, reason="reserving a CPU needs two")
def test_the_decode_process_runs_on_the_reserved_cpu_and_the_server_off_it(servers, gpt):
    list(client(servers).completions.create(model=gpt.name, prompt="a", max_tokens=2))
    server = psutil.Process(servers.processes.pid("inference-generate"))
    # Decode processes come from the server's forkserver: its children, not the server's.
    decoders = [p for p in server.children(recursive=True) if p.ppid() != server.pid]
    assert decoders
    assert {cpu for p in decoders for cpu in p.cpu_affinity()} == DECODE_CPUS
    threads = [psutil.Process(t.id) for t in server.threads()]
    assert {cpu for t in threads for cpu in t.cpu_affinity()} == set(USABLE) - DECODE_CPUS
