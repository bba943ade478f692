"""The registry's gRPC server in-process over a real channel, with S3 replaced by a dict.

Covers the edge (status codes, the error interceptor, health, reflection) and the registration
flow (streaming, sha256 checks, numbering). The real S3 + Kafka path is in
tests/integration/test_registry.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import urllib3
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from maas.config import Settings
from maas.edge import STACK_IDENTITIES, ensure_tokens, status_for
from maas.errors import (
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    SchemaViolation,
    Unavailable,
)
from maas.registry.client import RegistryClient
from maas.registry.v1 import registry_pb2 as pb
from maas.store import SHA256_META
from services.model_registry.service import RegistryLimits, RegistryService
from services.model_registry.servicer import SERVICE_NAME, build_server, set_serving
from services.model_registry.sqlite_store import SqliteStore
from services.model_registry.uploads import weights_max_bytes

# ~10 MB of real safetensors: several chunks and several parts
WEIGHTS = safetensors_numpy.save({"w": np.arange(2_560_000, dtype=np.float32)})


class FakeMinio:
    """put_object as minio does it for unknown lengths: read part by part until EOF."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.writing: list[str] = []  # every key an upload was opened for
        self.down = False

    def put_object(
        self,
        bucket: str,
        key: str,
        data: Any,
        length: int,
        *,
        part_size: int,
        metadata: dict[str, str],
    ) -> None:
        assert length == -1
        self.writing.append(f"{bucket}/{key}")
        body = b""
        while block := data.read(part_size + 1):
            if self.down:
                raise urllib3.exceptions.NewConnectionError(None, "connection refused")  # type: ignore[arg-type]
            body += block
        self.objects[f"{bucket}/{key}"] = (body, metadata)


class FakeStore:
    """The parts of AsyncObjectStore the registry service uses."""

    def __init__(self) -> None:
        self.client = FakeMinio()
        self.sync = self

    async def put_bytes(self, bucket: str, key: str, data: bytes, **_: Any) -> None:
        if self.client.down:
            raise Unavailable("S3 is down")
        self.client.objects[f"{bucket}/{key}"] = (data, {})

    async def exists(self, bucket: str, key: str) -> bool:
        if self.client.down:
            raise Unavailable("S3 is down")
        return f"{bucket}/{key}" in self.client.objects

    async def abort_incomplete_uploads(self, bucket: str, prefix: str = "") -> int:
        if self.client.down:
            raise Unavailable("S3 is down")
        return 0

    async def copy(self, bucket: str, source_key: str, key: str, *, sha256: str) -> None:
        if self.client.down:
            raise Unavailable("S3 is down")
        data, _ = self.client.objects[f"{bucket}/{source_key}"]
        self.client.objects[f"{bucket}/{key}"] = (data, {SHA256_META: sha256})

    async def delete_prefix(self, bucket: str, prefix: str) -> int:
        if self.client.down:
            raise Unavailable("S3 is down")
        doomed = [k for k in self.client.objects if k.startswith(f"{bucket}/{prefix}")]
        for key in doomed:
            del self.client.objects[key]
        return len(doomed)


def manifest_for(files: dict[str, bytes], **extra: Any) -> bytes:
    return json.dumps(
        {
            "arch": "mlp",
            "config": {},
            "format": "dense",
            "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
            "parent": None,
            "method": "train",
            "job_id": None,
            "metrics": {},
            **extra,
        }
    ).encode()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Auth on, as by default: the server reads the table, the client sends admin's token."""
    ensure_tokens(tmp_path / "auth", STACK_IDENTITIES)
    return Settings(state_dir=str(tmp_path), auth_token="")


@pytest.fixture
async def server(
    request: pytest.FixtureRequest, tmp_path: Path, settings: Settings
) -> AsyncIterator[tuple[RegistryService, FakeStore, str]]:
    """The default limits, or those a test passes (``parametrize(..., indirect=True)``)."""
    store = FakeStore()
    service = RegistryService(
        SqliteStore(tmp_path / "r.db"),
        store,  # type: ignore[arg-type]
        bucket="maas-models",
        part_size_bytes=4 * 1024 * 1024,
        limits=getattr(request, "param", RegistryLimits()),
    )
    grpc_server, health = build_server(service, settings)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    await set_serving(health, True)
    yield service, store, f"127.0.0.1:{port}"
    await grpc_server.stop(None)
    service.close()


