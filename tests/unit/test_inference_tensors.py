"""OIP tensors: raw and typed inputs decode to the same arrays; outputs go back raw."""

import numpy as np
import pytest

from maas.errors import InvalidArgument
from maas.oip import grpc_predict_v2_pb2 as pb
from services.inference.tensors import (
    check_request_parameters,
    decode_inputs,
    decode_raw,
    decode_typed,
    infer_response,
    requested_outputs,
)

Input = pb.ModelInferRequest.InferInputTensor


def raw_request(**arrays: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        datatype = {"float32": "FP32", "int64": "INT64", "float16": "FP16"}[array.dtype.name]
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return request


def test_raw_contents_decode_to_the_sent_array():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    (decoded,) = decode_inputs(raw_request(input=x)).values()
    np.testing.assert_array_equal(decoded, x)
    assert decoded.dtype == np.float32 and decoded.shape == (3, 4)


def test_raw_decoding_is_a_view_not_a_copy():
    raw = np.ones((2, 2), dtype=np.float32).tobytes()
    decoded = decode_raw(Input(name="x", datatype="FP32", shape=[2, 2]), raw)
    assert not decoded.flags.owndata and not decoded.flags.writeable


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 4.0], np.float32),
        ("FP64", "fp64_contents", [0.1, 0.2, 0.3, 0.4], np.float64),
        ("INT32", "int_contents", [-3, 0, 7, 2**31 - 1], np.int32),
        ("INT8", "int_contents", [-128, 0, 5, 127], np.int8),
        ("INT64", "int64_contents", [-(2**40), 0, 1, 2**40], np.int64),
        ("UINT8", "uint_contents", [0, 1, 128, 255], np.uint8),
        ("UINT64", "uint64_contents", [0, 1, 2**63, 5], np.uint64),
        ("BOOL", "bool_contents", [True, False, False, True], np.bool_),
    ],
)
def test_typed_contents_decode_from_the_field_of_their_datatype(datatype, field, values, dtype):
    tensor = Input(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, field).extend(values)
    decoded = decode_typed(tensor)
    np.testing.assert_array_equal(decoded, np.array(values, dtype=dtype).reshape(2, 2))
    assert decoded.dtype == dtype


def test_typed_and_raw_forms_of_one_tensor_decode_identically():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="input", datatype="FP32", shape=[5, 3]).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    assert (
        decode_inputs(typed)["input"].tobytes()
        == decode_inputs(raw_request(input=x))["input"].tobytes()
    )


def test_raw_byte_count_must_match_datatype_and_shape():
    complaint = r"has 12 raw bytes.*FP32 with shape \[2, 2\] needs 16"
    with pytest.raises(InvalidArgument, match=complaint):
        decode_raw(Input(name="x", datatype="FP32", shape=[2, 2]), b"\0" * 12)


def test_typed_value_count_must_match_shape():
    tensor = Input(name="x", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend([1.0] * 5)
    with pytest.raises(InvalidArgument, match=r"5 values in contents.fp32_contents.*needs 6"):
        decode_typed(tensor)


def test_typed_values_out_of_range_for_the_datatype_are_refused():
    tensor = Input(name="x", datatype="UINT8", shape=[1])
    tensor.contents.uint_contents.append(300)
    with pytest.raises(InvalidArgument, match="outside the range of UINT8"):
        decode_typed(tensor)


def test_fp16_has_no_typed_field_and_must_travel_raw():
    with pytest.raises(InvalidArgument, match="send it as raw_input_contents"):
        decode_typed(Input(name="x", datatype="FP16", shape=[1]))


def test_unknown_datatype_is_refused_naming_the_accepted_ones():
    with pytest.raises(InvalidArgument, match=r"'BF17'.*use one of BOOL, UINT8"):
        decode_raw(Input(name="x", datatype="BF17", shape=[1]), b"\0\0")


def test_negative_dimensions_are_refused_in_requests():
    with pytest.raises(InvalidArgument, match="concrete size"):
        decode_raw(Input(name="x", datatype="FP32", shape=[-1, 4]), b"")


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "raw"])
def test_an_empty_shape_whose_product_overflows_is_an_invalid_argument(typed):
    # [2**40, 2**40, 0] holds no values, so the counts agree; numpy cannot shape it. Typed, it
    # was an INTERNAL with a traceback in the log, per request.
    tensor = Input(name="x", datatype="FP32", shape=[2**40, 2**40, 0])
    with pytest.raises(InvalidArgument, match=r"^input 'x' has shape \[1099511627776, "):
        decode_typed(tensor) if typed else decode_raw(tensor, b"")


def test_a_huge_tensor_name_is_clipped_in_refusals():
    # Echoed whole, a 20 000-character name overflowed the client's 16 KiB limit on the
    # status header: it saw RESOURCE_EXHAUSTED "Stream removed", not the refusal.
    with pytest.raises(InvalidArgument) as refused:
        decode_raw(Input(name="n" * 20_000, datatype="FP32", shape=[2]), b"")
    assert len(refused.value.message) < 300 and "more characters" in refused.value.message


