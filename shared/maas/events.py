"""Event envelope, (de)serialisation and validation against ``schemas/events/*.json``.

Every event is a map with ``schema`` (e.g. ``maas.job/1``), a unique ``id`` and ``ts`` in ms.
On the wire it is msgpack; JSON is accepted when the record has header
``content-type: application/json`` (so people can publish jobs with any Kafka tool).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from maas.config import Settings
from maas.errors import SchemaViolation
from maas.suggest import unknown_key

if TYPE_CHECKING:  # jsonschema loads with the first validation: `maas models list` needs none
    from jsonschema import Draft202012Validator

JOB = "maas.job/1"
JOB_STATUS = "maas.job-status/1"
MODEL = "maas.model/1"
DLQ = "maas.dlq/1"
MEMBER = "maas.member/1"
ASSIGNMENT = "maas.assignment/1"
INFER = "maas.infer/1"
PREDICTION = "maas.prediction/1"

# Reasons quote offending values; a quoted 16 MiB string would make every reason that big.
MAX_REASON_CHARS = 500

CONTENT_TYPE_HEADER = "content-type"
JSON_CONTENT_TYPE = "application/json"
MSGPACK_CONTENT_TYPE = "application/msgpack"


def schemas_dir() -> Path:
    override = os.environ.get("MAAS_SCHEMAS_DIR")
    if override:
        return Path(override)
    # In a checkout shared/maas/schemas links to the repository's schemas/; a wheel holds a copy.
    return Path(__file__).resolve().parent / "schemas"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_event(schema: str, **fields: Any) -> dict[str, Any]:
    """A new event with a fresh id and timestamp; ``fields`` may override ``id``/``ts``."""
    event: dict[str, Any] = {"schema": schema, "id": uuid.uuid4().hex, "ts": now_ms()}
    event.update(fields)
    return event


def _ecma_pattern(pattern: str) -> re.Pattern[str]:
    """A schema's ``pattern`` as JSON Schema (ECMA-262) reads it: a final ``$`` is the end of
    the text. Python's ``$`` also matches before a final newline, so ``"job-1\\n"`` passed
    ``^[A-Za-z0-9._-]+$`` and failed later, where names are matched whole."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + "\\Z"
    return _compiled(pattern)


_compiled = cache(re.compile)


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    from jsonschema import ValidationError

    if validator.is_type(instance, "string") and not _ecma_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@cache
def _validators() -> dict[str, Draft202012Validator]:
    from jsonschema import Draft202012Validator, validators
    from referencing import Registry, Resource

    checker = validators.extend(Draft202012Validator, {"pattern": _pattern_keyword})

    documents = []
    for path in sorted((schemas_dir() / "events").glob("*.json")):
        documents.append(json.loads(path.read_text()))
    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in documents
    )
    return {doc["$id"]: checker(doc, registry=registry) for doc in documents if "/" in doc["$id"]}


def known_schemas() -> list[str]:
    return sorted(_validators())


