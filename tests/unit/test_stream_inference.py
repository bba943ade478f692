"""Stream inference's pure parts: reading a maas.infer/1 request, where its prediction goes, how
the prediction is encoded, and which outcomes of a partition batch may commit."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError

from maas import events, known_topics
from maas.bus_transactions import (
    Output,
    Retry,
    TransactionalPipe,
    committable,
    transactional_id,
)
from maas.config import Settings
from maas.deadletter import DeadLetter
from maas.errors import InvalidArgument, NotFound, SchemaViolation
from services.inference.dataplane import InferResult
from services.inference.kafka_stream import (
    StreamRequest,
    parse_request,
    prediction_event,
    prediction_output,
    reply_topic,
)


def request(**changes: object) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}
    event = events.new_event(events.INFER, id="r-1", model="digits", inputs=[tensor])
    event.update(changes)
    return events.validate(event, events.INFER)


def tensor(**changes: object) -> dict:
    return {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 3],
        "data": [1.0, 2.0, 3.0],
        **changes,
    }


def test_list_data_becomes_an_array_of_the_datatype_and_shape() -> None:
    parsed = parse_request(request())
    assert parsed.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(parsed.inputs["input"], [[1.0, 2.0, 3.0]])
    assert (parsed.id, parsed.model, parsed.version) == ("r-1", "digits", "")


def test_raw_bytes_are_read_as_little_endian_values() -> None:
    raw = np.array([[1, 2, 3]], dtype="<i8").tobytes()
    parsed = parse_request(request(inputs=[tensor(datatype="INT64", data=raw)]))
    np.testing.assert_array_equal(parsed.inputs["input"], [[1, 2, 3]])


def test_a_numbered_version_is_read_as_its_digits() -> None:
    assert parse_request(request(version=3)).version == "3"
    assert parse_request(request(version="staging")).version == "staging"


def test_requested_outputs_are_kept_in_order() -> None:
    parsed = parse_request(request(outputs=[{"name": "output"}, {"name": "probs"}]))
    assert parsed.requested == ["output", "probs"]


def test_raw_bytes_of_the_wrong_length_name_the_field_and_the_size_needed() -> None:
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.data has 8 bytes.*needs 12"):
        parse_request(request(inputs=[tensor(data=b"\0" * 8)]))


def test_an_unknown_datatype_names_the_field_and_the_accepted_ones() -> None:
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.datatype is 'FP8'.*FP32"):
        parse_request(request(inputs=[tensor(datatype="FP8", data=b"\0" * 3)]))


def test_too_few_values_name_the_field_and_the_count_needed() -> None:
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.data has 2 values.*needs 3"):
        parse_request(request(inputs=[tensor(data=[1.0, 2.0])]))


def test_floats_for_an_integer_datatype_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"inputs\[0\]\.data must hold only integers"):
        parse_request(request(inputs=[tensor(datatype="INT32")]))


def test_a_request_without_a_model_fails_its_schema_naming_the_field() -> None:
    event = request()
    del event["model"]
    with pytest.raises(SchemaViolation, match="model"):
        events.validate(event, events.INFER)


def test_an_unknown_request_key_is_refused_by_name() -> None:
    with pytest.raises(SchemaViolation, match="modle"):
        request(modle="digits")


def test_predictions_go_to_the_predictions_topic_unless_the_request_names_another() -> None:
    assert reply_topic("") == "maas.predictions.v1"
    assert reply_topic("my-replies") == "my-replies"
    assert reply_topic("maas.predictions.v1") == "maas.predictions.v1"


def test_a_reply_to_another_platform_topic_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="reply_to is 'maas.jobs.v1', a platform topic"):
        reply_topic("maas.jobs.v1")


def test_a_reply_to_a_topic_internal_to_kafka_is_refused_as_such() -> None:
    with pytest.raises(InvalidArgument, match="'__consumer_offsets', a topic internal to Kafka"):
        reply_topic("__consumer_offsets")


def prediction() -> dict:
    return events.new_event(
        events.PREDICTION,
        request_id="r-1",
        model="digits",
        version=2,
        outputs=[{"name": "output", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]}],
    )


def parsed_request() -> StreamRequest:
    return StreamRequest("r-1", "digits", "", {}, [], "replies")


def test_a_json_request_gets_a_json_prediction_keyed_by_its_id() -> None:
    out = prediction_output(prediction(), parsed_request(), as_json=True)
    assert (out.topic, out.key) == ("replies", "r-1")
    assert out.headers == [("content-type", b"application/json")]
    assert json.loads(out.value)["outputs"][0]["data"] == [0.5, 0.25]


def test_a_msgpack_request_gets_a_msgpack_prediction() -> None:
    out = prediction_output(prediction(), parsed_request(), as_json=False)
    assert out.headers == []
    assert msgpack.unpackb(out.value)["request_id"] == "r-1"


def test_a_prediction_event_satisfies_its_schema() -> None:
    served = SimpleNamespace(name="digits", version=2)
    result = InferResult(served, {"output": np.array([[0.5, 0.25]], dtype=np.float32)})  # type: ignore[arg-type]
    event = events.validate(prediction_event(parsed_request(), result), events.PREDICTION)
    assert event["outputs"] == [
        {"name": "output", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]}
    ]
    assert (event["request_id"], event["model"], event["version"]) == ("r-1", "digits", 2)


def test_every_owner_of_a_partition_writes_under_one_transactional_id() -> None:
    tp = TopicPartition("maas.infer.v1", 2)
    assert transactional_id("maas-inference-stream", tp) == "maas-inference-stream.maas.infer.v1.2"


def test_outcomes_commit_up_to_the_first_one_to_retry() -> None:
    letter = DeadLetter("t", 0, 1, None, b"", [], "bad", "why")
    outputs = [Output("t", b"x")]
    assert committable([outputs, letter, Retry(OSError()), outputs]) == 2
    assert committable([outputs, letter]) == 2
    assert committable([Retry(OSError())]) == 0


class SlowTopics:
    """A consumer whose metadata look-up takes a while (as a broker's does)."""

    def __init__(self, *names: str) -> None:
        self.names = {"maas.predictions.v1", *names}
        self.calls = 0

    async def topics(self) -> set[str]:
        self.calls += 1
        await asyncio.sleep(0.01)
        return set(self.names)


def pipe_over(consumer: SlowTopics) -> TransactionalPipe:
    pipe = TransactionalPipe(Settings(), topics=["maas.infer.v1"], group_id="g", transform=None)  # type: ignore[arg-type]
    pipe._consumer = consumer  # type: ignore[assignment]
    return pipe


@pytest.fixture(autouse=True)
def quick_look_ups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known_topics, "TOPIC_APPEARS_S", 0.05)


