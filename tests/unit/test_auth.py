"""maas.edge: tokens, roles and the edge interceptor, on a real in-process gRPC server.

The test service speaks raw bytes (no protobuf), so each test shows one edge behaviour: who may
call what, what a refused or failed call answers, and who the handler sees as the caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from maas.config import Settings
from maas.edge import (
    STACK_IDENTITIES,
    Authorizer,
    Role,
    TokenTable,
    call_metadata,
    client_token,
    current_identity,
    edge_interceptor,
    ensure_tokens,
    open_channel,
    required_role,
)
from maas.edge import server as edge_server
from maas.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from maas.oip import grpc_predict_v2_pb2 as oip_pb
from maas.registry.v1 import registry_pb2 as registry_pb
from maas.training.v1 import training_pb2 as training_pb

SERVICE = "test.Things"


def tokens_of(directory: Path) -> dict[str, str]:
    return {name: (directory / f"{name}.token").read_text().strip() for name in STACK_IDENTITIES}


class Things:
    """Handlers of the test service; each records who called it."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    async def get(self, request: bytes, context: Any) -> bytes:
        self.callers.append(current_identity().name)
        if request == b"missing":
            raise NotFound("no thing 'missing'")
        if request == b"bug":
            raise KeyError("password=hunter2")
        return b"thing:" + request

    async def delete(self, request: bytes, context: Any) -> bytes:
        self.callers.append(current_identity().name)
        return b"deleted"

    async def register(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        self.callers.append(current_identity().name)
        return b"".join([r async for r in requests])

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        self.callers.append(current_identity().name)
        async for request in requests:
            yield b"re:" + request

    async def list(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.callers.append(current_identity().name)
        for i in range(3):
            yield b"%d" % i
        if request == b"bug":
            raise RuntimeError("secret stream failure")


@pytest.fixture
def auth_dir(tmp_path: Path) -> Path:
    ensure_tokens(tmp_path / "auth", STACK_IDENTITIES)
    return tmp_path / "auth"


@pytest.fixture
def settings(auth_dir: Path) -> Settings:
    return Settings(state_dir=str(auth_dir.parent), auth_token="")


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[tuple[str, Things]]:
    things = Things()
    srv = grpc.aio.server(interceptors=[edge_interceptor(settings)])
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "GetThing": grpc.unary_unary_rpc_method_handler(things.get),
                    "DeleteThing": grpc.unary_unary_rpc_method_handler(things.delete),
                    "RegisterThing": grpc.stream_unary_rpc_method_handler(things.register),
                    "ListThings": grpc.unary_stream_rpc_method_handler(things.list),
                    "ChatThings": grpc.stream_stream_rpc_method_handler(things.chat),
                },
            ),
        )
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}", things
    await srv.stop(None)


def meta(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def call(addr: str, method: str, request: Any = b"x", token: str | None = None) -> Any:
    """One raw call; ``request`` is bytes, or a list of bytes for a client stream."""
    async with grpc.aio.insecure_channel(addr) as channel:
        path = f"/{SERVICE}/{method}"
        metadata = meta(token) if token else None
        if method == "RegisterThing":
            return await channel.stream_unary(path)(iter(request), metadata=metadata)
        if method == "ListThings":
            return [r async for r in channel.unary_stream(path)(request, metadata=metadata)]
        return await channel.unary_unary(path)(request, metadata=metadata)


async def refused(addr: str, method: str, request: Any = b"x", token: str | None = None) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(addr, method, request, token)
    return info.value


# --- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("descriptor", "reads"),
    [
        (
            registry_pb.DESCRIPTOR.services_by_name["ModelRegistry"],
            {
                "GetVersion",
                "ListModels",
                "ListVersions",
                "GetLineage",
                "GetAliasHistory",
                "GetPolicy",
                "GetAliasTargets",
            },
        ),
        (
            oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            {
                "ServerLive",
                "ServerReady",
                "ModelReady",
                "ServerMetadata",
                "ModelMetadata",
                "ModelInfer",
                "ModelConfig",
                "ModelStatistics",
                "RepositoryIndex",
                "ModelStreamInfer",
            },
        ),
    ],
)
def test_reads_need_the_read_role_and_everything_else_write(descriptor: Any, reads: set[str]):
    for method in descriptor.methods:
        expected = Role.READ if method.name in reads else Role.WRITE
        assert required_role(f"/{descriptor.full_name}/{method.name}") is expected, method.name


