"""Stream inference: requests from ``maas.infer.v1``, predictions to ``maas.predictions.v1`` (or the
request's ``reply_to``), exactly once per request record (``maas.bus_transactions``); the id
correlates, it does not deduplicate (a request sent twice is answered twice).

A request (``maas.infer/1``) is Open Inference Protocol-shaped: the model, an optional version,
input tensors as name/datatype/shape/data, where data is a row-major list or, in msgpack, the
raw little-endian bytes. It runs through the same ``DataPlane`` as gRPC, so the requests of a
fetch share forward passes in the model's dynamic batcher exactly as concurrent gRPC calls do.
The prediction (``maas.prediction/1``) is keyed by the request id and written in the encoding
of the request (JSON in, JSON out). A bad request (unknown model, wrong shape or datatype,
undecodable bytes, a prediction the broker refuses for good) goes to the DLQ with the reason;
a registry outage is retried with backoff
(about 15 s) before its requests are dead-lettered too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from maas import events
from maas.bus import Record
from maas.bus_transactions import Committed, Output, TransactionalPipe
from maas.config import Settings
from maas.errors import InvalidArgument
from maas.topics import INFER, PREDICTIONS
from services.inference import rest_codec
from services.inference.dataplane import DataPlane, InferResult
from services.inference.metrics import Metrics
from services.inference.signature import DATATYPE_TO_DTYPE, datatype_of

GROUP_ID = "maas-inference-stream"  # one group for every replica: each request is answered once
JSON_HEADERS = [(events.CONTENT_TYPE_HEADER, events.JSON_CONTENT_TYPE.encode())]
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class StreamRequest:
    id: str
    model: str
    version: str
    inputs: dict[str, np.ndarray]
    requested: list[str]
    reply_to: str


def fetch_size(max_batch_size: int) -> int:
    """Requests one fetch takes, and so at most in flight at once: several forward passes'
    worth, so one transaction round carries many requests."""
    return max(8 * max_batch_size, 512)


def reply_topic(reply_to: str) -> str:
    """Where the prediction goes: ``reply_to``, or ``maas.predictions.v1`` when empty; no other
    platform topic (a request must not write jobs or registry events), nor one of Kafka's own."""
    if not reply_to:
        return PREDICTIONS.name
    if reply_to.startswith("maas.") and reply_to != PREDICTIONS.name:
        raise InvalidArgument(
            f"reply_to is {reply_to!r}, a platform topic; name your own topic or {PREDICTIONS.name}"
        )
    if reply_to.startswith("__"):  # __consumer_offsets, __transaction_state: "does not exist" lied
        raise InvalidArgument(
            f"reply_to is {reply_to!r}, a topic internal to Kafka; name your own topic or "
            f"{PREDICTIONS.name}"
        )
    return reply_to


def _binary_form(tensors: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], bytes]:
    """Inputs whose data is raw bytes (msgpack bin) as the OIP binary extension: their size in
    ``parameters.binary_data_size``, their bytes after one another."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for i, tensor in enumerate(tensors):
        data = tensor.get("data")
        if not isinstance(data, bytes):
            described.append(dict(tensor))
            continue
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        dtype = DATATYPE_TO_DTYPE.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise InvalidArgument(
                f"inputs[{i}].datatype is {datatype!r}; use one of {', '.join(DATATYPE_TO_DTYPE)}"
            )
        needed = math.prod(shape) * dtype.itemsize if isinstance(shape, list) else -1
        if len(data) != needed:
            raise InvalidArgument(
                f"inputs[{i}].data has {len(data)} bytes, but datatype {datatype} with shape "
                f"{shape} needs {needed}"
            )
        rest = {k: v for k, v in tensor.items() if k != "data"}
        described.append({**rest, "parameters": {"binary_data_size": len(data)}})
        chunks.append(data)
    return described, b"".join(chunks)


def parse_request(event: Mapping[str, Any]) -> StreamRequest:
    """A schema-valid ``maas.infer/1`` event -> the arrays and names to run; InvalidArgument
    naming the field when a tensor does not hold what its datatype and shape say."""
    inputs, binary = _binary_form(event["inputs"])
    doc = {"inputs": inputs, "outputs": event.get("outputs", [])}
    parsed = rest_codec.decode_request(doc, memoryview(binary))
    return StreamRequest(
        id=event["id"],
        model=event["model"],
        version=str(event.get("version", "")),
        inputs=parsed.inputs,
        requested=parsed.requested,
        reply_to=reply_topic(event.get("reply_to", "")),
    )


def prediction_event(request: StreamRequest, result: InferResult) -> dict[str, Any]:
    outputs = result.outputs
    names = request.requested or list(outputs)
    return events.new_event(
        events.PREDICTION,
        request_id=request.id,
        model=result.model.name,
        version=result.model.version,
        outputs=[
            {
                "name": name,
                "datatype": datatype_of(outputs[name]),
                "shape": list(outputs[name].shape),
                "data": outputs[name].ravel().tolist(),
            }
            for name in names
        ],
    )


def prediction_output(
    prediction: dict[str, Any], request: StreamRequest, *, as_json: bool
) -> Output:
    """The record to write: keyed by the request id, JSON (with its content-type) or msgpack.

    Not validated here: ``prediction_event`` builds it, and the unit tests hold that to the
    schema (validating each one costs more than a small model's inference).
    """
    if as_json:
        value = json.dumps(prediction, separators=(",", ":")).encode()
        return Output(request.reply_to, value, request.id, list(JSON_HEADERS))
    return Output(request.reply_to, events.encode(prediction), request.id)


class StreamMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.records = Counter(
            "maas_inference_stream_records",
            "stream inference records: consumed, produced (predictions), dead_lettered",
            ["outcome"],
            registry=metrics.registry,
        )
        self.transaction_records = Histogram(
            "maas_inference_stream_transaction_records",
            "requests committed per Kafka transaction (one partition's fetch)",
            buckets=_BATCH_BUCKETS,
            registry=metrics.registry,
        )

    def committed(self, done: Committed) -> None:
        self.records.labels("consumed").inc(done.records)
        self.records.labels("produced").inc(done.produced)
        self.records.labels("dead_lettered").inc(done.dead_lettered)
        self.transaction_records.observe(done.records)


class InferenceStream:
    """The Kafka adapter of the data plane; ``run()`` until ``stop()``."""

    def __init__(self, settings: Settings, plane: DataPlane, metrics: Metrics) -> None:
        self._plane = plane
        self.metrics = StreamMetrics(metrics)
        self.pipe = TransactionalPipe(
            settings,
            topics=[INFER.name],
            group_id=GROUP_ID,
            transform=self.answer,
            expected_schemas=[events.INFER],
            on_commit=self.metrics.committed,
            max_poll_records=fetch_size(settings.inference_max_batch_size),
        )

    async def answer(self, record: Record) -> list[Output]:
        request = parse_request(record.event)
        result = await self._plane.infer(
            request.model, request.version, request.inputs, request.requested
        )
        as_json = events.content_type(record.headers).startswith(events.JSON_CONTENT_TYPE)
        return [prediction_output(prediction_event(request, result), request, as_json=as_json)]

    async def start(self) -> None:
        await self.pipe.start()

    async def run(self) -> None:
        await self.pipe.run()

    async def stop(self) -> None:
        await self.pipe.stop()
