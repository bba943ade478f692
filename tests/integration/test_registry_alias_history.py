"""GetAliasHistory pages like the other list calls: ``page_size`` items at most, cut short so a
reply stays within MAAS_REGISTRY_MAX_REPLY_BYTES, and a ``next_page_token`` to go on with. A real
registry server in this process (a small reply limit) over gRPC, its artifacts in the real S3.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from infra.harness.registry import registry_in_process
from maas import zoo
from maas.errors import InvalidArgument
from maas.registry.client import RegistryClient
from maas.registry.types import AliasChange
from maas.registry.v1 import registry_pb2 as pb
from services.model_registry.service import RegistryLimits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 8, "hidden": [4], "num_classes": 2}
MAX_REPLY_BYTES = 1024  # about fifteen alias changes
MOVES = 40


@pytest.fixture(scope="module")
async def client(stack, tmp_path_factory) -> AsyncIterator[RegistryClient]:
    async with registry_in_process(
        stack.settings,
        tmp_path_factory.mktemp("alias-history"),
        part_size_bytes=stack.settings.s3_part_size_bytes,
        limits=RegistryLimits(max_reply_bytes=MAX_REPLY_BYTES),
    ) as (_service, registry):
        yield registry


@pytest.fixture(scope="module")
async def moved(client: RegistryClient) -> tuple[str, list[AliasChange]]:
    """A model whose aliases moved ``MOVES`` times, and those moves in order."""
    name = f"history-{uuid.uuid4().hex[:8]}"
    model = zoo.build("mlp", MLP)
    for _ in range(2):
        await client.register(model, name, "mlp", MLP)
    moves = [
        await client.set_alias(name, "production" if i % 3 else "staging", 1 + i % 2)
        for i in range(MOVES)
    ]
    return name, moves


async def test_a_history_longer_than_the_reply_limit_comes_in_pages_that_fit(client, moved):
    name, moves = moved
    replies, token = [], ""
    while True:
        request = pb.GetAliasHistoryRequest(name=name, page_token=token)
        replies.append(await client.stub.GetAliasHistory(request))
        token = replies[-1].next_page_token
        if not token:
            break
    assert len(replies) > 1  # 40 changes do not fit 1 KiB
    assert all(reply.ByteSize() <= MAX_REPLY_BYTES for reply in replies)
    got = [(c.alias, c.from_version, c.to_version, c.ts_ms) for r in replies for c in r.changes]
    assert got == [(m.alias, m.from_version or 0, m.to_version, m.ts_ms) for m in moves]


async def test_page_size_bounds_a_page_and_the_alias_filter_holds_across_pages(client, moved):
    name, moves = moved
    pages, token = [], ""
    while True:
        page, token = await client.alias_history_page(
            name, "staging", page_size=3, page_token=token
        )
        pages.append(page)
        if not token:
            break
    assert all(len(page) <= 3 for page in pages)
    assert [c for page in pages for c in page] == [m for m in moves if m.alias == "staging"]


async def test_the_client_reads_every_page(client, moved):
    name, moves = moved
    assert await client.alias_history(name) == moves


@pytest.mark.parametrize("token", ["abc", "-1", "9" * 30])
async def test_a_page_token_this_server_never_issued_is_invalid(client, moved, token):
    with pytest.raises(InvalidArgument, match="page_token"):
        await client.alias_history_page(moved[0], page_token=token)
