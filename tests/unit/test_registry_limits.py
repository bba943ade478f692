"""The registry's bounds: manifest size and metric count, int64 versions, replies by bytes."""

from __future__ import annotations

import json

import pytest

from maas.errors import InvalidArgument, ResourceExhausted
from maas.manifest import parse_manifest
from maas.names import MAX_VERSION, check_version, small_number
from maas.registry.types import ModelRef
from maas.registry.v1 import registry_pb2 as pb
from services.model_registry.servicer import fit_page
from services.model_registry.sqlite_store import SqliteStore

SHA = "0" * 64


def manifest(**extra: object) -> bytes:
    return json.dumps({"arch": "mlp", "files": {"w": SHA}, **extra}).encode()


def test_a_manifest_over_the_byte_limit_is_refused_before_parsing():
    data = manifest(settings={"pad": "x" * 2000})
    with pytest.raises(ResourceExhausted, match="MAAS_REGISTRY_MAX_MANIFEST_BYTES"):
        parse_manifest(data, max_bytes=1000)
    assert parse_manifest(data, max_bytes=len(data)).arch == "mlp"


def test_too_many_metrics_are_refused_naming_the_setting():
    data = manifest(metrics={f"m{i}": i for i in range(11)})
    with pytest.raises(
        ResourceExhausted, match="11 entries; at most 10.*MAAS_REGISTRY_MAX_METRICS"
    ):
        parse_manifest(data, max_metrics=10)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        manifest(metrics={"x": 10**400}),
        manifest(parent={"name": "a", "version": 2**63}),
        manifest(parent={"name": "a", "version": -(10**30)}),
        manifest(parent={"name": ["a"], "version": 1}),
        manifest(tensors={"w": {"dtype": "float32", "shape": [-1]}}),
        manifest(tensors=["w"]),
    ],
    ids=[
        "deep",
        "huge-metric",
        "parent-past-int64",
        "parent-negative",
        "parent-name",
        "shape",
        "list",
    ],
)
def test_hostile_manifests_are_invalid_arguments(data):
    with pytest.raises(InvalidArgument):
        parse_manifest(data)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "arrays or objects nest too deeply"),
        (
            b'{"arch": "mlp", "metrics": {"x": ' + b"9" * 5000 + b"}}",
            "it holds a whole number of more than 4 300 digits",
        ),
    ],
    ids=["deep", "5000-digits"],
)
def test_json_past_the_parsers_limits_is_refused_in_the_senders_words(data, says):
    # Python's own wording advised sys.set_int_max_str_digits(), which a caller cannot call.
    with pytest.raises(InvalidArgument) as refused:
        parse_manifest(data)
    assert refused.value.message == f"manifest_json is not JSON: {says}"


@pytest.mark.parametrize(
    "version",
    [0, -1, MAX_VERSION + 1, 10**5000, True, "3", 2.0],
    ids=["zero", "negative", "past-int64", "huge", "bool", "text", "float"],
)
def test_versions_outside_int64_or_not_integers_are_invalid(version):
    with pytest.raises(InvalidArgument, match="versions are integers from 1"):
        check_version(version)
    assert check_version(MAX_VERSION) == MAX_VERSION


def test_the_lowest_int64_is_named_as_itself_not_beyond_int64():
    with pytest.raises(InvalidArgument, match=f"version {-(2**63)} is malformed"):
        check_version(-(2**63))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("42", 42),
        ("007", 7),
        ("²", None),
        ("٣", None),
        ("-1", None),
        ("", None),
        ("9" * 5000, None),
    ],
    ids=["digits", "leading-zeros", "superscript", "arabic-indic", "sign", "empty", "huge"],
)
def test_only_ascii_digits_within_their_bound_read_as_a_number(text, number):
    assert small_number(text) == number


@pytest.mark.parametrize("token", ["99999999999999999999999", "١٢", "-1", "x"])
def test_a_page_token_this_server_never_issued_is_invalid(tmp_path, token):
    core = SqliteStore(tmp_path / "r.db")
    with pytest.raises(InvalidArgument, match="page_token"):
        core.list_versions("digits", page_token=token)


def test_a_model_name_refusal_quotes_only_the_start_of_a_huge_name():
    with pytest.raises(InvalidArgument) as caught:
        ModelRef("x/" * 500_000)
    assert len(caught.value.message) < 400


def versions(n: int, manifest_bytes: int) -> list[pb.ModelVersion]:
    return [
        pb.ModelVersion(name="m", version=v, manifest_json=b"x" * manifest_bytes)
        for v in range(n, 0, -1)
    ]


def test_a_page_is_cut_where_the_reply_would_pass_the_byte_limit():
    page = versions(10, 1000)
    kept, token = fit_page(page, "", lambda kept: str(page[kept - 1].version), 3500)
    assert [v.version for v in kept] == [10, 9, 8]
    assert token == "8"  # the next page starts below version 8
    assert sum(v.ByteSize() + 8 for v in kept) <= 3500


def test_a_page_that_fits_keeps_its_own_token():
    page = versions(3, 10)
    assert fit_page(page, "next", lambda kept: "cut", 1 << 20) == (page, "next")


def test_one_item_is_sent_even_when_alone_it_passes_the_limit():
    page = versions(2, 5000)
    kept, token = fit_page(page, "", lambda kept: str(page[kept - 1].version), 100)
    assert len(kept) == 1 and token == "2"
