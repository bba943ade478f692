"""The inference core: resolving names and aliases, checking requests, caching.

Hot swaps (alias moves while serving): test_inference_hot_swap.py."""

import asyncio
import dataclasses

import numpy as np
import pytest
from dataplane_kit import (
    MLP,
    X,
    answer,
    assert_from,
    digits_source,
    expected,
    make_plane,
    model,
)

from maas import artifacts, zoo
from maas.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, Unavailable
from services.inference.dataplane import parse_ref
from services.inference.metrics import Metrics
from services.inference.sources import MemorySource


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("", (None, "")),
        ("3", (3, "")),
        ("staging", (None, "staging")),
        (" 12 ", (12, "")),
        ("0009", (9, "")),
        ("\u00b2", (None, "\u00b2")),  # a digit to isdigit(), not to int(): the alias check says no
    ],
)
def test_model_version_is_a_number_an_alias_or_empty_for_the_bare_name(ref, parsed):
    assert parse_ref(ref) == parsed


@pytest.mark.parametrize("digits", [20, 5000])
def test_a_version_of_more_digits_than_int64_has_is_malformed(digits):
    with pytest.raises(InvalidArgument, match=rf"model_version 9+\.\.\. \({digits} digits\)"):
        parse_ref("9" * digits)


@pytest.mark.parametrize("version", ["-1", "+3"])
def test_a_signed_version_is_malformed_not_an_alias(version):
    with pytest.raises(InvalidArgument, match=r"versions are integers from 1"):
        parse_ref(version)


@pytest.mark.parametrize("name", ["../x", "x" * 5000, ""])
async def test_unloading_a_name_no_model_could_have_is_refused(source, pool, name):
    with pytest.raises(InvalidArgument, match="model_name"):
        make_plane(source, pool).unload(name)


async def test_unloading_a_model_that_is_not_loaded_is_nothing_to_do(source, pool):
    assert make_plane(source, pool).unload("never-loaded") == 0


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
    with pytest.raises(InvalidArgument, match=r"no output \['probs'\].*'output' \(FP32"):
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


async def test_a_version_evicted_and_loaded_again_counts_on_and_the_churn_is_counted(source, pool):
    # Under cache pressure a canary's per-version counts restarted with every reload.
    metrics = Metrics()
    plane = make_plane(source, pool, cache_bytes=1, metrics=metrics)  # one version at a time
    for version in ("1", "2", "1"):
        await answer(plane, version)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    ok = {"model": "digits", "outcome": "ok"}
    assert sample("maas_inference_version_requests_total", version="1", **ok) == 2
    assert sample("maas_inference_version_requests_total", version="2", **ok) == 1
    assert sample("maas_inference_model_loads_total", model="digits") == 3
    assert sample("maas_inference_model_evictions_total", model="digits") == 2
    plane.unload("digits")  # by request: its series go
    assert sample("maas_inference_version_requests_total", version="1", **ok) is None


@pytest.mark.parametrize("how", ["deleted", "unloaded"])
async def test_a_version_evicted_for_room_then_deleted_or_unloaded_leaves_no_series(
    source, pool, how
):
    metrics = Metrics()
    plane = make_plane(source, pool, cache_bytes=1, metrics=metrics)  # one version at a time
    for version in ("1", "2"):  # 1 is evicted: its counters stay while it may come back
        await answer(plane, version)
    if how == "deleted":
        await plane.on_model_event({"event": "deleted", "name": "digits", "version": 1})
    else:
        plane.unload("digits")
    series = {s.labels.get("version") for f in metrics.registry.collect() for s in f.samples}
    assert "1" not in series
    assert ("2" in series) is (how == "deleted")


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


async def test_an_int8_models_answer_does_not_depend_on_who_else_is_asking(pool):
    """int8 dynamic quantization scales by the whole pass's range: such a model's requests
    never share a pass, so one caller's large values cannot change another's answer."""
    from maas.compression import formats

    fmt, stored = formats.encode(model(4), {}, "int8")
    files, manifest = artifacts.pack(stored, "mlp", MLP, format=fmt)
    src = MemorySource()
    src.add_artifact("small", files, manifest)
    plane = make_plane(src, pool)
    alone = (await plane.infer("small", "1", {"input": X})).outputs["output"]
    loud = np.full((1, 64), 1e6, np.float32)
    together, _ = await asyncio.gather(
        plane.infer("small", "1", {"input": X}), plane.infer("small", "1", {"input": loud})
    )
    np.testing.assert_array_equal(together.outputs["output"], alone)


async def test_an_int8_models_config_says_it_is_not_batched(pool):
    from maas.compression import formats
    from services.inference.describe import model_config

    fmt, stored = formats.encode(model(4), {}, "int8")
    files, manifest = artifacts.pack(stored, "mlp", MLP, format=fmt)
    src = MemorySource()
    src.add_artifact("small", files, manifest)
    src.add("dense", model(4), "mlp", MLP)
    plane = make_plane(src, pool)
    int8, dense = await plane.model("small", "1"), await plane.model("dense", "1")
    assert model_config(int8, int8.batching, 1).max_batch_size == 0
    assert model_config(dense, dense.batching, 1).max_batch_size == 8


