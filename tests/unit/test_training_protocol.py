"""Gradient and parameter events: valid against their schemas, chunked when large."""

from __future__ import annotations

import numpy as np
import pytest

from maas import events
from maas.errors import IntegrityError, InvalidArgument
from maas.training import protocol
from maas.training.codecs import TopKCodec


def _wire(event: dict) -> dict:
    return events.decode(events.encode(event))


def _gradient_events(payload: dict, chunk_bytes: int) -> list[dict]:
    return protocol.gradient_events(
        job_id="job",
        shard=1,
        worker=0,
        step=3,
        version=3,
        codec="topk(0.5)",
        samples=32,
        payload=payload,
        chunk_bytes=chunk_bytes,
        loss=0.5,
        accuracy=0.75,
    )


def test_a_small_gradient_is_one_valid_event() -> None:
    payload = TopKCodec(0.5).encode(np.arange(100, dtype=np.float32))
    (event,) = _gradient_events(payload, chunk_bytes=1 << 20)
    events.validate(_wire(event), events.GRADIENT)
    assembled = protocol.PayloadAssembler().add(("job", 1, 0, 3), _wire(event), offset=7)
    assert assembled is not None and assembled.first_offset == 7
    decoded = TopKCodec(0.5).decode(assembled.payload, 100)
    np.testing.assert_array_equal(decoded.values, np.arange(50, 100, dtype=np.float32))


def test_a_large_gradient_is_chunked_and_reassembled_in_any_order() -> None:
    payload = TopKCodec(0.5).encode(np.arange(100_000, dtype=np.float32))
    chunks = [_wire(e) for e in _gradient_events(payload, chunk_bytes=64 * 1024)]
    assert len(chunks) > 4
    for event in chunks:
        events.validate(event, events.GRADIENT)
    assembler = protocol.PayloadAssembler()
    results = [assembler.add(("k",), e, offset=i) for i, e in reversed(list(enumerate(chunks)))]
    assert all(r is None for r in results[:-1])
    done = results[-1]
    assert done is not None and done.first_offset == len(chunks) - 1
    np.testing.assert_array_equal(
        TopKCodec(0.5).decode(done.payload, 100_000).indices, np.arange(50_000, 100_000)
    )


def test_a_corrupted_chunk_is_refused() -> None:
    payload = TopKCodec(0.5).encode(np.arange(100_000, dtype=np.float32))
    chunks = [_wire(e) for e in _gradient_events(payload, chunk_bytes=64 * 1024)]
    data = bytearray(chunks[0]["payload"]["data"])
    data[10] ^= 0xFF
    chunks[0]["payload"]["data"] = bytes(data)
    assembler = protocol.PayloadAssembler()
    with pytest.raises(IntegrityError):
        for event in chunks:
            assembler.add(("k",), event)


def test_chunked_params_events_copy_the_values_when_built() -> None:
    theta = np.ones(100_000, dtype=np.float32)
    chunks = protocol.params_events(
        job_id="job", shard=0, version=4, values=theta, final=False, chunk_bytes=64 * 1024
    )
    theta += 1  # the shard moves on while the chunks are in flight
    assembler = protocol.PayloadAssembler()
    done = [assembler.add(("job", 0, 4), _wire(e)) for e in chunks][-1]
    assert done is not None
    np.testing.assert_array_equal(protocol.params_values(done.payload, 100_000), 1.0)


def test_params_events_validate_and_round_trip() -> None:
    theta = np.ones(1000, dtype=np.float32)
    (event,) = protocol.params_events(
        job_id="job", shard=0, version=4, values=theta, final=False, chunk_bytes=1 << 20
    )
    received = _wire(event)
    events.validate(received, events.PARAMS)
    np.testing.assert_array_equal(protocol.params_values(received["payload"], 1000), 1.0)


def test_half_precision_params_arrive_as_fp32() -> None:
    theta = np.linspace(-1, 1, 1000, dtype=np.float32)
    (event,) = protocol.params_events(
        job_id="job",
        shard=0,
        version=1,
        values=theta,
        final=False,
        chunk_bytes=1 << 20,
        dtype="float16",
    )
    assert len(event["payload"]["values"]["data"]) == 2000
    values = protocol.params_values(_wire(event)["payload"], 1000)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, theta, atol=1e-3)


def test_params_of_the_wrong_size_are_refused() -> None:
    (event,) = protocol.params_events(
        job_id="job",
        shard=0,
        version=4,
        values=np.ones(10, dtype=np.float32),
        final=True,
        chunk_bytes=1 << 20,
    )
    with pytest.raises(InvalidArgument, match=r"shape \(12,\)"):
        protocol.params_values(_wire(event)["payload"], 12)


def test_every_shard_has_a_fixed_partition() -> None:
    assert [protocol.partition_for(s, 4) for s in range(6)] == [0, 1, 2, 3, 0, 1]
    assert protocol.record_key("job-1", 2) == "job-1/2"
    assert protocol.job_of_key(b"job/with/slash/3") == "job/with/slash"
