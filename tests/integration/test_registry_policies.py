"""Model policies and alias reasons over a real registry gRPC server (SQLite, real S3): every set
makes a new policy version, earlier ones stay readable, a wrong document is INVALID_ARGUMENT
naming the field, and an alias move keeps its reason in the history and in its event."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from infra.harness.registry import registry_in_process
from maas import zoo
from maas.errors import InvalidArgument, NotFound
from maas.registry.client import RegistryClient
from maas.registry.v1 import registry_pb2 as pb
from services.model_registry.service import RegistryService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 8, "hidden": [4], "num_classes": 2}
PLAN = {"compress": {"methods": [{"quantize": {"dtype": "int8"}}]}}
PROMOTE = {"alias": "production", "rule": "best_accuracy"}


@pytest.fixture(scope="module")
async def server(stack, tmp_path_factory) -> AsyncIterator[tuple[RegistryService, RegistryClient]]:
    async with registry_in_process(
        stack.settings,
        tmp_path_factory.mktemp("policies"),
        part_size_bytes=stack.settings.s3_part_size_bytes,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: tuple[RegistryService, RegistryClient]) -> RegistryClient:
    return server[1]


def a_name() -> str:
    return f"policy-{uuid.uuid4().hex[:8]}"


async def test_each_set_is_a_new_policy_version_and_earlier_ones_stay_readable(client):
    name = a_name()  # no version registered yet: a policy may come first
    first = await client.set_policy(name, {"on_registered": PLAN})
    second = await client.set_policy(name, {"on_registered": PLAN, "promote": PROMOTE})
    assert (first.version, second.version) == (1, 2)
    current = await client.get_policy(name)
    assert current.version == 2
    assert current.document["promote"] == PROMOTE
    assert (await client.get_policy(name, 1)).document == {"on_registered": PLAN}


async def test_a_model_without_a_policy_is_not_found_with_the_command_to_set_one(client):
    with pytest.raises(NotFound, match="maas models policy set"):
        await client.get_policy(a_name())


async def test_a_wrong_policy_is_invalid_argument_naming_the_field(client):
    name = a_name()
    with pytest.raises(InvalidArgument, match="promote.rule 'newest'"):
        await client.set_policy(name, {"promote": {"alias": "production", "rule": "newest"}})
    with pytest.raises(NotFound):
        await client.get_policy(name)  # nothing was stored


async def test_a_document_that_is_not_json_is_invalid_argument(client):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.stub.SetPolicy(pb.SetPolicyRequest(name=a_name(), document_json="{nope"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "document_json" in refused.value.details()


async def test_a_malformed_name_is_refused_before_the_document_is_read(client):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.stub.SetPolicy(pb.SetPolicyRequest(name="../x", document_json="{}"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model name '../x' is malformed" in refused.value.details()


async def test_an_alias_move_keeps_its_reason_and_actor_in_the_history(client, server):
    name = a_name()
    model = zoo.build("mlp", MLP)
    for _ in range(2):
        await client.register(model, name, "mlp", MLP)
    await client.set_alias(name, "production", 1)
    await client.set_alias(name, "production", 2, reason="canary looked fine")
    history = await client.alias_history(name, "production")
    assert [(c.to_version, c.reason) for c in history] == [(1, ""), (2, "canary looked fine")]
    assert all(c.actor for c in history)
    pending = server[0].metadata.pending_events(limit=1000)
    moved = [e.event for e in pending if e.key == name and e.event["event"] == "alias-set"]
    assert moved[-1]["reason"] == "canary looked fine"
