"""Hypothesis-generated registry requests against the real gRPC server (in this process) backed
by the real S3 server: every answer is OK or a status that names the caller's mistake; never
INTERNAL or UNKNOWN, and valid requests are still answered afterwards.

MAAS_FUZZ_REQUESTS sets the count (CI and the issue's figure: 500).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
from fuzzing import drawing
from hypothesis import given
from hypothesis import strategies as st

from infra.harness.registry import registry_in_process
from maas.registry.client import RegistryClient
from maas.registry.v1 import registry_pb2 as pb
from services.model_registry.service import RegistryLimits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REQUESTS = int(os.environ.get("MAAS_FUZZ_REQUESTS", "500"))
MODEL = "fuzz-model"
ACCEPTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    # the state refuses it: an alias points at the version, or the bytes do not match
    grpc.StatusCode.FAILED_PRECONDITION,
}
LIMITS = RegistryLimits(max_manifest_bytes=64 * 1024, max_metrics=50, max_reply_bytes=256 * 1024)

WEIGHTS = safetensors_numpy.save({"w": np.arange(64, dtype=np.float32)})
SHA = hashlib.sha256(WEIGHTS).hexdigest()
MANIFEST = {
    "arch": "mlp",
    "config": {},
    "files": {"weights.safetensors": SHA},
    "tensors": {"w": {"dtype": "float32", "shape": [64]}},
    "metrics": {"accuracy": 0.5},
}

Call = Callable[[Any], Awaitable[Any]]

# --- strategies ---------------------------------------------------------------------------------

texts = st.text(max_size=40)
names = st.one_of(
    st.just(MODEL),  # twice: requests about the model that exists reach the deeper paths
    st.just(MODEL),
    st.sampled_from(["", "a/b", "..", "x" * 129]),
    texts,
    st.builds(lambda n: "n" * n, st.integers(0, 300_000)),
)
int64 = st.integers(-(2**63), 2**63 - 1)
versions = st.sampled_from([0, 1, 2, 2**63 - 1, -1]) | int64
aliases = st.sampled_from(["production", "", "Prod", "a" * 65]) | texts
tokens = st.sampled_from(["", "1", "9" * 30, "-1", "fuzz-model"]) | texts
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3),
    max_leaves=8,
)


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "bytes", "deep", "metrics", "big", "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        # Past the JSON parser's recursion limit (~1 000) but under the byte limit (64 KiB) too:
        # hypothesis alone draws mostly the bounds of a range.
        depth = draw(st.sampled_from([1_500, 20_000]) | st.integers(100, 100_000))
        return b"[" * depth + b"]" * depth
    manifest = json.loads(json.dumps(MANIFEST))
    if kind == "mutated":
        manifest[draw(st.sampled_from([*MANIFEST, "parent", "method"]) | texts)] = draw(json_values)
    elif kind == "metrics":
        count = draw(st.integers(LIMITS.max_metrics - 2, LIMITS.max_metrics + 2))
        manifest["metrics"] = {f"m{i}": float(i) for i in range(count)}
    elif kind == "big":
        pad = draw(st.integers(LIMITS.max_manifest_bytes - 300, LIMITS.max_manifest_bytes + 300))
        manifest["settings"] = {"pad": "x" * pad}
    return json.dumps(manifest).encode()


@st.composite
def uploads(draw: st.DrawFn) -> list[pb.RegisterVersionRequest]:
    header = pb.RegisterHeader(
        name=draw(names), manifest_json=draw(manifests()), alias=draw(st.just("") | aliases)
    )
    messages = [pb.RegisterVersionRequest(header=header)]
    for _ in range(draw(st.integers(0, 3))):
        file = draw(st.sampled_from(["weights.safetensors", "other"]) | texts)
        data = draw(st.sampled_from([WEIGHTS, WEIGHTS[:-4], b""]) | st.binary(max_size=100))
        messages.append(pb.RegisterVersionRequest(chunk=pb.FileChunk(file=file, data=data)))
    if draw(st.booleans()):  # a header where only chunks may come
        messages.append(pb.RegisterVersionRequest(header=header))
    return messages


def refs(draw: st.DrawFn) -> pb.VersionRef:
    which = draw(st.sampled_from(["version", "alias", "latest"]))
    if which == "version":
        return pb.VersionRef(name=draw(names), version=draw(versions))
    if which == "alias":
        return pb.VersionRef(name=draw(names), alias=draw(aliases))
    return pb.VersionRef(name=draw(names))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Any]:
    method = draw(
        st.sampled_from(
            [
                "GetVersion",
                "ListModels",
                "ListVersions",
                "SetAlias",
                "DeleteAlias",
                "DeleteVersion",
                "GetLineage",
                "GetAliasHistory",
                "RegisterVersion",
            ]
        )
    )
    build: dict[str, Callable[[], Any]] = {
        "GetVersion": lambda: pb.GetVersionRequest(ref=refs(draw), as_of_ms=draw(int64)),
        "ListModels": lambda: pb.ListModelsRequest(
            page_size=draw(st.integers(-(2**31), 2**31 - 1)), page_token=draw(tokens)
        ),
        "ListVersions": lambda: pb.ListVersionsRequest(
            name=draw(names),
            page_size=draw(st.integers(-(2**31), 2**31 - 1)),
            page_token=draw(tokens),
        ),
        "SetAlias": lambda: pb.SetAliasRequest(
            name=draw(names), alias=draw(aliases), version=draw(versions)
        ),
        "DeleteAlias": lambda: pb.DeleteAliasRequest(name=draw(names), alias=draw(aliases)),
        "DeleteVersion": lambda: pb.DeleteVersionRequest(name=draw(names), version=draw(versions)),
        "GetLineage": lambda: pb.GetLineageRequest(name=draw(names), version=draw(versions)),
        "GetAliasHistory": lambda: pb.GetAliasHistoryRequest(name=draw(names), alias=draw(aliases)),
        "RegisterVersion": lambda: draw(uploads()),
    }
    return method, build[method]()


def generate(count: int) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    @drawing(count)
    @given(requests())
    def collect(request: tuple[str, Any]) -> None:
        out.append(request)

    while len(out) < count:  # hypothesis skips the examples it already tried
        collect()
    return out[:count]


# --- the run ------------------------------------------------------------------------------------


@pytest.fixture
async def client(stack, tmp_path) -> AsyncIterator[RegistryClient]:
    async with registry_in_process(
        stack.settings,
        tmp_path,
        part_size_bytes=stack.settings.s3_part_size_bytes,
        limits=LIMITS,
    ) as (_service, c):
        yield c


async def send(client: RegistryClient, method: str, request: Any) -> grpc.StatusCode:
    rpc = getattr(client.stub, method)
    try:
        if method == "RegisterVersion":

            async def stream() -> AsyncIterator[pb.RegisterVersionRequest]:
                for message in request:
                    yield message

            await rpc(stream(), timeout=60)
        else:
            await rpc(request, timeout=60)
    except grpc.aio.AioRpcError as exc:
        assert len(exc.details() or "") < 4096, f"{method}: a {len(exc.details())}-char status"
        return exc.code()
    return grpc.StatusCode.OK


async def test_fuzzed_registry_requests_get_only_caller_mistake_statuses(client):
    registered = await client.register_files(
        MODEL, {"weights.safetensors": WEIGHTS}, json.dumps(MANIFEST).encode(), alias="production"
    )
    outcomes: collections.Counter[str] = collections.Counter()
    for method, request in generate(REQUESTS):
        code = await send(client, method, request)
        outcomes[f"{method} {code.name}"] += 1
        assert code in ACCEPTED, f"{method} answered {code.name} to {str(request)[:300]}"
    print("\n" + json.dumps(dict(sorted(outcomes.items())), indent=1))
    assert sum(outcomes.values()) == REQUESTS

    # Valid requests are still answered (the fuzzing may have deleted the first version).
    again = await client.register_files(
        MODEL, {"weights.safetensors": WEIGHTS}, json.dumps(MANIFEST).encode()
    )
    assert again.version > registered.version
    assert (await client.get(f"{MODEL}@{again.version}")).version == again.version
    page, _token = await client.list_versions(MODEL)
    assert page[0].version == again.version