@pytest.mark.parametrize(
    "value", [np.nan, np.inf, -np.inf], ids=["nan", "infinity", "minus-infinity"]
)
async def test_non_finite_inputs_are_invalid_and_say_so(source, pool, value):
    x = X.copy()
    x[1, 5] = value
    with pytest.raises(InvalidArgument, match="'input' holds NaN or infinite values"):
        await make_plane(source, pool).infer("digits", "1", {"input": x})


@pytest.mark.parametrize("token", [-1.0, 257.0, 2.5, 1e9])
async def test_a_token_model_takes_whole_numbers_below_its_vocabulary_only(pool, token):
    from maas.text.gpt_config import GPTConfig

    config = {"block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16}
    gpt = zoo.build("gpt", config, seed=0).eval()
    files, manifest = artifacts.pack(gpt.state_dict(), "gpt", config)
    src = MemorySource()
    src.add_artifact("tiny-gpt", files, manifest)
    plane = make_plane(src, pool)
    ids = np.zeros((1, 8), np.float32)
    ok = await plane.infer("tiny-gpt", "1", {"input": ids})
    assert ok.outputs["output"].shape == (1, 8, GPTConfig().vocab_size)
    ids[0, 3] = token
    with pytest.raises(InvalidArgument, match="not token ids.*whole numbers from 0 to 256"):
        await plane.infer("tiny-gpt", "1", {"input": ids})


@pytest.mark.parametrize(
    "change",
    [{"config": {**MLP, "hidden": [48]}}, {"config": {**MLP, "bogus": 1}}, {"arch": "nosuch"}],
    ids=["shapes", "unknown-key", "unknown-arch"],
)
async def test_a_version_that_does_not_build_is_a_failed_precondition_naming_it(pool, change):
    """The artifact's fault, not the request's: FAILED_PRECONDITION, naming the version."""
    _, manifest = artifacts.pack(model(4).state_dict(), "mlp", MLP)
    files, _ = artifacts.pack(model(4).state_dict(), "mlp", MLP)
    src = MemorySource()
    src.add_artifact("misfit", files, dataclasses.replace(manifest, **change))
    with pytest.raises(FailedPrecondition, match="'misfit' version 1 cannot be built"):
        await make_plane(src, pool).infer("misfit", "1", {"input": X})


async def test_a_version_that_does_not_build_is_not_ready(pool):
    # As Triton answers for a model that failed to load; ModelInfer says why.
    _, manifest = artifacts.pack(model(4).state_dict(), "mlp", MLP)
    files, _ = artifacts.pack(model(4).state_dict(), "mlp", MLP)
    src = MemorySource()
    src.add_artifact("misfit", files, dataclasses.replace(manifest, config={**MLP, "hidden": [8]}))
    assert not await make_plane(src, pool).model_ready("misfit", "1")


async def test_a_zoo_model_is_served_by_its_trace_with_the_modules_own_answers(
    source, pool, caplog
):
    with caplog.at_level("WARNING", logger="services.inference.served"):
        _, out = await answer(make_plane(source, pool))
    assert not [r.getMessage() for r in caplog.records if "without a trace" in r.getMessage()]
    assert_from(out, model(1))


async def test_a_load_that_outlasts_the_wait_is_unavailable_and_goes_on_for_the_next_request(pool):
    source = digits_source()
    source.gates[2] = asyncio.Event()  # S3 frozen: version 2's files do not come
    plane = make_plane(source, pool, wait_s=0.2)
    with pytest.raises(Unavailable, match=r"loading model 'digits' version 2 took over 0\.2 s"):
        await answer(plane, "2")
    source.gates[2].set()  # S3 is back: the load that went on finishes
    for _ in range(100):  # its build can outlast 0.2 s on a busy machine: ask again, bounded
        try:
            version, out = await answer(plane, "2")
            break
        except Unavailable:
            continue
    else:
        pytest.fail("the load that went on never finished")
    assert version == 2 and source.fetches == [2]  # the first load, not a second one
    assert_from(out, model(2))


async def test_a_request_whose_answer_could_not_be_sent_is_refused_before_computing(pool):
    # A GPT's answer is 257 floats per input token: a 1 MiB request made a 257 MiB answer,
    # computed in full (seconds of CPU, gigabytes held) before gRPC refused to send it.
    source = digits_source()
    plane = make_plane(source, pool, max_answer_bytes=10 * 10 * 4)  # ten rows of 10 FP32s
    rows = np.zeros((11, 64), np.float32)
    with pytest.raises(InvalidArgument, match=r"11 rows make an answer of .* send at most 10 rows"):
        await answer(plane, "1", x=rows)
    [served] = plane.loaded()
    assert served.stats.inference_count == served.stats.fail.count == 0  # not even queued
    _, out = await answer(plane, "1", x=rows[:10])
    assert out.shape == (10, 10)