def test_health_and_reflection_are_open():
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_write_implies_read_but_not_the_reverse():
    assert Role.WRITE.allows(Role.READ) and Role.WRITE.allows(Role.WRITE)
    assert Role.READ.allows(Role.READ) and not Role.READ.allows(Role.WRITE)


def test_the_training_data_plane_needs_the_service_role_which_no_operator_token_has():
    plane = training_pb.DESCRIPTOR.services_by_name["TrainingDataPlane"]
    for method in plane.methods:
        assert required_role(f"/{plane.full_name}/{method.name}") is Role.SERVICE
    assert Role.SERVICE.allows(Role.WRITE) and Role.SERVICE.allows(Role.READ)
    assert not Role.WRITE.allows(Role.SERVICE)
    assert STACK_IDENTITIES["services"] is Role.SERVICE
    assert [n for n, r in STACK_IDENTITIES.items() if r is Role.SERVICE] == ["services"]


# --- the token table ------------------------------------------------------------------------------


def test_generated_tokens_are_private_files_and_the_table_holds_only_digests(auth_dir: Path):
    table_text = (auth_dir / "tokens.json").read_text()
    for name, token in tokens_of(auth_dir).items():
        assert token.startswith("maas_") and len(token) > 40
        assert token not in table_text
        assert stat.S_IMODE((auth_dir / f"{name}.token").stat().st_mode) == 0o600
    assert stat.S_IMODE((auth_dir / "tokens.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(auth_dir.stat().st_mode) == 0o700


def test_ensuring_tokens_again_keeps_the_existing_ones_and_adds_new_identities(auth_dir: Path):
    before = tokens_of(auth_dir)
    ensure_tokens(auth_dir, {**STACK_IDENTITIES, "ci": Role.READ})
    assert tokens_of(auth_dir) == before
    table = TokenTable.load(auth_dir / "tokens.json")
    assert len(table) == len(STACK_IDENTITIES) + 1
    ci = (auth_dir / "ci.token").read_text().strip()
    assert table.identify(meta(ci)).name == "ci"


def test_a_table_from_an_older_version_gets_the_stack_roles_and_keeps_its_tokens(auth_dir: Path):
    table = auth_dir / "tokens.json"
    doc = json.loads(table.read_text())
    for entry in doc["tokens"]:
        if entry["identity"] == "services":
            entry["role"] = "write"
    table.write_text(json.dumps(doc))
    before = tokens_of(auth_dir)
    ensure_tokens(auth_dir, STACK_IDENTITIES)
    assert tokens_of(auth_dir) == before
    services = TokenTable.load(table).identify(meta(before["services"]))
    assert services.role is Role.SERVICE


def test_an_identity_comes_only_from_a_known_bearer_token(auth_dir: Path):
    table = TokenTable.load(auth_dir / "tokens.json")
    tokens = tokens_of(auth_dir)
    assert table.identify(meta(tokens["reader"])).role is Role.READ
    assert table.identify([("authorization", f"bearer  {tokens['admin']} ")]).name == "admin"
    # "\udcff": a header byte that is not UTF-8, as aiohttp hands it on
    for metadata in ([], meta("maas_guess"), [("authorization", tokens["admin"])], meta("\udcff")):
        with pytest.raises(Unauthenticated, match="authorization: Bearer"):
            table.identify(metadata)


def test_a_malformed_table_is_refused_naming_the_entry(tmp_path: Path):
    path = tmp_path / "tokens.json"
    entry = {"identity": "x", "role": "admin", "sha256": "0" * 64}
    path.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    with pytest.raises(
        InvalidArgument,
        match=r"tokens\[0\]\.role is 'admin'; use one of 'read', 'write', 'service'",
    ):
        TokenTable.load(path)


def test_auth_on_without_a_table_refuses_to_start(tmp_path: Path):
    with pytest.raises(FailedPrecondition, match="tokens.json does not exist.*MAAS_AUTH=off"):
        Authorizer.from_settings(Settings(state_dir=str(tmp_path)))
    assert Authorizer.from_settings(Settings(state_dir=str(tmp_path), auth=False)).table is None


def test_auth_is_on_unless_switched_off_explicitly():
    assert Settings().auth and Settings.from_env({}).auth
    assert not Settings.from_env({"MAAS_AUTH": "off"}).auth


def test_a_client_sends_the_token_setting_else_the_token_file(settings: Settings, auth_dir: Path):
    admin = tokens_of(auth_dir)["admin"]
    assert client_token(settings) == admin  # <state_dir>/auth/admin.token
    assert call_metadata(settings.replace(auth_token="t1")) == [("authorization", "Bearer t1")]
    reader_file = str(auth_dir / "reader.token")
    assert (
        client_token(settings.replace(auth_token_file=reader_file)) == tokens_of(auth_dir)["reader"]
    )
    assert client_token(Settings(state_dir=str(auth_dir / "elsewhere"))) is None
    with pytest.raises(FailedPrecondition, match="MAAS_AUTH_TOKEN_FILE=.*does not exist"):
        client_token(settings.replace(auth_token_file=str(auth_dir / "nope.token")))


def test_secrets_are_masked_when_settings_are_printed():
    shown = Settings(auth_token="maas_abc", kafka_sasl_password="pw").describe()
    assert shown["MAAS_AUTH_TOKEN"] == "***" and shown["MAAS_KAFKA_SASL_PASSWORD"] == "***"


# --- the interceptor on a real server -------------------------------------------------------------


@pytest.mark.parametrize("method", ["GetThing", "DeleteThing", "RegisterThing", "ListThings"])
async def test_without_a_token_every_kind_of_call_is_unauthenticated(server, method):
    addr, things = server
    request = [b"a", b"b"] if method == "RegisterThing" else b"x"
    error = await refused(addr, method, request)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in (error.details() or "")
    assert things.callers == []


async def test_an_unknown_token_is_unauthenticated_and_not_echoed(server):
    error = await refused(server[0], "GetThing", token="maas_not-a-real-token")
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not-a-real-token" not in (error.details() or "")


async def test_two_authorization_entries_are_unauthenticated_whatever_their_order(server, auth_dir):
    tokens = tokens_of(auth_dir)
    for first, second in (("reader", "admin"), ("admin", "reader")):
        metadata = meta(tokens[first]) + meta(tokens[second])
        async with grpc.aio.insecure_channel(server[0]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{SERVICE}/DeleteThing")(b"x", metadata=metadata)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "2 'authorization' entries" in (info.value.details() or "")


async def test_health_needs_no_token(server):
    async with grpc.aio.insecure_channel(server[0]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_read_token_reads_but_cannot_write(server, auth_dir):
    addr, things = server
    reader = tokens_of(auth_dir)["reader"]
    assert await call(addr, "GetThing", b"a", reader) == b"thing:a"
    assert await call(addr, "ListThings", b"", reader) == [b"0", b"1", b"2"]
    for method, request in (("DeleteThing", b"x"), ("RegisterThing", [b"a"])):
        error = await refused(addr, method, request, reader)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert f"'reader' has role read; {method} needs write" in (error.details() or "")
    assert things.callers == ["reader", "reader"]


async def test_a_refused_upload_still_gets_its_refusal_not_internal(server, auth_dir):
    """The client is still streaming when the refusal is decided (40 MiB here)."""
    reader = tokens_of(auth_dir)["reader"]
    error = await refused(server[0], "RegisterThing", [b"x" * (1 << 20)] * 40, reader)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert server[1].callers == []


async def test_a_refused_upload_that_pauses_mid_stream_still_gets_its_refusal(server, auth_dir):
    """A client-streaming caller cannot be waiting for an answer before it closes its side:
    its pauses (a slow disk, a slow link) are not taken for the quiet of a waiting stream."""
    reader = tokens_of(auth_dir)["reader"]

    async def slow_upload() -> AsyncIterator[bytes]:
        yield b"x" * (1 << 20)
        await asyncio.sleep(4 * edge_server.REFUSAL_QUIET_S)
        for _ in range(8):
            yield b"x" * (1 << 20)

    async with grpc.aio.insecure_channel(server[0]) as channel:
        upload = channel.stream_unary(f"/{SERVICE}/RegisterThing")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upload(slow_upload(), metadata=meta(reader))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert server[1].callers == []


async def test_a_refused_stream_that_waits_for_its_first_answer_is_answered_once_quiet(
    server, monkeypatch: pytest.MonkeyPatch
):
    """A bidirectional client that sent its first message and waits (a training link,
    tritonclient's stream) is not kept until the drain's limit: an hour, here."""
    monkeypatch.setattr(edge_server, "REFUSAL_DRAIN_S", 3600.0)
    async with grpc.aio.insecure_channel(server[0]) as channel:
        call = channel.stream_stream(f"/{SERVICE}/ChatThings")()
        await call.write(b"hello")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 60)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert server[1].callers == []


async def test_a_write_token_does_everything_and_the_handler_sees_its_identity(server, auth_dir):
    addr, things = server
    admin = tokens_of(auth_dir)["admin"]
    assert await call(addr, "DeleteThing", b"x", admin) == b"deleted"
    assert await call(addr, "RegisterThing", [b"a", b"b"], admin) == b"ab"
    assert await call(addr, "GetThing", b"a", admin) == b"thing:a"
    assert things.callers == ["admin", "admin", "admin"]


async def test_a_platform_error_keeps_its_code_and_message(server, auth_dir):
    error = await refused(server[0], "GetThing", b"missing", tokens_of(auth_dir)["admin"])
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "no thing 'missing'",
    )


@pytest.mark.parametrize("method", ["GetThing", "ListThings"])
async def test_an_unexpected_error_is_internal_with_only_a_request_id_the_log_names(
    server, auth_dir, caplog, method
):
    caplog.set_level(logging.ERROR, logger="maas.edge.server")
    error = await refused(server[0], method, b"bug", tokens_of(auth_dir)["admin"])
    details = error.details() or ""
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "hunter2" not in details and "secret" not in details and "Error" not in details
    request_id = re.fullmatch(
        r"internal error \(request id ([0-9a-f]{16}); see the server log\)", details
    )
    assert request_id, details
    (record,) = [r for r in caplog.records if request_id.group(1) in r.getMessage()]
    assert record.exc_info is not None  # the traceback is in the log, under that id


async def test_a_refused_call_is_never_parsed(settings, auth_dir):
    """A registry method refused for its token answers before the garbage body is decoded."""
    srv = grpc.aio.server(interceptors=[edge_interceptor(settings)])
    from maas.registry.v1 import registry_pb2_grpc

    registry_pb2_grpc.add_ModelRegistryServicer_to_server(
        registry_pb2_grpc.ModelRegistryServicer(), srv
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/maas.registry.v1.ModelRegistry/SetAlias")(
                    b"\xff\xff\xff not protobuf", metadata=meta(tokens_of(auth_dir)["reader"])
                )
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await srv.stop(None)


@pytest.fixture
async def typed_server(settings: Settings) -> AsyncIterator[str]:
    """One unary and one client-streaming method that parse GetVersionRequest messages."""

    async def one(request: Any, context: Any) -> bytes:
        return str(request.as_of_ms).encode()

    async def many(requests: AsyncIterator[Any], context: Any) -> bytes:
        return b",".join([str(r.as_of_ms).encode() async for r in requests])

    parse = registry_pb.GetVersionRequest.FromString
    srv = grpc.aio.server(interceptors=[edge_interceptor(settings.replace(auth=False))])
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "GetThing": grpc.unary_unary_rpc_method_handler(one, parse),
                    "RegisterThing": grpc.stream_unary_rpc_method_handler(many, parse),
                },
            ),
        )
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(None)


