"""Model zoo determinism, the sequential arch, and the builtin datasets."""

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from maas import datasets, zoo
from maas.errors import InvalidArgument


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_same_arch_config_and_seed_build_identical_weights(arch):
    a, b = zoo.build(arch, {}, seed=3), zoo.build(arch, {}, seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_another_seed_builds_other_weights(arch):
    a, b = zoo.build(arch, {}, seed=3), zoo.build(arch, {}, seed=4)
    weights = [name for name, _ in a.named_parameters() if name.endswith("weight")]
    differ = [n for n in weights if not torch.equal(a.state_dict()[n], b.state_dict()[n])]
    assert differ == weights


def test_building_does_not_disturb_the_callers_rng():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    zoo.build("mlp", {})
    assert torch.equal(torch.rand(1), expected)


def test_cnn_has_two_3x3_convs_1_32_64_and_a_head():
    model = zoo.build("cnn", {})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (3, 3)),
        (32, 64, (3, 3)),
    ]
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_unknown_arch_lists_the_zoo():
    with pytest.raises(InvalidArgument, match="accepted: .*cnn, .*mlp, sequential"):
        zoo.build("transformer", {})


def test_a_mistyped_arch_gets_a_suggestion():
    with pytest.raises(InvalidArgument, match="did you mean 'sequential'"):
        zoo.build("seqential", {})


def test_unknown_config_key_is_named():
    with pytest.raises(InvalidArgument, match="widht"):
        zoo.build("mlp", {"widht": 3})


@pytest.mark.parametrize(
    ("arch", "config", "named"),
    [
        ("mlp", {"hidden": [0]}, r"model.config.hidden=\(0,\): sizes must be at least 1"),
        ("mlp", {"num_classes": 0}, "model.config.num_classes=0: sizes must be at least 1"),
        ("cnn", {"channels": [8, 0]}, r"model.config.channels=\(8, 0\): sizes must be"),
    ],
)
def test_a_layer_of_size_zero_is_refused_naming_it(arch, config, named):
    # hidden: [0] trained into a model that answers the same for every input
    with pytest.raises(InvalidArgument, match=named):
        zoo.parse_config(arch, config)


def rows(x: np.ndarray, y: np.ndarray) -> Counter:
    """The (features, label) rows of a dataset, counted (digits holds some identical images)."""
    return Counter(zip((r.tobytes() for r in x), y.tolist(), strict=True))


def all_digits() -> tuple[np.ndarray, np.ndarray]:
    _task, make = datasets.BUILTINS["digits"]
    return make()