@pytest.mark.parametrize(
    ("datatype", "raw"),
    [("FP32", None), ("FP32", b"\0" * 4), ("BYTES", None), ("BYTES", b"\1\0\0\0a")],
    ids=["fp32-typed", "fp32-raw", "bytes-typed", "bytes-raw"],
)
def test_more_dimensions_than_an_array_can_have_are_refused_in_requests(datatype, raw):
    tensor = Input(name="x", datatype=datatype, shape=[1] * 65)
    if datatype == "FP32":
        tensor.contents.fp32_contents.append(1.0)
    else:
        tensor.contents.bytes_contents.append(b"a")
    with pytest.raises(InvalidArgument, match=r"^input 'x' has 65 dimensions; at most 64 are"):
        decode_typed(tensor) if raw is None else decode_raw(tensor, raw)


def test_mixing_raw_and_typed_contents_is_refused():
    request = raw_request(input=np.zeros((1, 2), np.float32))
    request.inputs[0].contents.fp32_contents.extend([0.0, 0.0])
    with pytest.raises(InvalidArgument, match="use one form for every input"):
        decode_inputs(request)


def test_raw_entries_must_match_the_number_of_inputs():
    request = raw_request(a=np.zeros(1, np.float32), b=np.zeros(1, np.float32))
    del request.raw_input_contents[1]
    with pytest.raises(InvalidArgument, match="2 inputs but 1 raw_input_contents"):
        decode_inputs(request)


def test_an_input_asking_for_shared_memory_is_refused():
    request = raw_request(input=np.zeros((1, 2), np.float32))
    request.inputs[0].parameters["shared_memory_region"].string_param = "region-0"
    with pytest.raises(InvalidArgument, match="no shared-memory extension"):
        decode_inputs(request)


def test_duplicate_input_names_are_refused():
    request = raw_request(input=np.zeros(1, np.float32))
    request.inputs.add(name="input", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    with pytest.raises(InvalidArgument, match="appears twice"):
        decode_inputs(request)


def test_outputs_are_encoded_as_little_endian_raw_contents():
    y = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian on purpose
    response = pb.ModelInferResponse.FromString(infer_response("m", "1", "r", [("output", y)]))
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [2, 3])
    assert not out.HasField("contents")
    restored = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(restored, y)


def test_every_output_is_written_in_its_order_whatever_its_shape_or_layout():
    outputs = [
        ("scalar", np.array(1.5, np.float32)),
        ("empty", np.zeros((0, 10), np.float32)),
        ("transposed", np.arange(6, dtype=np.int64).reshape(3, 2).T),  # not C-contiguous
        ("half", np.arange(4, dtype=np.float16)),
        ("labels", np.array(["a", "bé"], dtype=object)),
    ]
    response = pb.ModelInferResponse.FromString(infer_response("m", "3", "r-1", outputs))
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "r-1")
    assert [o.name for o in response.outputs] == [name for name, _ in outputs]
    assert [list(o.shape) for o in response.outputs] == [list(a.shape) for _, a in outputs]
    for (_, array), raw in zip(outputs[:4], response.raw_output_contents, strict=False):
        restored = np.frombuffer(raw, dtype=array.dtype.newbyteorder("<")).reshape(array.shape)
        np.testing.assert_array_equal(restored, array)
    assert response.raw_output_contents[4] == b"\x01\x00\x00\x00a\x03\x00\x00\x00b\xc3\xa9"


def test_requested_outputs_come_in_order_each_once() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    assert requested_outputs(request) == ["b", "a"]
    request.outputs.add(name="b")
    with pytest.raises(InvalidArgument, match="'b' is requested twice"):
        requested_outputs(request)


def test_the_classification_extension_is_refused_not_ignored() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.outputs.add(name="output").parameters["classification"].int64_param = 3
    with pytest.raises(InvalidArgument, match="classification extension"):
        requested_outputs(request)


def test_values_in_a_contents_field_other_than_the_datatypes_are_refused():
    tensor = Input(name="x", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    tensor.contents.int_contents.extend([3, 4])
    with pytest.raises(InvalidArgument, match=r"values in contents.int_contents; send them in"):
        decode_typed(tensor)


@pytest.mark.parametrize("name", ["sequence_id", "priority", "timeout"])
def test_a_triton_feature_this_server_lacks_is_refused_naming_it(name):
    with pytest.raises(InvalidArgument, match=f"request parameter\\(s\\) {name}: this server"):
        check_request_parameters({name: 1, "maas-routing-key": "u1"})


def test_an_unknown_datatype_is_refused_listing_bytes_among_the_accepted():
    with pytest.raises(InvalidArgument, match=r"use one of BOOL, .* FP64 or BYTES"):
        decode_typed(Input(name="text", datatype="STRING", shape=[1]))
