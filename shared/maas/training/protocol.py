"""The training wire protocol: gradient and parameter events, chunked when large.

``maas.gradient/1`` (worker -> shard, topic ``maas.gradients.v1``) and ``maas.params/1``
(shard -> workers, ``maas.params.v1``) are keyed ``job_id/shard`` and written to partition
``shard % partitions``, so a shard reads one partition and a worker reads all of them.

Parameters travel as fp32, except for jobs with a compressing gradient codec: those get an fp16
copy of the shard's fp32 master weights (``JobPlan.broadcast_dtype``), halving the broadcast that
every step waits for; ``none`` keeps the whole exchange exact.

A payload (a codec map, or a parameter partition as one tensor) whose tensors exceed the
chunk size is msgpack-encoded and cut into ``maas.codec`` chunks, each sent as its own event
with ``chunk = {index, count}`` and the chunk map as ``payload``; the receiver reassembles and
verifies the whole payload's sha256 before using any of it.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from maas import events
from maas.codec import ChunkAssembler, TensorChunk, map_to_tensor, split_tensor, tensor_to_map
from maas.errors import InvalidArgument
from maas.training.codecs import FP16_MAX

KEY_SEPARATOR = "/"
BROADCAST_DTYPES: tuple[str, ...] = ("float32", "float16")
_ENVELOPE_BYTES = 1024


def record_key(job_id: str, shard: int) -> str:
    return f"{job_id}{KEY_SEPARATOR}{shard}"


def job_of_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    return key.decode("utf-8", errors="replace").rpartition(KEY_SEPARATOR)[0]


def partition_for(shard: int, partitions: int) -> int:
    return shard % partitions


def payload_bytes(payload: Mapping[str, Any]) -> int:
    return sum(len(v["data"]) for v in payload.values() if isinstance(v, Mapping) and "data" in v)


def _chunked(
    fields: dict[str, Any], schema: str, payload: dict[str, Any], chunk_bytes: int
) -> list[dict[str, Any]]:
    if payload_bytes(payload) + _ENVELOPE_BYTES <= chunk_bytes:
        return [events.new_event(schema, **fields, payload=payload)]
    packed = np.frombuffer(msgpack.packb(payload, use_bin_type=True), dtype=np.uint8)
    chunks = list(split_tensor(packed, chunk_bytes, tensor_id=uuid.uuid4().hex))
    return [
        events.new_event(
            schema,
            **fields,
            payload=c.to_map(),
            chunk={"index": c.index, "count": c.count},
        )
        for c in chunks
    ]


def gradient_events(
    *,
    job_id: str,
    shard: int,
    worker: int,
    step: int,
    version: int,
    codec: str,
    samples: int,
    payload: dict[str, Any],
    chunk_bytes: int,
    loss: float | None = None,
    accuracy: float | None = None,
) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "step": step,
        "worker": worker,
        "shard": shard,
        "version": version,
        "codec": codec,
        "num_samples": samples,
    }
    if loss is not None:
        fields["loss"] = loss
    if accuracy is not None:
        fields["accuracy"] = accuracy
    return _chunked(fields, events.GRADIENT, payload, chunk_bytes)


def broadcast_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """What workers receive of a shard's fp32 parameters: the same, or an fp16 copy."""
    if dtype == "float32":
        return np.asarray(values, dtype=np.float32)
    half = np.empty(values.shape, dtype=np.float16)
    np.clip(values, -FP16_MAX, FP16_MAX, out=half, casting="same_kind")
    return half


def params_events(
    *,
    job_id: str,
    shard: int,
    version: int,
    values: np.ndarray,
    final: bool,
    chunk_bytes: int,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Events carrying ``values`` as ``dtype``; fp32 ones view ``values`` (no copy).

    Send them with ``transport.send_all``, which encodes before yielding to the event loop.
    """
    payload = {"values": tensor_to_map(broadcast_values(values, dtype))}
    fields = {"job_id": job_id, "shard": shard, "version": version, "step": version, "final": final}
    return _chunked(fields, events.PARAMS, payload, chunk_bytes)


def params_values(payload: Mapping[str, Any], size: int) -> np.ndarray:
    """The fp32 parameters of a params payload (fp16 ones widened)."""
    values = map_to_tensor(payload.get("values"))
    if values.dtype.name not in BROADCAST_DTYPES or values.shape != (size,):
        raise InvalidArgument(
            f"params payload must be float32 or float16 of shape ({size},), got "
            f"{values.dtype.name} {list(values.shape)}"
        )
    return values.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Assembled:
    payload: dict[str, Any]
    first_offset: int  # of the message's first chunk: where a replay must start to see it all


class PayloadAssembler:
    """Collects chunked payloads by message identity; keeps at most ``limit`` incomplete ones."""

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._pending: OrderedDict[tuple[Any, ...], tuple[ChunkAssembler, int]] = OrderedDict()

    def add(
        self, identity: tuple[Any, ...], event: Mapping[str, Any], offset: int = -1
    ) -> Assembled | None:
        """The complete payload, or None while chunks are missing."""
        if "chunk" not in event:
            payload = event["payload"]
            if not isinstance(payload, dict):
                raise InvalidArgument("payload must be a map")
            return Assembled(payload, offset)
        chunk = TensorChunk.from_map(event["payload"])
        # A re-sent message gets a new tensor id: its chunks must not mix with the first copy's.
        identity = (*identity, chunk.tensor_id)
        if identity not in self._pending:
            self._pending[identity] = (ChunkAssembler(), offset)
            while len(self._pending) > self._limit:
                self._pending.popitem(last=False)  # an abandoned message (its sender died)
        assembler, first = self._pending[identity]
        if not assembler.add(chunk):
            return None
        del self._pending[identity]
        packed = assembler.result()
        try:
            payload = msgpack.unpackb(packed.tobytes(), raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise InvalidArgument(f"reassembled payload is not msgpack: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidArgument("reassembled payload must be a map")
        return Assembled(payload, first)
