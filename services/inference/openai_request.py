"""What an OpenAI completions or chat completions body asks for, checked field by field.

Pure functions of the parsed JSON body, so the rules are testable without a server: each
refusal is an ``InvalidArgument`` led by the field it is about (``openai_http`` turns that into
OpenAI's ``param``). A field this server cannot honour at a non-default value is refused by
name rather than ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from maas.errors import InvalidArgument
from maas.events import clip, shown
from maas.registry import ModelRef
from maas.text.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name"})
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
COMPLETION_DEFAULTS = {"max_tokens": 16, "temperature": 1.0}
CHAT_DEFAULTS = {"max_tokens": 64, "temperature": 1.0}
# OpenAI fields that change nothing here at their default values, and those values: one
# choice, no log-probabilities, no penalties, no suffix, free text. Any other value is refused
# by name rather than ignored, since a client that asked for it would read an answer without it.
DEFAULTS_ONLY: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}
# logprobs is a count in completions (0 still asks for the sampled tokens' log-probabilities)
# and a flag in chat.
LOGPROBS_OFF = {False: (None,), True: (None, False)}  # by chat
SAMPLING = frozenset({"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "logit_bias"})  # fmt: skip
COMMON = SAMPLING | {"model", "stream", "stream_options", "user", "n", "presence_penalty",
                     "frequency_penalty", "logprobs"}  # fmt: skip
# Each endpoint's own fields: one sent to the other endpoint is refused, not ignored (a chat
# body's ``prompt`` or a completion's ``messages`` was dropped without a word).
FIELDS = {
    False: COMMON | {"prompt", "echo", "suffix", "best_of"},
    True: COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"},
}
PATHS = {False: "/v1/completions", True: "/v1/chat/completions"}


def split_model(model: Any) -> tuple[str, str]:
    """The body's ``model`` read as ``ModelRef.parse`` reads a ref everywhere else -> (name,
    the version or alias the data plane resolves: "" for the name's default)."""
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model must be a model name, e.g. 'gpt' or 'gpt@production'")
    try:
        ref = ModelRef.parse(model)
    except InvalidArgument as refused:
        raise InvalidArgument(f"model: {refused}") from None
    return ref.name, str(ref.version) if ref.version is not None else ref.alias or ""


def sampling(body: Mapping[str, Any], *, chat: bool) -> SamplingParams:
    _check_fields(body, chat)
    for flag in ("stream", "echo"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise InvalidArgument(f"{flag}={_json(body[flag])} must be true or false")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidArgument(f"user={_json(body['user'])} must be a string")
    defaults = CHAT_DEFAULTS if chat else COMPLETION_DEFAULTS
    fields = dict(body)
    if fields.get("max_completion_tokens") is None:
        return SamplingParams.from_request(fields, **defaults)
    if fields.get("max_tokens") is not None:
        raise InvalidArgument(
            "max_completion_tokens and max_tokens are the same limit: send one of them"
        )
    fields["max_tokens"] = fields["max_completion_tokens"]
    try:
        return SamplingParams.from_request(fields, **defaults)
    except InvalidArgument as exc:  # the field the client sent, not the one it maps to
        raise InvalidArgument(exc.message.replace("max_tokens", "max_completion_tokens")) from None


def _check_fields(body: Mapping[str, Any], chat: bool) -> None:
    unknown = sorted(set(body) - FIELDS[chat])
    if unknown:
        elsewhere = [f for f in unknown if f in FIELDS[not chat]]
        where = f" (they belong to {PATHS[not chat]})" if elsewhere == unknown else ""
        raise InvalidArgument(  # led by a field's name: OpenAI's error names it as ``param``
            f"{unknown[0]}: unknown request fields {shown(unknown, 200)} for {PATHS[chat]}{where}"
        )
    limits = {**DEFAULTS_ONLY, "logprobs": LOGPROBS_OFF[chat]}
    for field, accepted in limits.items():
        if field in body and not any(_same(body[field], value) for value in accepted):
            send = f" or send {json.dumps(accepted[1])}" if len(accepted) > 1 else ""
            raise InvalidArgument(
                f"{field}={_json(body[field])} is not supported by this server: leave {field} "
                f"out{send}"
            )


def _json(value: object) -> str:
    return clip(json.dumps(value), 80)


def _same(value: object, default: object) -> bool:
    """Equal and of the same kind: ``true`` is not the count 1, nor ``1.0`` the flag true."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def include_usage(body: Mapping[str, Any]) -> bool:
    """``stream_options: {"include_usage": true}``: a last chunk carries the token counts."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise InvalidArgument("stream_options is only read with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidArgument(
            f"stream_options={shown(options, 80)} must be an object with include_usage only"
        )
    flag = options.get("include_usage", False)
    if not isinstance(flag, bool):
        raise InvalidArgument(f"stream_options.include_usage={shown(flag, 80)} must be a boolean")
    return flag


def completion_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise InvalidArgument("prompt is required: the text to continue, one string")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise InvalidArgument("prompt must be text: token ids are not taken; send the string")
    raise InvalidArgument(
        f"prompt={_json(prompt)} must be one string (lists of prompts are not supported)"
    )


def chat_prompt(body: Mapping[str, Any]) -> str:
    """Messages as one text the model continues: ``role: content`` lines, then ``assistant:``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content}")
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}] must be an object {{role, content}}")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise InvalidArgument(
                f"messages[{i}] has unknown keys {shown(unknown, 120)}; a message takes "
                f"{sorted(MESSAGE_KEYS)}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role={role!r}: accepted roles are {list(ROLES)}")
        speaker = role if message.get("name") is None else f"{role} {_name(message['name'], i)}"
        lines.append(f"{speaker}: {_content(message.get('content'), i)}")
    return "\n".join(lines) + "\nassistant:"


def _name(name: object, i: int) -> str:
    """A participant's name, which the text says beside the role (OpenAI: 1-64 letters,
    digits, '_' or '-')."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidArgument(
            f"messages[{i}].name={_json(name)} must be 1 to 64 letters, digits, '_' or '-'"
        )
    return name


def _content(content: object, i: int) -> str:
    """A string, or OpenAI's list of content parts of which only ``text`` parts fit a text model."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise InvalidArgument(
        f"messages[{i}].content must be a string or a list of "
        '{"type": "text", "text": "..."} parts (a text model takes no other kind)'
    )
