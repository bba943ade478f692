"""Model zoo determinism and the builtin datasets."""

import numpy as np
import pytest
import torch

from maas import datasets, zoo
from maas.errors import InvalidArgument


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_same_arch_config_and_seed_build_identical_weights(arch):
    a, b = zoo.build(arch, {}), zoo.build(arch, {})
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


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
    with pytest.raises(InvalidArgument, match="cnn, mlp"):
        zoo.build("transformer", {})


def test_unknown_config_key_is_named():
    with pytest.raises(InvalidArgument, match="widht"):
        zoo.build("mlp", {"widht": 3})


def test_digits_split_is_fixed_and_disjoint():
    a, b = datasets.load_builtin("digits"), datasets.load_builtin("digits")
    assert np.array_equal(a.x_test, b.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.num_classes == 10


def test_digit_halves_are_relabelled_to_five_classes():
    upper = datasets.load_builtin("digits-5-9")
    assert set(np.unique(upper.y_train)) == {0, 1, 2, 3, 4}


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
