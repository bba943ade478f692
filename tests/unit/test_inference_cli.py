"""`maas predict` input handling: .npy floats and JSON become FP32 rows, other .npy keep their
dtype."""

import json

import numpy as np
import pytest

from maas.cli_predict import datatype_of, dtype_of, read_input
from maas.errors import InvalidArgument


def test_an_npy_file_of_whole_numbers_keeps_its_dtype_and_shape(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.int64).reshape(2, 3))
    got = read_input(str(tmp_path / "x.npy"))
    assert got.dtype == np.int64 and got.shape == (2, 3)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_an_npy_file_of_floats_is_sent_as_fp32_the_models_datatype(tmp_path, dtype):
    x = np.arange(6, dtype=dtype).reshape(2, 3) / 4  # numpy saves float64 unless told
    np.save(tmp_path / "x.npy", x)
    got = read_input(str(tmp_path / "x.npy"))
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, x.astype(np.float32))


def test_json_inline_or_in_a_file_becomes_fp32_rows(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([[1, 2], [3, 4]]))
    assert read_input(str(tmp_path / "x.json")).dtype == np.float32
    np.testing.assert_array_equal(read_input("[[1, 2], [3, 4]]"), [[1, 2], [3, 4]])


def test_a_single_row_gets_a_batch_dimension():
    assert read_input("[0.5, 1.5, 2.5]").shape == (1, 3)


@pytest.mark.parametrize("spec", ["not json", "7", '{"a": 1}', "missing.npy"])
def test_unreadable_inputs_are_refused_with_what_is_accepted(spec):
    with pytest.raises(InvalidArgument, match="--input"):
        read_input(spec)


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        ("float32", "FP32"),
        ("float16", "FP16"),
        ("float64", "FP64"),
        ("int8", "INT8"),
        ("uint64", "UINT64"),
        ("bool", "BOOL"),
    ],
)
def test_numpy_dtypes_map_to_protocol_datatypes_and_back(dtype, datatype):
    assert datatype_of(np.dtype(dtype)) == datatype
    assert dtype_of(datatype) == np.dtype(dtype)


def test_dtypes_without_a_protocol_datatype_are_refused():
    with pytest.raises(InvalidArgument, match="complex64"):
        datatype_of(np.dtype("complex64"))


@pytest.mark.parametrize(
    ("name", "complaint"), [("x.json", "holds over"), ("x.npy", "not a readable .npy")]
)
def test_an_input_linked_to_an_endless_device_is_refused_without_filling_memory(
    tmp_path, name, complaint
):
    path = tmp_path / name
    path.symlink_to("/dev/zero")
    with pytest.raises(InvalidArgument, match=f"--input .*{complaint}"):
        read_input(str(path))
