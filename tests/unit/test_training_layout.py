"""Flat parameter layout and how shards split it."""

from __future__ import annotations

import numpy as np
import pytest

from maas.errors import InvalidArgument
from maas.training.layout import FlatLayout, ParamPartition, horizontal, partition, vertical

MLP_SHAPES = [
    ("body.0.weight", [128, 64]),
    ("body.0.bias", [128]),
    ("body.2.weight", [64, 128]),
    ("body.2.bias", [64]),
    ("head.weight", [10, 64]),
    ("head.bias", [10]),
]


@pytest.fixture
def layout() -> FlatLayout:
    return FlatLayout.from_shapes(MLP_SHAPES)


def _covered(parts: list[ParamPartition]) -> np.ndarray:
    hits = np.zeros(max(b for p in parts for _, b in p.ranges), dtype=int)
    for p in parts:
        for a, b in p.ranges:
            hits[a:b] += 1
    return hits


def test_layout_places_tensors_back_to_back(layout: FlatLayout) -> None:
    assert [s.offset for s in layout.specs] == [0, 8192, 8320, 16512, 16576, 17216]
    assert layout.size == 17226


def test_flatten_then_unflatten_gives_the_same_tensors(layout: FlatLayout) -> None:
    rng = np.random.default_rng(0)
    tensors = {n: rng.normal(size=s).astype(np.float32) for n, s in MLP_SHAPES}
    back = layout.unflatten(layout.flatten(tensors))
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def test_flatten_names_a_tensor_of_the_wrong_shape(layout: FlatLayout) -> None:
    tensors = {n: np.zeros(s, dtype=np.float32) for n, s in MLP_SHAPES}
    tensors["head.bias"] = np.zeros(11, dtype=np.float32)
    with pytest.raises(InvalidArgument, match="head.bias"):
        layout.flatten(tensors)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
def test_horizontal_ranges_cover_every_parameter_once_and_are_balanced(
    layout: FlatLayout, shards: int
) -> None:
    parts = horizontal(layout, shards)
    assert (_covered(parts) == 1).all() and len(_covered(parts)) == layout.size
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_vertical_keeps_each_layer_whole_on_one_shard(layout: FlatLayout) -> None:
    parts = vertical(layout, 2)
    assert (_covered(parts) == 1).all()
    for spec in layout.specs:
        owners = [p.shard for p in parts for a, b in p.ranges if a <= spec.offset < b]
        partner = [s for s in layout.specs if s.layer == spec.layer]
        for other in partner:
            assert [p.shard for p in parts for a, b in p.ranges if a <= other.offset < b] == owners


def test_vertical_balances_by_size_largest_first(layout: FlatLayout) -> None:
    parts = vertical(layout, 2)
    # body.0 (8320) and body.2 (8256) are the two big layers: one each, head joins the lighter.
    assert sorted(p.size for p in parts) == [8320, 8256 + 650]


def test_vertical_refuses_more_shards_than_layers(layout: FlatLayout) -> None:
    with pytest.raises(InvalidArgument, match="split 'horizontal'"):
        vertical(layout, 4)


def test_unknown_split_names_the_field(layout: FlatLayout) -> None:
    with pytest.raises(InvalidArgument, match=r"training.split='diagonal'"):
        partition(layout, 2, "diagonal")


def test_gather_and_scatter_round_trip_a_multi_range_partition(layout: FlatLayout) -> None:
    flat = np.arange(layout.size, dtype=np.float32)
    part = ParamPartition(0, ((0, 10), (100, 150), (17000, 17226)))
    values = part.gather(flat)
    out = np.zeros_like(flat)
    part.scatter(values, out)
    for a, b in part.ranges:
        np.testing.assert_array_equal(out[a:b], flat[a:b])


def test_partition_and_layout_survive_json(layout: FlatLayout) -> None:
    part = vertical(layout, 2)[0]
    assert ParamPartition.from_json(part.to_json()) == part
    assert FlatLayout.from_json(layout.to_json()) == layout