CORRUPT = b"\xff\xff\xff\xff\x0f"  # a varint that never ends


@pytest.mark.parametrize("method", ["GetThing", "RegisterThing"])
async def test_a_message_that_does_not_parse_is_invalid_argument_naming_its_type(
    typed_server, method
):
    good = registry_pb.GetVersionRequest(as_of_ms=5).SerializeToString()
    request = [good, CORRUPT] if method == "RegisterThing" else CORRUPT
    error = await refused(typed_server, method, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid maas.registry.v1.GetVersionRequest message" in (error.details() or "")
    assert await call(typed_server, method, [good, good] if method == "RegisterThing" else good)


async def test_with_auth_off_calls_run_as_anonymous(settings):
    things = Things()
    srv = grpc.aio.server(interceptors=[edge_interceptor(settings.replace(auth=False))])
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"DeleteThing": grpc.unary_unary_rpc_method_handler(things.delete)}
            ),
        )
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        assert await call(f"127.0.0.1:{port}", "DeleteThing") == b"deleted"
        assert things.callers == ["anonymous"]
    finally:
        await srv.stop(None)


async def test_open_channel_sends_this_process_token_on_every_kind_of_call(server, settings):
    addr, things = server
    async with open_channel(settings, addr) as channel:
        assert await channel.unary_unary(f"/{SERVICE}/DeleteThing")(b"x") == b"deleted"
        assert await channel.stream_unary(f"/{SERVICE}/RegisterThing")(iter([b"a"])) == b"a"
        streamed = channel.unary_stream(f"/{SERVICE}/ListThings")(b"")
        assert [r async for r in streamed] == [b"0", b"1", b"2"]
    assert things.callers == ["admin", "admin", "admin"]