async def test_outputs_checked_while_the_topics_are_looked_up_wait_for_the_answer() -> None:
    pipe = pipe_over(consumer := SlowTopics())
    outputs = [Output("maas.predictions.v1", b"x")]
    await asyncio.gather(*(pipe._check_topics(outputs) for _ in range(3)))
    assert consumer.calls == 1


async def test_an_output_to_a_missing_topic_is_refused_naming_it() -> None:
    pipe = pipe_over(SlowTopics())
    with pytest.raises(NotFound, match="topic 'nowhere' does not exist"):
        await pipe._check_topics([Output("nowhere", b"x")])


async def test_a_topic_created_just_after_another_look_up_is_found() -> None:
    pipe = pipe_over(consumer := SlowTopics())
    await pipe._check_topics([Output("maas.predictions.v1", b"x")])
    consumer.names.add("replies")
    await pipe._check_topics([Output("replies", b"x")])


async def test_requests_naming_one_missing_topic_cost_one_look_up_a_window() -> None:
    pipe = pipe_over(consumer := SlowTopics())
    with pytest.raises(NotFound):
        await pipe._check_topics([Output("nowhere", b"x")])
    calls = consumer.calls
    for _ in range(20):
        with pytest.raises(NotFound):
            await pipe._check_topics([Output("nowhere", b"x")])
    assert consumer.calls == calls


class FlakyBroker(SlowTopics):
    """A broker whose metadata look-ups fail ``failures`` times, then answer."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def topics(self) -> set[str]:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("the broker went away")
        return await super().topics()


async def test_a_broker_that_cannot_list_topics_never_costs_a_request_its_attempts() -> None:
    async def answer(record: object) -> list[Output]:
        return [Output("maas.predictions.v1", b"x")]

    pipe = TransactionalPipe(
        Settings(), topics=["maas.infer.v1"], group_id="g", transform=answer, max_attempts=2
    )
    pipe._consumer = FlakyBroker(failures=5)  # type: ignore[assignment]
    value = events.encode(request())
    raw = ConsumerRecord("maas.infer.v1", 0, 7, 0, 0, None, value, None, -1, len(value), [])
    outcomes = [await pipe._outcome(raw) for _ in range(6)]
    assert all(isinstance(o, Retry) for o in outcomes[:5])  # 5 failed look-ups, none counted
    assert outcomes[5] == [Output("maas.predictions.v1", b"x")]
