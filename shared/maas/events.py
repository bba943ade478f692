"""Event envelope, (de)serialisation and validation against ``schemas/events/*.json``.

Every event is a map with ``schema`` (e.g. ``maas.job/1``), a unique ``id`` and ``ts`` in ms.
On the wire it is msgpack; JSON is accepted when the record has header
``content-type: application/json`` (so people can publish jobs with any Kafka tool).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from maas.errors import SchemaViolation
from maas.suggest import unknown_key

JOB = "maas.job/1"
JOB_STATUS = "maas.job-status/1"
MODEL = "maas.model/1"
DLQ = "maas.dlq/1"
GRADIENT = "maas.gradient/1"
PARAMS = "maas.params/1"

CONTENT_TYPE_HEADER = "content-type"
JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/msgpack"


def schemas_dir() -> Path:
    override = os.environ.get("MAAS_SCHEMAS_DIR")
    if override:
        return Path(override)
    # shared/maas/events.py -> repository root / schemas
    return Path(__file__).resolve().parents[2] / "schemas"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_event(schema: str, **fields: Any) -> dict[str, Any]:
    """A new event with a fresh id and timestamp; ``fields`` may override ``id``/``ts``."""
    event: dict[str, Any] = {"schema": schema, "id": uuid.uuid4().hex, "ts": now_ms()}
    event.update(fields)
    return event


@cache
def _validators() -> dict[str, Draft202012Validator]:
    documents = []
    for path in sorted((schemas_dir() / "events").glob("*.json")):
        documents.append(json.loads(path.read_text()))
    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in documents
    )
    return {
        doc["$id"]: Draft202012Validator(doc, registry=registry)
        for doc in documents
        if "/" in doc["$id"]
    }


def known_schemas() -> list[str]:
    return sorted(_validators())


def validate(event: Any, expected: str | Iterable[str] | None = None) -> dict[str, Any]:
    """Check an event against its schema; raise SchemaViolation naming the field and problem."""
    if not isinstance(event, dict):
        raise SchemaViolation(f"an event must be a map, got {type(event).__name__}")
    name = event.get("schema")
    allowed = {expected} if isinstance(expected, str) else set(expected or ())
    if allowed and name not in allowed:
        raise SchemaViolation(f"schema {name!r} is not accepted here; expected {sorted(allowed)}")
    validator = _validators().get(name) if isinstance(name, str) else None
    if validator is None:
        raise SchemaViolation(f"unknown event schema {name!r}; known: {known_schemas()}")
    errors = sorted(validator.iter_errors(event), key=lambda e: list(e.absolute_path))
    if errors:
        raise SchemaViolation("; ".join(_describe(e) for e in errors[:5]))
    return event


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        return "; ".join(
            unknown_key(f"{where}.{key}" if where else str(key), known)
            for key in error.instance
            if key not in known
        )
    return f"{where or '(event)'}: {error.message}"


def encode(event: Mapping[str, Any]) -> bytes:
    return msgpack.packb(event, use_bin_type=True)


def decode(value: bytes | None, headers: Iterable[tuple[str, bytes]] = ()) -> dict[str, Any]:
    """Decode a record value (msgpack, or JSON when its header says so) into an event map."""
    if value is None:
        raise SchemaViolation("record has no value")
    content_type = dict(headers).get(CONTENT_TYPE_HEADER, b"").decode("latin-1").lower()
    try:
        if content_type.startswith(JSON_CONTENT_TYPE):
            obj = json.loads(value)
        else:
            obj = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        kind = "JSON" if content_type.startswith(JSON_CONTENT_TYPE) else "msgpack"
        raise SchemaViolation(f"record value is not valid {kind}: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaViolation(f"record value must decode to a map, got {type(obj).__name__}")
    return obj