def test_digits_split_is_fixed_and_disjoint():
    a, b = datasets.load_builtin("digits"), datasets.load_builtin("digits")
    assert np.array_equal(a.x_test, b.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.num_classes == 10
    # Every row of the data set is on exactly one side: none shared, none lost.
    assert rows(a.x_train, a.y_train) + rows(a.x_test, a.y_test) == rows(*all_digits())


def test_digit_halves_are_relabelled_to_five_classes():
    upper = datasets.load_builtin("digits-5-9")
    assert set(np.unique(upper.y_train)) == {0, 1, 2, 3, 4}
    x, y = all_digits()
    five_to_nine = rows(x[y >= 5], y[y >= 5] - 5)  # image of a 7 -> class 2
    assert rows(upper.x_train, upper.y_train) + rows(upper.x_test, upper.y_test) == five_to_nine


def test_worker_shards_partition_the_training_rows():
    data = datasets.load_builtin("digits")
    sizes = [len(data.shard(i, 3)[0]) for i in range(3)]
    assert sum(sizes) == len(data.x_train)
    assert max(sizes) - min(sizes) <= 1


def test_npz_without_labels_is_refused_with_what_it_has():
    import io

    buf = io.BytesIO()
    np.savez(buf, X=np.zeros((4, 2)))
    with pytest.raises(InvalidArgument, match=r"'X' and 'y'.*\['X'\]"):
        datasets.from_npz("s3://b/k.npz", buf.getvalue())


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


X20 = np.zeros((20, 3), np.float32)


@pytest.mark.parametrize(
    ("arrays", "complaint"),
    [
        ({"X": np.full((20, 3), np.nan), "y": np.zeros(20, int)}, "X holds NaN or infinite"),
        ({"X": X20, "y": np.full(20, np.inf)}, "y holds NaN or infinite"),
        ({"X": X20.astype(complex), "y": np.zeros(20, int)}, "X has dtype complex128"),
        ({"X": np.array([["a"] * 3] * 20), "y": np.zeros(20, int)}, "X has dtype <U1"),
        ({"X": X20, "y": np.full(20, 2**64 - 1, np.uint64)}, "labels must be below"),
        ({"X": X20, "y": np.zeros((20, 2), int)}, "one integer >= 0 per row"),
        ({"X": X20[:2], "y": np.zeros(2, int)}, "at least 10 rows"),
        ({"X": X20, "y": np.array(3)}, r"one row per label.* y\(\)"),
        ({"X": np.full((20, 3), 1e300), "y": np.zeros(20, int)}, "beyond float32's range"),
        ({"X": np.zeros((20, 0)), "y": np.zeros(20, int)}, r"at least one feature .* X\(20, 0\)"),
        ({"X": X20, "y": np.zeros((20, 0))}, r"at least one feature .* y\(20, 0\)"),
    ],
    ids=[
        "nan-x",
        "inf-y",
        "complex",
        "text",
        "uint64-label",
        "2d-labels",
        "two-rows",
        "0d-labels",
        "past-float32",
        "no-features",
        "no-targets",
    ],
)
def test_a_dataset_that_cannot_train_soundly_is_refused_saying_why(arrays, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        datasets.from_npz("s3://b/k.npz", _npz(**arrays))


@pytest.mark.parametrize("data", [b"\x80\x04 random bytes", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_an_npz_is_refused_without_numpys_pickle_advice(data: bytes):
    with pytest.raises(InvalidArgument, match="not a readable .npz") as caught:
        datasets.from_npz("s3://b/k.npz", data)
    assert "allow_pickle" not in caught.value.message


def _flagged_encrypted(npz: bytes) -> bytes:
    """``npz`` with each member's "encrypted" flag bit set (in its local and central headers)."""
    data = bytearray(npz)
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start != -1:
            data[start + flags_at] |= 0x01
            start = data.find(signature, start + 4)
    return bytes(data)


def _compression_method(npz: bytes, method: int) -> bytes:
    """``npz`` with each member's compression method set to ``method`` (99: AES, unknown here)."""
    data = bytearray(npz)
    for signature, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        start = data.find(signature)
        while start != -1:
            data[start + method_at : start + method_at + 2] = method.to_bytes(2, "little")
            start = data.find(signature, start + 4)
    return bytes(data)


@pytest.mark.parametrize("damage", [_flagged_encrypted, lambda d: _compression_method(d, 99)])
def test_an_npz_zipfile_cannot_open_is_refused_as_unreadable(damage):
    npz = _npz(X=X20, y=np.zeros(20, int))
    with pytest.raises(InvalidArgument, match="not a readable .npz .* unencrypted"):
        datasets.from_npz("s3://b/k.npz", damage(npz))


def test_true_false_labels_are_the_classes_0_and_1():
    y = np.arange(20) % 2 == 1
    dataset = datasets.from_npz("s3://b/k.npz", _npz(X=X20, y=y))
    assert dataset.task == "classification" and dataset.num_classes == 2


def test_a_dataset_that_unpacks_past_the_limit_is_refused_before_it_is_read():
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, X=np.zeros((1 << 20, 8), np.float32), y=np.zeros(1 << 20, int))
    packed = buf.getvalue()
    assert len(packed) < 100_000  # 40 MB of zeros packs to tens of kilobytes
    datasets.check_size("bomb.npz", packed, limit=64 << 20)
    with pytest.raises(InvalidArgument, match=r"holds 41943\d+ bytes .*MAAS_MAX_DATASET_BYTES"):
        datasets.check_size("bomb.npz", packed, limit=1 << 20)


def test_an_array_whose_header_promises_more_than_its_bytes_is_refused_unallocated():
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 8)}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("X.npy", header.getvalue() + b"\0" * 64)  # 8 TB declared, 64 B held
        archive.writestr("y.npy", header.getvalue())
    with pytest.raises(InvalidArgument, match=r"X.npy's header says shape \(1000000000000, 8\)"):
        datasets.from_npz("s3://b/k.npz", buf.getvalue())


# --- the sequential arch --------------------------------------------------------------------

SEED_NET = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "stride": 1},
        "relu",
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "stride": 1},
        "relu",
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "dropout", "p": 0.25},
        "flatten",
        {"type": "linear", "out_features": 128},
        "relu",
        {"type": "dropout", "p": 0.5},
    ],
    "num_classes": 10,
}


