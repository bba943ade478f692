"""Weighted aliases in the inference core: the weighted draw, sticky routing keys, a split learned
from the source or an alias-set event, and a rollback that is just another alias move."""

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from maas import zoo
from maas.errors import InvalidArgument
from maas.oip import grpc_predict_v2_pb2 as oip
from services.inference.batcher import BatchingConfig
from services.inference.canary import Splits, pick, routing_key
from services.inference.dataplane import DataPlane
from services.inference.sources import MemorySource

MLP = {"in_features": 4, "hidden": [4], "num_classes": 2}
SPLIT = ((4, 90), (5, 10))


def test_a_seeded_draw_splits_by_weight():
    rng = random.Random(1)
    drawn = Counter(pick(SPLIT, "", rng) for _ in range(10_000))
    assert 8_800 <= drawn[4] <= 9_200
    assert drawn[4] + drawn[5] == 10_000


def test_the_same_seed_draws_the_same_versions():
    first = [pick(SPLIT, "", random.Random(3)) for _ in range(50)]
    assert first == [pick(SPLIT, "", random.Random(3)) for _ in range(50)]


def test_a_routing_key_always_lands_on_the_same_version():
    rng = random.Random()
    for key in (f"user-{i}" for i in range(50)):
        assert len({pick(SPLIT, key, rng) for _ in range(20)}) == 1


def test_routing_keys_spread_over_the_split_by_weight():
    drawn = Counter(pick(SPLIT, f"user-{i}", random.Random()) for i in range(5_000))
    assert 4_350 <= drawn[4] <= 4_650


def test_a_single_target_is_no_split():
    splits = Splits(seed=0)
    splits.set(("m", "production"), ((4, 100),))
    assert not splits.weighted(("m", "production"))
    assert splits.pick(("m", "production"), 4) == 4


def test_the_routing_key_comes_from_the_oip_parameter_before_the_metadata():
    request = oip.ModelInferRequest()
    request.parameters["maas-routing-key"].string_param = "alice"
    assert routing_key(request.parameters, [("maas-routing-key", "bob")]) == "alice"
    assert routing_key(oip.ModelInferRequest().parameters, [("maas-routing-key", "bob")]) == "bob"
    assert routing_key(oip.ModelInferRequest().parameters, None) == ""


def test_a_whole_number_routing_key_is_its_decimal_text():
    # tritonclient sends a Python int as int64_param: it was ignored, the request unsticky.
    request = oip.ModelInferRequest()
    request.parameters["maas-routing-key"].int64_param = 12345
    assert routing_key(request.parameters, None) == "12345"


def test_a_routing_key_of_another_kind_is_refused_naming_it():
    request = oip.ModelInferRequest()
    request.parameters["maas-routing-key"].double_param = 1.5
    with pytest.raises(InvalidArgument, match="maas-routing-key is a double_param; send it as"):
        routing_key(request.parameters, None)


@pytest.fixture
async def canary():
    source = MemorySource()
    for seed in range(5):
        source.add("m", zoo.build("mlp", MLP, seed=seed), "mlp", MLP)
    source.set_split("m", "production", SPLIT)
    with ThreadPoolExecutor(2) as pool:
        plane = DataPlane(source, pool, batching=BatchingConfig(), cache_bytes=1 << 30)
        plane.splits = Splits(seed=0)
        yield source, plane
        await plane.close()


async def served(plane: DataPlane, version: str, n: int, key=lambda i: "") -> Counter:
    return Counter([(await plane.model("m", version, key(i))).version for i in range(n)])


async def test_requests_to_a_split_alias_follow_its_weights(canary):
    _, plane = canary
    counts = await served(plane, "production", 2_000)
    assert 1_740 <= counts[4] <= 1_860 and counts[4] + counts[5] == 2_000


async def test_a_bare_name_follows_the_split_of_production(canary):
    _, plane = canary
    assert set(await served(plane, "", 200)) == {4, 5}


async def test_a_keyed_request_stays_on_its_version(canary):
    _, plane = canary
    counts = await served(plane, "production", 100, key=lambda i: "alice")
    assert len(counts) == 1


async def test_an_alias_move_to_one_version_rolls_the_split_back(canary):
    source, plane = canary
    await served(plane, "production", 50)
    source.set_alias("m", "production", 4)
    await plane.on_model_event(
        {"event": "alias-set", "name": "m", "alias": "production", "version": 4}
    )
    await plane.wait_background()
    assert await served(plane, "production", 200) == Counter({4: 200})


async def test_a_split_set_by_an_event_applies_to_an_alias_already_served(canary):
    source, plane = canary
    source.set_alias("m", "staging", 1)
    assert await served(plane, "staging", 20) == Counter({1: 20})
    source.set_split("m", "staging", ((1, 50), (2, 50)))
    event = {"event": "alias-set", "name": "m", "alias": "staging", "version": 1,
             "targets": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]}  # fmt: skip
    await plane.on_model_event(event)
    await plane.wait_background()
    assert set(await served(plane, "staging", 100)) == {1, 2}


async def test_an_alias_set_event_is_checked_with_the_registry_not_taken_as_said(canary):
    _, plane = canary
    assert set(await served(plane, "production", 200)) == {4, 5}
    forged = {"event": "alias-set", "name": "m", "alias": "production", "version": 1,
              "targets": [{"version": 1, "weight": 50}, {"version": 9, "weight": 50}]}  # fmt: skip
    await plane.on_model_event(forged)
    await plane.wait_background()
    assert set(await served(plane, "production", 200)) == {4, 5}
    assert set(await served(plane, "", 200)) == {4, 5}
