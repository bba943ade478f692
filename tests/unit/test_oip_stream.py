"""Reading a generation request on ModelStreamInfer: the prompt and the sampling parameters, as
tritonclient sends them (numbers as text, lists and maps as JSON strings); and writing each
token's response."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest

from maas.errors import InvalidArgument
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.text.sampling import Token
from services.inference.oip_stream import MAX_PROMPT_BYTES, TokenResponses, prompt_of, sampling_of


def request(*, raw: list[bytes] | None = None, typed: bytes | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="gpt")
    tensor = message.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    if typed is not None:
        tensor.contents.bytes_contents.append(typed)
    message.raw_input_contents.extend(raw or [])
    return message


def test_the_prompt_is_read_from_raw_length_prefixed_bytes_or_typed_contents() -> None:
    assert prompt_of(request(raw=[b"\x03\x00\x00\x00def"])) == "def"
    assert prompt_of(request(typed="héllo".encode())) == "héllo"


def test_a_prompt_over_a_mebibyte_is_refused_before_it_is_decoded() -> None:
    at_limit = b"a" * MAX_PROMPT_BYTES
    assert len(prompt_of(request(raw=[struct.pack("<I", len(at_limit)) + at_limit]))) == len(
        at_limit
    )
    over = at_limit + b"a"
    with pytest.raises(InvalidArgument, match=r"holds 1048577 bytes; a prompt may hold at most"):
        prompt_of(request(raw=[struct.pack("<I", len(over)) + over]))
    with pytest.raises(InvalidArgument, match=r"holds 1048577 bytes; .* send the end of the text"):
        prompt_of(request(typed=over))


def test_a_raw_entry_count_unlike_the_input_count_is_refused_by_name() -> None:
    two_raw = request(raw=[b"\x01\x00\x00\x00a", b"\x01\x00\x00\x00b"])
    with pytest.raises(InvalidArgument, match="2 raw_input_contents"):
        prompt_of(two_raw)


def test_a_prompt_that_is_not_one_bytes_element_says_what_is_expected() -> None:
    message = request(typed=b"a")
    message.inputs[0].datatype = "FP32"
    message.inputs[0].ClearField("contents")
    message.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="'text_input' of datatype BYTES and shape"):
        prompt_of(message)


def test_a_second_input_is_refused_not_ignored() -> None:
    message = request(typed=b"a")
    message.inputs.add(name="extra", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"b"
    )
    with pytest.raises(InvalidArgument, match="and no other; it has"):
        prompt_of(message)


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_byte() -> None:
    with pytest.raises(InvalidArgument, match=r"'text_input' is not valid UTF-8 .* at byte 0"):
        prompt_of(request(typed=b"\xff\xfe hi"))


@pytest.mark.parametrize(
    ("output", "parameter", "match"),
    [
        ("nope", None, "requested output 'nope' does not exist"),
        ("text_output", "classification", "has parameters \\(classification\\)"),
    ],
)
def test_an_output_the_stream_does_not_answer_is_refused(output, parameter, match) -> None:
    message = request(typed=b"a")
    requested = message.outputs.add(name=output)
    if parameter:
        requested.parameters[parameter].int64_param = 2
    with pytest.raises(InvalidArgument, match=match):
        prompt_of(message)


@pytest.mark.parametrize("key", ["max_token", "sequence_id", "priority"])
def test_an_unknown_parameter_is_refused_listing_the_accepted_ones(key: str) -> None:
    message = request(typed=b"a")
    message.parameters[key].int64_param = 2
    with pytest.raises(
        InvalidArgument, match=f"unknown request parameter.*{key}.*takes max_tokens"
    ):
        sampling_of(message)


def test_a_bool_is_no_temperature() -> None:
    message = request(typed=b"a")
    message.parameters["temperature"].bool_param = True
    with pytest.raises(InvalidArgument, match="temperature=True must be a number"):
        sampling_of(message)


def test_sampling_parameters_may_come_as_text_and_json() -> None:
    message = request(typed=b"a")
    message.parameters["max_tokens"].string_param = "7"
    message.parameters["temperature"].int64_param = 0
    message.parameters["stop"].string_param = '["\\n", "END"]'
    message.parameters["logit_bias"].string_param = '{"256": -100}'
    params, empty_final = sampling_of(message)
    assert (params.max_tokens, params.temperature) == (7, 0.0)
    assert params.stop == ("\n", "END") and params.logit_bias == ((256, -100),)
    assert not empty_final


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("logit_bias", "{256: -100}"),
        ("stop", "[unclosed"),
        ("top_k", "three"),
        ("stop", "[" * 100_000 + "]" * 100_000),  # deeper than json recurses
        ("logit_bias", '{"1":' * 100_000 + "0" + "}" * 100_000),
    ],
)
def test_a_parameter_that_does_not_parse_is_named(key: str, value: str) -> None:
    message = request(typed=b"a")
    message.parameters[key].string_param = value
    with pytest.raises(InvalidArgument, match=key):
        sampling_of(message)


def test_a_number_sent_as_a_long_text_is_refused_by_its_length_without_quoting_it() -> None:
    message = request(typed=b"a")
    message.parameters["max_tokens"].string_param = "1" + "0" * 5000
    with pytest.raises(InvalidArgument, match="max_tokens holds 5001 characters") as refused:
        sampling_of(message)
    assert len(str(refused.value)) < 200


def test_a_float_text_for_a_whole_number_setting_says_a_whole_number_is_wanted() -> None:
    message = request(typed=b"a")
    message.parameters["max_tokens"].string_param = "1e3"
    with pytest.raises(InvalidArgument, match="max_tokens='1e3' must be a whole number"):
        sampling_of(message)


def test_a_flag_parameter_sent_as_the_text_false_is_false() -> None:
    message = request(typed=b"a")
    message.parameters["triton_enable_empty_final_response"].string_param = "false"
    assert sampling_of(message)[1] is False
    message.parameters["triton_enable_empty_final_response"].string_param = "maybe"
    with pytest.raises(InvalidArgument, match="must be a bool"):
        sampling_of(message)


def token_message(token: Token, final: bool) -> pb.ModelStreamInferResponse:
    """A token's response as OIP spells it, built field by field."""
    response = pb.ModelInferResponse(model_name="gpt", model_version="3", id="request-1")
    response.parameters["triton_final_response"].bool_param = final
    text = token.text.encode()
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(struct.pack("<I", len(text)) + text)
    response.outputs.add(name="token_id", datatype="INT64", shape=[1])
    response.raw_output_contents.append(struct.pack("<q", token.id))
    if token.finish is not None:
        response.parameters["finish_reason"].string_param = token.finish
    return pb.ModelStreamInferResponse(infer_response=response)


@pytest.mark.parametrize(
    ("token", "final"),
    [
        (Token(104, "h"), False),
        (Token(195, ""), False),  # half of a UTF-8 character: no text yet
        (Token(200, "é" * 100), False),  # lengths past one varint byte
        (Token(10, "\n", "length"), True),
        (Token(10, "x", "stop"), False),  # the last token when an empty final follows
    ],
)
def test_a_token_response_written_as_bytes_parses_as_the_oip_message(
    token: Token, final: bool
) -> None:
    engine: Any = SimpleNamespace(model_name="gpt", model_version=3)
    responses = TokenResponses(pb.ModelInferRequest(id="request-1"), engine)
    written = pb.ModelStreamInferResponse.FromString(responses.encode(token, final))
    assert written == token_message(token, final)