def test_sequential_builds_the_layers_it_is_given_with_inferred_sizes_and_a_head():
    model = zoo.build("sequential", SEED_NET)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    assert (model.head.in_features, model.head.out_features) == (128, 10)
    assert model.body[7].in_features == 64 * 2 * 2  # 8 -> 6 -> 4 -> pooled 2
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_the_seed_example_job_is_exactly_the_seed_net():
    from maas import jobs

    job = jobs.load_job_file(Path(__file__).parents[2] / "examples/jobs/seed-convnet-mse.yaml")
    assert job["model"]["config"] == SEED_NET
    assert job["training"]["loss"] == "mse"


@pytest.mark.parametrize(
    "layer",
    [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "avgpool2d", "kernel_size": 2, "stride": 1},
        {"type": "batchnorm"},
        {"type": "layernorm"},
        "gelu",
        "tanh",
        "sigmoid",
    ],
    ids=lambda layer: layer if isinstance(layer, str) else layer["type"],
)
def test_every_layer_type_builds_and_its_computed_shape_is_what_torch_gives(layer):
    config = {"input_shape": [2, 6, 6], "layers": [layer, "flatten"], "num_classes": 3}
    model = zoo.build("sequential", config)
    flat = model.body(torch.zeros(2, 2, 6, 6)).shape[1]
    assert model.head.in_features == flat
    assert model(torch.zeros(2, 72)).shape == (2, 3)


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("mlp", {}),
        ("mlp", {"hidden": [7, 5, 3], "in_features": 9, "num_classes": 4}),
        ("cnn", {}),
        ("cnn", {"channels": [3], "image_size": 6, "in_channels": 2}),
        ("sequential", SEED_NET),
        (
            "sequential",
            {
                "input_shape": [3, 5, 5],
                "layers": [{"type": "batchnorm"}, {"type": "layernorm"}, "flatten"],
            },
        ),
    ],
)
def test_the_counted_parameters_are_what_the_built_model_has(arch, config):
    assert zoo.parameter_count(arch, config) == zoo.count_parameters(zoo.build(arch, config))


def test_a_config_survives_its_round_trip_through_a_manifest():
    parsed = zoo.parse_config("sequential", SEED_NET)
    assert zoo.parse_config("sequential", zoo.config_to_dict(parsed)) == parsed


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [{"type": "conv2d", "out_channels": 8, "kernel_size": 9}],
            r"layers\[0\] \(conv2d\) kernel_size=9 does not fit",
        ),
        (
            [{"type": "conv2d", "out_channels": 8, "kernel_sise": 3}],
            r"layers\[0\]\.kernel_sise: unknown key; did you mean 'kernel_size'",
        ),
        (["flatten", "rleu"], r"layers\[1\]\.type='rleu' is not a layer; did you mean 'relu'"),
        (
            ["flatten", {"type": "conv2d", "out_channels": 2, "kernel_size": 1}],
            r"layers\[1\] \(conv2d\) needs an image input",
        ),
        (
            [{"type": "linear", "out_features": 3}],
            r"layers\[0\] \(linear\) needs a vector input .* flatten",
        ),
        (["relu"], "end them with flatten"),
        ([{"type": "dropout", "p": 1.5}, "flatten"], r"layers\[0\]\.p=1\.5 must be < 1"),
        ([{"type": "conv2d", "kernel_size": 3}], r"layers\[0\] \(conv2d\) needs out_channels"),
        ([{"type": "maxpool2d", "kernel_size": 2, "padding": 2}, "flatten"], "at most half"),
        (
            [{"type": "conv2d", "out_channels": 8, "kernel_size": 1, "padding": 1000}, "flatten"],
            r"layers\[0\] \(conv2d\) outputs shape \(8, 2008, 2008\), 32256512 values a row",
        ),
    ],
)
def test_a_bad_layer_is_refused_naming_its_index_and_field(layers, message):
    with pytest.raises(InvalidArgument, match=message):
        zoo.parse_config("sequential", {"input_shape": [1, 8, 8], "layers": layers})


