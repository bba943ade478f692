"""The inference core: resolving names and aliases, checking requests, caching, hot swaps."""

import asyncio
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from maas import artifacts, zoo
from maas.errors import IntegrityError, InvalidArgument, NotFound
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane, parse_ref
from services.inference.metrics import Metrics
from services.inference.sources import MemorySource

MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}


class CountingSource(MemorySource):
    """Counts registry hits and can hold a version's fetch until released."""

    def __init__(self) -> None:
        super().__init__()
        self.resolves = 0
        self.fetches: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.held: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.answer_sent = asyncio.Event()
        self.answer_sent.set()
        self.waiting = 0  # resolutions that read their answer and wait for answer_sent

    async def resolve(self, name, alias):
        self.resolves += 1
        version = await super().resolve(name, alias)
        # The answer is on its way back: concurrent callers pile up, events may overtake it.
        await asyncio.sleep(0)
        self.waiting += 1
        await self.answer_sent.wait()
        return version

    async def fetch(self, name, version):
        self.fetches.append(version)
        if version in self.gates:
            self.held[version].set()
            await self.gates[version].wait()
        return await super().fetch(name, version)


def model(seed: int) -> torch.nn.Module:
    return zoo.build("mlp", MLP, seed=seed).eval()


def expected(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


X = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


@pytest.fixture
def source():
    src = CountingSource()
    src.add("digits", model(1), "mlp", MLP, aliases=["production"])
    src.add("digits", model(2), "mlp", MLP, aliases=["staging"])
    return src


def make_plane(source, pool, *, cache_bytes=1 << 30, metrics=None, batching=None):
    return DataPlane(
        source,
        pool,
        batching=batching or BatchingConfig(8, 0),
        cache_bytes=cache_bytes,
        metrics=metrics,
    )


async def answer(plane, version="", x=X):
    result = await plane.infer("digits", version, {"input": x})
    return result.model.version, result.outputs["output"]


def assert_from(output, module):
    np.testing.assert_allclose(output, expected(module, X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("", (None, "")),
        ("3", (3, "")),
        ("staging", (None, "staging")),
        (" 12 ", (12, "")),
    ],
)
def test_model_version_is_a_number_an_alias_or_empty_for_the_bare_name(ref, parsed):
    assert parse_ref(ref) == parsed


async def test_a_name_alone_is_served_by_the_production_alias(source, pool):
    version, out = await answer(make_plane(source, pool))
    assert version == 1
    assert_from(out, model(1))


async def test_a_name_alone_without_production_is_served_by_the_newest_trained_version(pool):
    src = MemorySource()
    src.add("m", model(1), "mlp", MLP)
    src.add("m", model(2), "mlp", MLP, aliases=["staging"])
    plane = make_plane(src, pool)
    assert await plane.model_ready("m")
    assert (await plane.model("m")).version == 2


async def test_a_name_alone_never_lands_on_an_unpromoted_compressed_variant(pool):
    src = MemorySource()
    src.add("m", model(1), "mlp", MLP)
    files, manifest = artifacts.pack(model(2), "mlp", MLP)
    manifest.method = "quantize"
    src.add_artifact("m", files, manifest)
    assert (await make_plane(src, pool).model("m")).version == 1


async def test_a_name_alone_follows_a_newly_trained_version_while_nothing_is_promoted(pool):
    src = MemorySource()
    src.add("m", model(1), "mlp", MLP)
    plane = make_plane(src, pool)
    assert (await plane.model("m")).version == 1
    src.add("m", model(2), "mlp", MLP)
    await plane.on_model_event({"event": "registered", "name": "m", "version": 2})
    await plane.wait_background()
    assert (await plane.model("m")).version == 2


async def test_a_served_name_is_resolved_once_and_again_only_after_an_event_for_it(source, pool):
    plane = make_plane(source, pool)
    for _ in range(5):
        await answer(plane)
    assert source.resolves == 1
    await plane.on_model_event({"event": "registered", "name": "digits", "version": 2})
    await plane.wait_background()
    for _ in range(5):
        assert (await answer(plane))[0] == 1
    assert source.resolves == 2


async def test_odd_spellings_of_a_version_are_served_but_not_remembered(source, pool):
    plane = make_plane(source, pool)
    for spelling in (" 1", "01", "1 ", "001"):
        assert (await answer(plane, spelling))[0] == 1
    assert not plane._serving.get("digits")
    await answer(plane, "1")
    assert set(plane._serving["digits"]) == {"1"}


async def test_a_version_may_be_a_number_or_an_alias(source, pool):
    plane = make_plane(source, pool)
    assert (await answer(plane, "2"))[0] == 2
    assert (await answer(plane, "staging"))[0] == 2
    assert (await answer(plane, "1"))[0] == 1


async def test_unknown_models_versions_and_aliases_are_not_found(source, pool):
    plane = make_plane(source, pool)
    with pytest.raises(NotFound, match="'nope'"):
        await plane.infer("nope", "", {"input": X})
    with pytest.raises(NotFound, match="no version 9"):
        await plane.infer("digits", "9", {"input": X})
    with pytest.raises(NotFound, match="no alias 'canary'"):
        await plane.infer("digits", "canary", {"input": X})
    assert not await plane.model_ready("digits", "9")


async def test_an_empty_model_name_is_invalid(source, pool):
    with pytest.raises(InvalidArgument, match="model_name is empty"):
        await make_plane(source, pool).infer("", "", {"input": X})


@pytest.mark.parametrize(
    ("inputs", "complaint"),
    [
        (
            {"input": X.astype(np.float64)},
            r"datatype FP64 and shape \[3, 64\].*expects FP32 with "
            r"shape \[-1, 64\]",
        ),
        ({"input": X[:, :10]}, r"shape \[3, 10\].*expects FP32 with shape \[-1, 64\]"),
        ({"input": X.reshape(3, 8, 8)}, r"shape \[3, 8, 8\]"),
        ({"pixels": X}, r"expects exactly one input 'input' \(FP32, shape \[-1, 64\]\).*'pixels'"),
        ({"input": X[:0]}, "no rows"),
    ],
)
async def test_wrong_inputs_are_invalid_and_the_message_names_what_is_expected(
    source, pool, inputs, complaint
):
    with pytest.raises(InvalidArgument, match=complaint):
        await make_plane(source, pool).infer("digits", "", inputs)


async def test_asking_for_an_output_the_model_lacks_is_invalid(source, pool):
    with pytest.raises(InvalidArgument, match=r"no output 'probs'.*'output' \(FP32"):
        await make_plane(source, pool).infer("digits", "", {"input": X}, ["probs"])


async def test_a_tampered_artifact_is_refused(source, pool):
    files = source.files("digits", 2)
    files["weights.safetensors"] = files["weights.safetensors"][:-1] + b"\0"
    with pytest.raises(IntegrityError, match="sha256"):
        await answer(make_plane(source, pool), "2")


async def test_concurrent_first_requests_share_one_resolve_and_one_load(source, pool):
    plane = make_plane(source, pool)
    results = await asyncio.gather(*(answer(plane) for _ in range(10)))
    assert {v for v, _ in results} == {1}
    assert source.resolves == 1
    assert source.fetches == [1]


async def test_metadata_describes_inputs_and_outputs_with_a_variable_batch(source, pool):
    served = await make_plane(source, pool).model("digits", "")
    (inp,), (out,) = served.signature.inputs, served.signature.outputs
    assert (inp.name, inp.datatype, inp.shape) == ("input", "FP32", (-1, 64))
    assert (out.name, out.datatype, out.shape) == ("output", "FP32", (-1, 10))


async def test_the_cache_evicts_the_least_recently_used_version_beyond_its_byte_budget(pool):
    src = MemorySource()
    for seed in range(3):
        src.add("m", model(seed), "mlp", MLP)
    one = (64 * 32 + 32 + 32 * 10 + 10) * 4
    metrics = Metrics()
    plane = make_plane(src, pool, cache_bytes=2 * one, metrics=metrics)
    for version in ("1", "2", "1", "3"):  # touching 1 makes 2 the oldest
        await plane.model("m", version)
    assert sorted(m.version for m in plane.loaded()) == [1, 3]
    assert metrics.loaded_bytes._value.get() == 2 * one
    assert metrics.loaded_models._value.get() == 2


async def test_a_model_bigger_than_the_cache_is_still_served(source, pool):
    plane = make_plane(source, pool, cache_bytes=1)
    assert (await answer(plane, "1"))[0] == 1
    assert (await answer(plane, "2"))[0] == 2
    assert [m.version for m in plane.loaded()] == [2]


async def test_unload_forgets_every_version_and_alias_of_a_model(source, pool):
    plane = make_plane(source, pool)
    await answer(plane)
    await answer(plane, "2")
    assert plane.unload("digits") == 2
    assert plane.loaded() == []
    await answer(plane)
    assert source.resolves == 2


# --- hot swap -------------------------------------------------------------------------------


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


@pytest.mark.parametrize(("codec", "tolerance"), [("int8", 0.05), ("fp16", 1e-3)])
async def test_compressed_variants_are_served_with_the_same_signature(pool, codec, tolerance):
    from maas import artifacts
    from maas.compression import formats

    module = model(4)
    fmt, stored = formats.encode(module, {}, codec)
    files, manifest = artifacts.pack(stored, "mlp", MLP, format=fmt)
    src = MemorySource()
    src.add_artifact("small", files, manifest)
    result = await make_plane(src, pool).infer("small", "1", {"input": X})
    out = result.outputs["output"]
    assert out.dtype == np.float32 and out.shape == (3, 10)
    np.testing.assert_allclose(out, expected(module, X), atol=tolerance)