def validate(event: Any, expected: str | Iterable[str] | None = None) -> dict[str, Any]:
    """Check an event against its schema; raise SchemaViolation naming the field and problem."""
    if not isinstance(event, dict):
        raise SchemaViolation(f"an event must be a map, got {type(event).__name__}")
    name = event.get("schema")
    if not isinstance(name, str):
        raise SchemaViolation(
            f"schema must be a string like {JOB!r}, got {type(name).__name__}; "
            f"known: {known_schemas()}"
        )
    allowed = {expected} if isinstance(expected, str) else set(expected or ())
    if allowed and name not in allowed:
        raise SchemaViolation(
            f"schema {clip(repr(name))} is not accepted here; expected {sorted(allowed)}"
        )
    validator = _validators().get(name)
    if validator is None:
        raise SchemaViolation(f"unknown event schema {clip(repr(name))}; known: {known_schemas()}")
    # A few errors say what is wrong; all of them could be millions (one per list element).
    first = itertools.islice(validator.iter_errors(event), 20)
    errors = sorted(first, key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        # Once each: a schema's branches (an envelope in two schemas) repeat the same error.
        reasons = dict.fromkeys(_describe(e) for e in errors)
        raise SchemaViolation(clip("; ".join(list(reasons)[:5])))
    return event


def check_numbers(event: dict[str, Any]) -> None:
    """Refuse NaN or infinity anywhere in ``event``, and integers msgpack cannot carry, naming
    where. JSON has no NaN, but Python's parser, msgpack and YAML's ``.nan`` make them, and a
    schema's ``number`` takes them: a NaN learning rate or threshold in a job would poison
    whatever reads it. An integer beyond 64 bits passes a schema's ``minimum`` but cannot be
    published."""
    stack: list[tuple[str, Any]] = [("", event)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaViolation(f"{where}={value} is not a finite number; give a real value")
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            raise SchemaViolation(
                f"{where} is a {value.bit_length()}-bit integer, beyond 64 bits; give a smaller "
                "value"
            )
        children = (
            value.items()
            if isinstance(value, dict)
            else (enumerate(value) if isinstance(value, list) else ())
        )
        stack.extend((f"{where}.{key}" if where else str(key), child) for key, child in children)


UNKNOWN_KEYS_NAMED = 5  # unknown keys of one mapping named in a refusal, each with a suggestion


def _describe(error: Any) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        unknown = [key for key in error.instance if key not in known]
        # A suggestion costs an edit distance to every known key: name the first few only.
        named = "; ".join(
            unknown_key(f"{where}.{key}" if where else str(key), known)
            for key in unknown[:UNKNOWN_KEYS_NAMED]
        )
        if len(unknown) > UNKNOWN_KEYS_NAMED:
            return f"{len(unknown)} unknown keys, the first {UNKNOWN_KEYS_NAMED}: {named}"
        return named
    return f"{where or '(event)'}: {clip(error.message, 200)}"


def json_failure(exc: BaseException) -> str:
    """Why ``json.loads`` refused a text, in words a sender can act on: Python's own wording
    for two of its limits tells of ``sys.set_int_max_str_digits`` and the recursion depth."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nest too deeply"
    text = str(exc)
    if "integer string conversion" in text:
        return "it holds a whole number of more than 4 300 digits"
    return clip(text or type(exc).__name__, 200)


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def printable(text: str, limit: int = 80, *, keep: str = "") -> str:
    """``text`` for a terminal: control characters escaped (a job id holding a screen-clear
    prints as ``\\x1b[2J``), but those in ``keep``, clipped."""
    # Only the head is escaped: the text may be a caller's, and megabytes long.
    head = "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text[:limit])
    left_out = max(0, len(head) - limit) + max(0, len(text) - limit)
    return f"{head[:limit]}… ({left_out} more characters)" if left_out else head


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a message, clipped: a caller's value is echoed so they can find it,
    not copied back whole (a 5 000-digit key, a megabyte string)."""
    return clip(repr(value), limit)


def encode(event: Mapping[str, Any]) -> bytes:
    return msgpack.packb(event, use_bin_type=True)


def decode(
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | None]] = (),
    *,
    max_depth: int = Settings.event_max_depth,
) -> dict[str, Any]:
    """Decode a record value (msgpack, or JSON when its header says so, or when it has no
    content-type and starts as a JSON object does) into an event map.

    Anything that is not a map of string keys nested at most ``max_depth`` deep is a
    SchemaViolation: retrying cannot change the bytes.
    """
    if value is None:
        raise SchemaViolation("record has no value")
    declared = content_type(headers)
    is_json = declared.startswith(JSON_CONTENT_TYPE) or (not declared and _json_object(value))
    try:
        obj = json.loads(value) if is_json else msgpack.unpackb(value, raw=False)
    except (ValueError, RecursionError, msgpack.UnpackException) as exc:
        kind = "JSON" if is_json else "msgpack"
        why = json_failure(exc)  # msgpack's FormatError says nothing of itself: its type then
        raise SchemaViolation(clip(f"record value is not valid {kind}: {why}")) from None
    if not isinstance(obj, dict):
        raise SchemaViolation(f"record value must decode to a map, got {type(obj).__name__}")
    check_shape(obj, max_depth)
    return obj


def _json_object(value: bytes) -> bool:
    """Whether an undeclared value is a JSON object's text. kcat and most Kafka producers send
    no headers; such a job was dead-lettered as 'not valid msgpack'. No msgpack map starts so:
    ``{`` and JSON's whitespace are msgpack integers, so a value starting with one of them is
    a number followed by bytes no msgpack reader takes."""
    return value.lstrip(b" \t\r\n")[:1] == b"{"


def content_type(headers: Iterable[tuple[str, bytes | None]]) -> str:
    """The record's content-type header, lower case ('' when absent, null or not text); a
    record with two that differ is a SchemaViolation (which one was meant is not knowable, and
    a dead letter would show only one of them)."""
    found = {
        value.decode("latin-1").strip().lower()
        for key, value in headers
        if key.lower() == CONTENT_TYPE_HEADER and value
    }
    if len(found) > 1:
        raise SchemaViolation(
            clip(
                f"the record has {len(found)} different content-type headers "
                f"({', '.join(sorted(found))}); send one: {JSON_CONTENT_TYPE} or none (msgpack)"
            )
        )
    return found.pop() if found else ""


def check_shape(obj: Any, max_depth: int) -> None:
    """SchemaViolation unless every map has string keys, every string is Unicode that UTF-8 can
    carry and nothing nests over ``max_depth``.

    Iterative, so a hostile record cannot exhaust the interpreter's recursion limit here or in
    the schema validator that runs next. JSON may spell a lone UTF-16 surrogate (``"\\udc80"``);
    such a string could never be written back out (a dead letter naming it, a status echoing
    it), so it is refused here, where the record is read.
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= max_depth:
            raise SchemaViolation(
                f"{_path_text(path)} nests deeper than {max_depth} levels (MAAS_EVENT_MAX_DEPTH)"
            )
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(node, dict) and not isinstance(key, str):
                raise SchemaViolation(
                    f"{_path_text(path)} has a {type(key).__name__} key; event keys must be strings"
                )
            for text in (key, child):
                if isinstance(text, str) and not is_utf8(text):
                    raise SchemaViolation(
                        f"{_path_text((*path, key))} holds a lone UTF-16 surrogate "
                        f"({clip(utf8_text(text), 40)}); text must be valid Unicode (JSON "
                        "\\uD800-\\uDFFF escapes only as pairs)"
                    )
            if isinstance(child, dict | list):
                stack.append((child, (*path, key)))


def is_utf8(text: str) -> bool:
    """Whether UTF-8 can carry ``text``: false for one holding a lone surrogate (JSON's unpaired
    escapes, bytes Python decoded with surrogateescape)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(text: str) -> str:
    """``text`` with its lone surrogates written as backslash escapes, so a message quoting it
    can always be sent."""
    return text if is_utf8(text) else text.encode("utf-8", "backslashreplace").decode()


def _path_text(path: tuple[Any, ...]) -> str:
    shown = ".".join(clip(utf8_text(str(p)), 40) for p in path[:8])
    return (shown + ("…" if len(path) > 8 else "")) or "(event)"