@pytest.fixture
async def client(
    server: tuple[RegistryService, FakeStore, str], settings: Settings
) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(
        settings, addr=server[2], actor="tester", chunk_bytes=1024 * 1024
    ) as c:
        yield c


# --- the interceptor's mapping -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (SchemaViolation("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (MaasError("x"), grpc.StatusCode.INTERNAL),
        (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_maps_to_one_status(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error)[0] is code


def test_unknown_failures_do_not_leak_their_message() -> None:
    code, message = status_for(RuntimeError("password=hunter2"))
    assert code is grpc.StatusCode.INTERNAL and "hunter2" not in message


def test_an_error_without_a_usable_grpc_code_is_internal() -> None:
    class Odd(MaasError):
        grpc_code = "NOT_A_STATUS"

    class Lookalike(Exception):
        grpc_code = "NOT_FOUND"  # not a MaasError: its message is not meant for clients

    assert status_for(Odd("x"))[0] is grpc.StatusCode.INTERNAL
    assert status_for(Lookalike("x"))[0] is grpc.StatusCode.INTERNAL


async def test_an_unexpected_exception_becomes_internal_over_the_wire(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(server[0].metadata, "get_version", broken)
    with pytest.raises(MaasError, match=r"internal error \(request id [0-9a-f]+; see the server"):
        await client.get("digits@1")


# --- status codes for bad requests ---------------------------------------------------------------


async def test_unknown_model_version_and_alias_are_not_found_by_name(
    client: RegistryClient,
) -> None:
    await client.register_files("digits", {"w": WEIGHTS}, manifest_for({"w": WEIGHTS}))
    with pytest.raises(NotFound, match="'nope' is not registered"):
        await client.get("nope")
    with pytest.raises(NotFound, match="has no version 7"):
        await client.get("digits@7")
    with pytest.raises(NotFound, match="has no alias 'production'"):
        await client.get("digits@production")


async def test_the_registry_address_is_named_only_when_the_registry_could_not_be_reached(
    client: RegistryClient, settings: Settings
) -> None:
    with pytest.raises(NotFound) as answered:
        await client.get("nope")
    assert client.addr not in answered.value.message  # a server's caller learns no address
    async with RegistryClient(settings, addr="127.0.0.1:1", actor="tester") as unreachable:
        with pytest.raises(Unavailable, match=r"registry at 127\.0\.0\.1:1; .*MAAS_REGISTRY_ADDR"):
            await unreachable.get("nope")


async def test_a_readiness_ping_passes_a_serving_registry_and_names_an_unreachable_one(
    client: RegistryClient, settings: Settings
) -> None:
    await client.ping()
    async with RegistryClient(settings, addr="127.0.0.1:1", actor="tester") as unreachable:
        with pytest.raises(Unavailable, match=r"health check \(registry at 127\.0\.0\.1:1"):
            await unreachable.ping()


async def test_malformed_names_are_invalid_arguments(client: RegistryClient) -> None:
    with pytest.raises(InvalidArgument, match="model name 'bad/name'"):
        await client.register_files("bad/name", {"w": WEIGHTS}, manifest_for({"w": WEIGHTS}))
    # The raw stub, since the client refuses such names before sending them.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(name="a b")))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "model name 'a b' is malformed" in (caught.value.details() or "")


async def test_a_time_before_1970_is_an_invalid_argument_not_a_miss(client: RegistryClient) -> None:
    request = pb.GetVersionRequest(
        ref=pb.VersionRef(name="digits", alias="production"), as_of_ms=-1
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetVersion(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "as_of_ms=-1 is before 1970" in (caught.value.details() or "")


async def test_a_malformed_manifest_is_an_invalid_argument(client: RegistryClient) -> None:
    with pytest.raises(InvalidArgument, match="manifest.arch"):
        await client.register_files("digits", {"w": WEIGHTS}, b'{"files": {}}')


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "infinity"])
async def test_a_metric_that_is_not_finite_is_refused_naming_it(
    client: RegistryClient, value: float
) -> None:
    files = {"weights.safetensors": WEIGHTS}
    manifest = manifest_for(files, metrics={"accuracy": value})
    with pytest.raises(InvalidArgument, match="manifest.metrics.accuracy is .*finite numbers"):
        await client.register_files("digits", files, manifest)


@pytest.mark.parametrize(
    ("arch", "config", "complaint"),
    [
        ("resnet", {}, r"manifest\.arch: unknown arch 'resnet'; accepted: bert, cnn"),
        (
            "mlp",
            {"in_features": 10**30},
            r"manifest\.config\.hidden\[0\]: .* MAAS_MAX_MODEL_PARAMS",
        ),
        ("gpt", {"in_features": 64}, r"manifest\.config\.in_features: unknown key"),
    ],
    ids=["unknown-arch", "too-large", "foreign-config"],
)
async def test_a_version_no_server_could_build_is_refused_naming_the_field(
    client: RegistryClient, arch: str, config: dict[str, Any], complaint: str
) -> None:
    files = {"weights.safetensors": WEIGHTS}
    manifest = manifest_for(files, arch=arch, config=config)
    with pytest.raises(InvalidArgument, match=complaint):
        await client.register_files("digits", files, manifest)


# --- registration --------------------------------------------------------------------------------


async def test_registered_files_are_stored_under_name_and_version_with_their_sha256(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    files = {"weights.safetensors": WEIGHTS, "extra.json": b"{}"}
    manifest = manifest_for(files)
    version = await client.register_files("digits", files, manifest, alias="staging")
    assert (version.version, version.aliases, version.created_by) == (1, ("staging",), "admin")
    stored = server[1].client.objects
    body, meta = stored["maas-models/digits/1/weights.safetensors"]
    assert body == WEIGHTS
    assert meta[SHA256_META] == hashlib.sha256(WEIGHTS).hexdigest()
    assert stored["maas-models/digits/1/manifest.json"][0] == manifest
    assert {f.name: f.size_bytes for f in version.files} == {
        "weights.safetensors": len(WEIGHTS),
        "extra.json": 2,
    }


async def test_an_alias_is_not_moved_onto_a_version_whose_files_are_gone_from_s3(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    # It moved, and every request for the alias then failed: "registered but its artifact is
    # missing from S3".
    files = {"weights.safetensors": WEIGHTS}
    await client.register_files("digits", files, manifest_for(files), alias="production")
    await client.register_files("digits", files, manifest_for(files))
    del server[1].client.objects["maas-models/digits/2/weights.safetensors"]
    with pytest.raises(FailedPrecondition, match="digits@2's weights.safetensors is missing"):
        await client.set_alias("digits", "production", 2)
    assert (await client.get("digits@production")).version == 1


async def test_a_wrong_split_is_refused_before_any_version_is_looked_up_in_s3(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    # 5 000 targets naming one version were checked in S3 one by one (past the deadline)
    # before the split itself was refused.
    files = {"weights.safetensors": WEIGHTS}
    await client.register_files("digits", files, manifest_for(files))
    server[1].client.down = True  # any S3 request now fails
    request = pb.SetAliasRequest(
        name="digits", alias="production", targets=[pb.AliasTarget(version=1, weight=1)] * 5000
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.SetAlias(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "5000 given; a split takes at most 100" in (caught.value.details() or "")


async def test_a_file_that_does_not_match_its_sha256_registers_nothing(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    manifest = manifest_for({"w": WEIGHTS})
    tampered = WEIGHTS[:-1] + b"\x00"
    with pytest.raises(FailedPrecondition, match="tampered"):
        await client.register_files("digits", {"w": tampered}, manifest)
    with pytest.raises(NotFound):
        await client.get("digits")
    assert server[1].client.objects == {}


@pytest.mark.parametrize(
    ("weights", "tensors", "reason"),
    [
        (b"PK\x03\x04 a pickled torch file", None, "not safetensors"),
        (WEIGHTS, {"w": {"dtype": "float16", "shape": [2_560_000]}}, "w is float32"),
    ],
    ids=["not-safetensors", "manifest-mismatch"],
)
async def test_weights_that_are_not_the_declared_safetensors_register_nothing(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
    weights: bytes,
    tensors: dict | None,
    reason: str,
) -> None:
    files = {"weights.safetensors": weights}
    manifest = manifest_for(files, **({"tensors": tensors} if tensors else {}))
    with pytest.raises(InvalidArgument, match=reason):
        await client.register_files("digits", files, manifest)
    with pytest.raises(NotFound):
        await client.get("digits")
    assert server[1].client.objects == {}


async def test_a_file_the_manifest_lists_but_never_came_registers_nothing(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    manifest = manifest_for({"w": WEIGHTS, "extra": b"x"})
    with pytest.raises(FailedPrecondition, match=r"\['extra'\].*not sent"):
        await client.register_files("digits", {"w": WEIGHTS}, manifest)
    assert server[1].client.objects == {}
    assert (
        await client.register_files("digits", {"w": WEIGHTS, "extra": b"x"}, manifest)
    ).version == 1


async def test_a_file_the_manifest_does_not_list_is_invalid(client: RegistryClient) -> None:
    with pytest.raises(InvalidArgument, match="'other' is not in the manifest"):
        await client.register_files(
            "digits", {"w": WEIGHTS, "other": b"x"}, manifest_for({"w": WEIGHTS})
        )


@pytest.mark.parametrize("server", [RegistryLimits(max_side_file_bytes=1024)], indirect=True)
async def test_a_side_file_over_its_cap_is_refused_while_it_streams_and_registers_nothing(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    files = {"weights.safetensors": WEIGHTS, "vocab.txt": b"x" * 1025}
    with pytest.raises(
        InvalidArgument,
        match=r"file 'vocab.txt' is over 1,024 bytes; that is MAAS_REGISTRY_MAX_SIDE_FILE_BYTES",
    ):
        await client.register_files("digits", files, manifest_for(files))
    with pytest.raises(NotFound):
        await client.get("digits")
    files["vocab.txt"] = b"x" * 1024
    assert (await client.register_files("digits", files, manifest_for(files))).version == 1


def test_a_weights_file_is_capped_by_the_largest_model_the_registry_accepts() -> None:
    caps = RegistryLimits(max_model_params=1000).file_caps()
    caps.check("model.safetensors", caps.weights)
    with pytest.raises(InvalidArgument, match="a model within MAAS_MAX_MODEL_PARAMS needs no"):
        caps.check("model.safetensors", caps.weights + 1)
    assert caps.weights == weights_max_bytes(1000) == 8 * 1000 + 8 + 16 * 1024 * 1024


async def test_s3_down_is_unavailable_and_leaves_no_version(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    server[1].client.down = True
    with pytest.raises(Unavailable):
        await client.register_files("digits", {"w": WEIGHTS}, manifest_for({"w": WEIGHTS}))
    server[1].client.down = False
    assert server[0].metadata.next_version("digits") == 1
    assert server[0].metadata.pending_events() == []


async def test_leftovers_of_an_earlier_attempt_at_a_number_are_cleared(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    stored = server[1].client.objects
    stored["maas-models/digits/1/stale.bin"] = (b"from a crashed attempt", {})
    await client.register_files("digits", {"w": WEIGHTS}, manifest_for({"w": WEIGHTS}))
    assert sorted(stored) == ["maas-models/digits/1/manifest.json", "maas-models/digits/1/w"]


async def test_a_client_that_goes_away_mid_upload_leaves_no_version_and_no_files(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    manifest = manifest_for({"w": WEIGHTS})
    call = client.stub.RegisterVersion()
    await call.write(
        pb.RegisterVersionRequest(header=pb.RegisterHeader(name="digits", manifest_json=manifest))
    )
    await call.write(pb.RegisterVersionRequest(chunk=pb.FileChunk(file="w", data=WEIGHTS[:1000])))
    call.cancel()
    # The number is free again (the model's lock was released) and nothing was kept.
    version = await asyncio.wait_for(
        client.register_files("digits", {"w": WEIGHTS}, manifest), timeout=30
    )
    assert version.version == 1
    assert sorted(server[1].client.objects) == [
        "maas-models/digits/1/manifest.json",
        "maas-models/digits/1/w",
    ]


async def test_a_stalled_upload_holds_up_no_other_registration_of_its_model(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    """A client that sends part of its weights and then nothing (a slow link, a stuck writer):
    the next registration of the same model commits meanwhile and takes the next number; the
    stalled one, once it finishes, takes the number after it."""
    manifest = manifest_for({"w": WEIGHTS})
    stalled = client.stub.RegisterVersion()
    await stalled.write(
        pb.RegisterVersionRequest(header=pb.RegisterHeader(name="digits", manifest_json=manifest))
    )
    await stalled.write(
        pb.RegisterVersionRequest(chunk=pb.FileChunk(file="w", data=WEIGHTS[:1000]))
    )
    async with asyncio.timeout(30):
        while not server[1].client.writing:  # its upload is open: the registry is in it
            await asyncio.sleep(0.01)
    small = {"w": b"weights"}
    async with asyncio.timeout(30):  # the stalled client's chunk timeout is 60 s
        beside = await client.register_files("digits", small, manifest_for(small))
    assert beside.version == 1
    await stalled.write(
        pb.RegisterVersionRequest(chunk=pb.FileChunk(file="w", data=WEIGHTS[1000:]))
    )
    await stalled.done_writing()
    assert (await stalled).version == 2
    assert not [key for key in server[1].client.objects if "/.staging/" in key]


async def test_the_start_up_sweep_empties_the_staging_area(
    server: tuple[RegistryService, FakeStore, str],
) -> None:
    stored = server[1].client.objects
    stored["maas-models/.staging/0f3a/w"] = (b"uploaded before a crash", {})
    stored["maas-models/digits/1/w"] = (b"a version's", {})
    await server[0].sweep_incomplete_uploads()
    assert sorted(stored) == ["maas-models/digits/1/w"]


async def test_concurrent_registrations_get_consecutive_versions(
    client: RegistryClient,
) -> None:
    small = {"w": b"weights"}
    results = await asyncio.gather(
        *(client.register_files("digits", small, manifest_for(small)) for _ in range(20))
    )
    assert sorted(v.version for v in results) == list(range(1, 21))


async def test_deleting_a_version_removes_its_files(
    server: tuple[RegistryService, FakeStore, str],
    client: RegistryClient,
) -> None:
    await client.register_files("digits", {"w": WEIGHTS}, manifest_for({"w": WEIGHTS}))
    deleted = await client.delete_version("digits", 1)
    assert deleted.deleted_ms is not None
    assert server[1].client.objects == {}


# --- health and reflection -----------------------------------------------------------------------


async def test_the_server_reports_serving_and_describes_itself(
    server: tuple[RegistryService, FakeStore, str],
) -> None:
    async with grpc.aio.insecure_channel(server[2]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [a async for a in reflect.ServerReflectionInfo(iter([request]))]
    assert len(answers) == 1
    assert SERVICE_NAME in {s.name for s in answers[0].list_services_response.service}


async def test_reflection_v1_answers_as_v1alpha_does_without_a_token(
    server: tuple[RegistryService, FakeStore, str],
) -> None:
    # grpcurl and newer tools ask v1 first: the same messages under grpc.reflection.v1.
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    async with grpc.aio.insecure_channel(server[2]) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        answers = [a async for a in info(iter([request]))]
    [answer] = answers
    assert answer.file_descriptor_response.file_descriptor_proto  # the registry's .proto
