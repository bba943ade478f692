"""Hot swaps: an alias move changes the served version in the background, requests never fail
or go backwards, and lookups racing a move are not remembered."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from dataplane_kit import MLP, answer, assert_from, make_plane, model

from maas.errors import NotFound, Unavailable
from services.inference import dataplane
from services.inference.metrics import Metrics


def alias_set(version, alias="production"):
    return {"event": "alias-set", "name": "digits", "alias": alias, "version": version}


async def promote(source, plane, version):
    """What the registry does: move production, then announce it."""
    source.set_alias("digits", "production", version)
    await plane.on_model_event(alias_set(version))


async def until_served(plane, version, timeout_s=60.0):
    """Wait until requests are answered by ``version`` (the signal, not a guessed delay)."""
    async with asyncio.timeout(timeout_s):
        while (await answer(plane))[0] != version:
            await asyncio.sleep(0.01)


async def test_an_alias_move_swaps_the_served_version_in_the_background(source, pool):
    plane = make_plane(source, pool)
    assert (await answer(plane))[0] == 1
    await promote(source, plane, 2)
    await plane.wait_background()
    version, out = await answer(plane)
    assert version == 2
    assert_from(out, model(2))


async def test_requests_keep_the_old_version_while_the_new_one_loads(source, pool):
    plane = make_plane(source, pool)
    await answer(plane)
    source.gates[2] = asyncio.Event()
    await promote(source, plane, 2)
    during = await asyncio.gather(*(answer(plane) for _ in range(5)))
    assert {v for v, _ in during} == {1}
    source.gates[2].set()
    await plane.wait_background()
    assert (await answer(plane))[0] == 2


async def test_a_request_in_flight_during_the_swap_finishes_on_the_old_version(source):
    with ThreadPoolExecutor(max_workers=1) as one_worker:
        plane = make_plane(source, one_worker)
        await answer(plane)
        release = threading.Event()
        one_worker.submit(release.wait, 10)  # the only worker is busy: forwards queue behind it
        in_flight = asyncio.ensure_future(answer(plane))
        await asyncio.sleep(0.05)
        await promote(source, plane, 2)
        release.set()
        version, out = await in_flight
        await plane.wait_background()
        assert version == 1
        assert_from(out, model(1))
        assert (await answer(plane))[0] == 2


async def test_the_latest_alias_move_wins_even_if_an_older_load_finishes_last(source, pool):
    source.add("digits", model(3), "mlp", MLP)
    plane = make_plane(source, pool)
    await answer(plane)
    source.gates[2] = asyncio.Event()
    await promote(source, plane, 2)
    await asyncio.wait_for(source.held[2].wait(), 60)  # version 2 is loading, held at its gate
    await promote(source, plane, 3)
    await until_served(plane, 3)  # version 3 loads and is swapped in while 2 is still held
    source.gates[2].set()
    await plane.wait_background()
    assert (await answer(plane))[0] == 3


async def test_a_version_that_fails_to_load_is_not_swapped_in(source, pool):
    metrics = Metrics()
    plane = make_plane(source, pool, metrics=metrics)
    await answer(plane)
    files = source.files("digits", 2)
    files["weights.safetensors"] = b"tampered"
    await promote(source, plane, 2)
    await plane.wait_background()
    assert (await answer(plane))[0] == 1
    assert metrics.swaps.labels("digits", "failed")._value.get() == 1


async def test_a_move_of_an_alias_not_served_here_loads_nothing(source, pool):
    plane = make_plane(source, pool)
    await answer(plane)
    await plane.on_model_event(alias_set(1, alias="staging"))
    await plane.wait_background()
    assert source.fetches == [1]


async def until_waiting(source, count, timeout_s=60.0):
    """Wait until ``count`` resolutions read their answer and wait to send it back."""
    async with asyncio.timeout(timeout_s):
        while source.waiting < count:
            await asyncio.sleep(0.001)


async def test_a_resolution_racing_an_alias_move_is_not_cached(source, pool):
    plane = make_plane(source, pool)
    source.answer_sent.clear()
    pending = asyncio.ensure_future(answer(plane))  # the registry answers production -> 1 ...
    await until_waiting(source, 1)
    await promote(source, plane, 2)  # ... and the alias moves before that arrives
    source.answer_sent.set()
    assert (await pending)[0] == 1
    assert (await answer(plane))[0] == 2


async def test_deleting_a_version_drops_it_and_the_aliases_on_it(source, pool):
    plane = make_plane(source, pool)
    await answer(plane)
    await answer(plane, "2")
    await plane.on_model_event({"event": "deleted", "name": "digits", "version": 1})
    assert [m.version for m in plane.loaded()] == [2]
    source.set_alias("digits", "production", 2)
    assert (await answer(plane))[0] == 2


async def test_a_deleted_alias_is_resolved_afresh(source, pool):
    plane = make_plane(source, pool)
    await answer(plane, "staging")
    await plane.on_model_event({"event": "alias-deleted", "name": "digits", "alias": "staging"})
    source.delete_alias("digits", "staging")
    with pytest.raises(NotFound):
        await answer(plane, "staging")


async def test_a_request_after_an_alias_move_does_not_join_a_lookup_from_before_it(source, pool):
    plane = make_plane(source, pool)
    source.answer_sent.clear()
    early = asyncio.ensure_future(answer(plane))  # its lookup reads production -> 1 ...
    await until_waiting(source, 1)
    await promote(source, plane, 2)  # ... the alias moves ...
    late = asyncio.ensure_future(answer(plane))  # ... and a new request arrives
    await until_waiting(source, 2)  # with a lookup of its own
    source.answer_sent.set()
    assert (await early)[0] == 1
    assert (await late)[0] == 2
    assert (await answer(plane))[0] == 2


async def test_a_swap_that_fails_while_the_registry_is_away_is_tried_again(
    source, pool, monkeypatch
):
    monkeypatch.setattr(dataplane, "SWAP_RETRY_FIRST_S", 0.01)
    metrics = Metrics()
    plane = make_plane(source, pool, metrics=metrics)
    await answer(plane)
    resolve, outage = source.resolve, [Unavailable("registry away"), Unavailable("still away")]

    async def away_then_back(name, alias):
        if outage:
            raise outage.pop(0)
        return await resolve(name, alias)

    monkeypatch.setattr(source, "resolve", away_then_back)
    await promote(source, plane, 2)
    await plane.wait_background()
    assert (await answer(plane))[0] == 2
    assert metrics.swaps.labels("digits", "failed")._value.get() == 2