def test_a_sequential_config_needs_its_input_shape():
    with pytest.raises(InvalidArgument, match="input_shape"):
        zoo.parse_config("sequential", {"layers": ["flatten"]})


def test_a_model_too_large_is_refused_by_counting_not_allocating():
    with pytest.raises(InvalidArgument, match=r"model\.config\.hidden\[0\]: .*7,500,000,000,010"):
        zoo.check_size("mlp", {"hidden": [10**11]}, limit=10**8)


def test_a_model_too_large_by_its_many_small_layers_is_told_so_not_blamed_on_one():
    with pytest.raises(InvalidArgument) as refused:
        zoo.check_size("mlp", {"hidden": [8] * 200_000}, limit=10**6)
    message = refused.value.message
    assert message.startswith("model.config: the model would have ")
    assert "in 200,001 layers" in message and "fewer or smaller layers" in message


def test_judging_a_config_imports_no_torch():
    import subprocess
    import sys

    code = (
        f"import sys; from maas import zoo; zoo.check_size('sequential', {SEED_NET!r}, 10**8); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("arch", ["gpt", "bert", "mlp", "cnn"])
def test_a_skeleton_loads_a_built_models_weights_and_computes_the_same(arch):
    built = zoo.build(arch, {}, seed=2).eval()
    skeleton = zoo.build_skeleton(arch, {})
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    skeleton.load_state_dict(built.state_dict(), assign=True)
    if arch in ("gpt", "bert"):
        x = torch.randint(0, 200, (1, 6))
    else:
        x = torch.randn(2, *zoo.input_shape(arch, {}))
    with torch.no_grad():
        assert torch.equal(skeleton.eval()(x), built(x))


def test_building_a_skeleton_imports_no_sympy():
    # torch's checks inside an initialiser on a meta tensor import sympy: seconds on a first load.
    code = (
        "import sys; from maas import zoo; zoo.build_skeleton('gpt'); print('sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://maas-datasets/../other/x.npz",
        "s3://maas-datasets//x.npz",
        "s3://maas-datasets/./x.npz",
    ],
)
def test_a_dataset_uri_with_a_dot_or_empty_segment_is_refused(uri: str) -> None:
    from maas.config import Settings

    with pytest.raises(InvalidArgument, match="'.' or '..' path segment"):
        datasets.check_uri(uri, Settings())


@pytest.mark.parametrize(
    "uri",
    [
        "s3://maas-datasets/a\\..\\x.npz",
        "s3://maas-datasets/a\x00.npz",
        "s3://maas-datasets/a\nb.npz",
    ],
)
def test_a_dataset_uri_with_a_control_character_or_backslash_is_refused(uri: str) -> None:
    from maas.config import Settings

    with pytest.raises(InvalidArgument, match="holds a control character or a backslash"):
        datasets.check_uri(uri, Settings())


def test_an_npz_is_split_into_views_of_one_shuffled_copy_holding_every_row_once():
    # A dataset costs two copies of itself while it loads (the file's, the shuffled one), not
    # three: the splits share the shuffled array.
    x = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    y = np.arange(200) % 4
    packed = io.BytesIO()
    np.savez(packed, X=x, y=y)
    data = datasets.from_npz("t", packed.getvalue())
    assert data.x_train.base is not None and data.x_train.base is data.x_test.base
    rows = np.concatenate([data.x_test, data.x_train])
    assert sorted(rows[:, 0].tolist()) == x[:, 0].tolist()
    assert len(data.x_test) == round(200 * datasets.TEST_FRACTION)
    assert np.array_equal(data.y_train, (data.x_train[:, 0] // 3).astype(np.int64) % 4)


def test_a_blockwise_check_reaches_the_rows_of_the_last_partial_block() -> None:
    x = np.zeros((10, 3), dtype=np.float32)
    assert datasets.every_block(x, lambda rows: not rows.any(), rows_at_once=4)
    x[9, 2] = 1.0
    assert not datasets.every_block(x, lambda rows: not rows.any(), rows_at_once=4)
