"""Auth on by default, as the real registry and inference processes enforce it: the stack's
token table (written by the `stack` fixture's `up`), real gRPC calls, the services' own logs.

The last test reads every log the processes wrote; keep it last.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.harness.serving import ServiceProcesses
from maas import zoo
from maas.cli_predict import predict
from maas.config import Settings
from maas.edge import STACK_IDENTITIES
from maas.errors import PermissionDenied, Unauthenticated
from maas.oip import grpc_predict_v2_pb2 as oip_pb
from maas.registry import RegistryClient
from maas.registry.types import ModelRef
from maas.registry.v1 import registry_pb2 as registry_pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 8, "hidden": [4], "num_classes": 3}
BOGUS = "maas_bogus-token-that-must-never-be-logged"


class Platform:
    def __init__(
        self, settings: Settings, processes: ServiceProcesses, registry: str, inference: str
    ):
        self.processes = processes
        self.registry = registry
        self.inference = inference
        self.settings = settings.replace(registry_addr=registry, inference_addr=inference)
        auth_dir = Path(settings.auth_tokens_file).parent
        self.tokens = {n: (auth_dir / f"{n}.token").read_text().strip() for n in STACK_IDENTITIES}

    def as_(self, identity: str) -> Settings:
        """Settings of a client holding ``identity``'s token."""
        return self.settings.replace(auth_token=self.tokens[identity])


@pytest.fixture(scope="module")
def platform(stack, tmp_path_factory) -> Iterator[Platform]:
    workdir = tmp_path_factory.mktemp("auth")
    with ServiceProcesses(workdir) as processes:
        registry = processes.start_registry()
        # Inference runs with its own read token, as in the stack: loading needs only reads.
        own_token = Path(stack.settings.auth_tokens_file).parent / "inference.token"
        inference = processes.start_inference(
            "inference", registry, MAAS_AUTH_TOKEN_FILE=str(own_token)
        )
        yield Platform(stack.settings, processes, registry, inference)


def a_name() -> str:
    return f"auth-{uuid.uuid4().hex[:8]}"


async def raw_call(addr: str, method: Any, metadata: Any = None) -> grpc.StatusCode:
    """Call ``method`` (a proto method descriptor) with an empty body; the status it ends with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    async with grpc.aio.insecure_channel(addr) as channel:
        try:
            if method.client_streaming and method.server_streaming:
                async for _ in channel.stream_stream(path)(iter([b""]), metadata=metadata):
                    pass
            elif method.client_streaming:
                await channel.stream_unary(path)(iter([b""]), metadata=metadata)
            elif method.server_streaming:
                async for _ in channel.unary_stream(path)(b"", metadata=metadata):
                    pass
            else:
                await channel.unary_unary(path)(b"", metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


SERVICES = [
    ("registry", registry_pb.DESCRIPTOR.services_by_name["ModelRegistry"]),
    ("inference", oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
]


@pytest.mark.parametrize(("server", "service"), SERVICES, ids=[s for s, _ in SERVICES])
async def test_without_a_token_every_rpc_but_health_is_unauthenticated(platform, server, service):
    addr = getattr(platform, server)
    codes = {m.name: await raw_call(addr, m) for m in service.methods}
    assert codes and set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    wrong = [("authorization", f"Bearer {BOGUS}")]
    assert await raw_call(addr, service.methods[0], wrong) is grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(addr) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_without_a_token_is_told_how_to_get_one(platform, tmp_path):
    tokenless = platform.settings.replace(
        auth_token="", auth_token_file="", state_dir=str(tmp_path)
    )
    async with RegistryClient(tokenless) as anonymous:
        with pytest.raises(Unauthenticated, match="authorization: Bearer <token>"):
            await anonymous.list_models()


async def test_a_read_token_reads_and_infers_but_cannot_register_alias_or_delete(platform):
    name = a_name()
    model = zoo.build("mlp", MLP, seed=1).eval()
    async with RegistryClient(platform.as_("admin")) as admin:
        await admin.register(model, name, "mlp", MLP, alias="production")
    async with RegistryClient(platform.as_("reader")) as reader:
        assert (await reader.get(f"{name}@production")).version == 1
        assert name in {m.name for m in await reader.list_models()}
        with pytest.raises(PermissionDenied, match="'reader' has role read; RegisterVersion"):
            await reader.register(model, name, "mlp", MLP)
        with pytest.raises(PermissionDenied, match="SetAlias needs write"):
            await reader.set_alias(name, "staging", 1)
        with pytest.raises(PermissionDenied, match="DeleteAlias needs write"):
            await reader.delete_alias(name, "production")
        with pytest.raises(PermissionDenied, match="DeleteVersion needs write"):
            await reader.delete_version(name, 1)
    answer = await predict(
        platform.as_("reader"), ModelRef.parse(name), np.ones((2, 8), np.float32)
    )
    assert answer["version"] == 1 and answer["outputs"]["output"].shape == (2, 3)
    async with RegistryClient(platform.as_("admin")) as admin:
        assert [v.version for v in (await admin.list_versions(name))[0]] == [1]
        assert (await admin.get(f"{name}@production")).version == 1


async def test_alias_history_names_the_token_identity_not_the_claimed_actor(platform):
    name = a_name()
    model = zoo.build("mlp", MLP, seed=2)
    async with RegistryClient(platform.as_("admin"), actor="mallory") as admin:
        first = await admin.register(model, name, "mlp", MLP)
        await admin.register(model, name, "mlp", MLP)
        await admin.set_alias(name, "production", 1)
    async with RegistryClient(platform.as_("services"), actor="mallory") as services:
        await services.set_alias(name, "production", 2)
        history = await services.alias_history(name, "production")
    assert first.created_by == "admin"
    assert [(c.to_version, c.actor) for c in history] == [(1, "admin"), (2, "services")]


def test_no_log_holds_a_secret(platform, stack):
    """Everything the processes logged (this module's calls, refusals with a bogus token,
    alias moves) holds no token, no S3 secret key and no presented bogus token."""
    logs = {p: p.read_text(errors="replace") for p in platform.processes.workdir.rglob("*.log")}
    assert len(logs) >= 2 and all(logs.values())
    secrets = {*platform.tokens.values(), BOGUS, stack.settings.s3_secret_key}
    leaks = [(path.name, s[:12]) for path, text in logs.items() for s in secrets if s in text]
    assert not leaks
