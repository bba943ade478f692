"""Model policies (maas.policy): the document's checks, and each promotion rule."""

import pytest

from maas.errors import InvalidArgument
from maas.policy import Candidate, Promote, choose, parse_policy

PLAN = {"compress": {"methods": [{"quantize": {"dtype": "int8"}}]}}
PARENT = Candidate(3, "train", 1000, {"accuracy": 0.962, "latency_b1_ms": 0.30})
INT8 = Candidate(5, "int8", 300, {"accuracy": 0.958, "latency_b1_ms": 0.20})
PRUNED = Candidate(6, "sparse", 200, {"accuracy": 0.930, "latency_b1_ms": 0.25})
STUDENT = Candidate(7, "distill", 250, {"accuracy": 0.965, "latency_b1_ms": 0.10})


def promote(rule: str, **fields) -> Promote:
    return parse_policy({"promote": {"alias": "production", "rule": rule, **fields}}).promote


def test_a_full_policy_reads_back_from_its_document_unchanged():
    doc = {
        "on_registered": PLAN,
        "promote": {
            "alias": "production",
            "rule": "smallest_within",
            "within": 0.02,
            "require": {"accuracy": 0.9},
        },
    }
    policy = parse_policy(doc)
    assert policy.compress_methods == ({"quantize": {"dtype": "int8"}},)
    assert policy.promote == Promote("production", "smallest_within", 0.02, 0.9)
    assert parse_policy(policy.to_doc()) == policy


@pytest.mark.parametrize(
    ("doc", "names"),
    [
        ({"promot": {}}, "policy.promot"),
        ({"on_registered": {"compress": {"methods": [{"quantize": {"dtype": "int9"}}]}}},
         "on_registered.compress.methods.0.quantize.dtype"),
        ({"on_registered": {"compress": {"methods": [{"quantise": {}}]}}}, "'quantize'"),
        ({"on_registered": {}}, "on_registered needs compress"),
        ({"promote": {"rule": "best_accuracy"}}, "promote.alias is required"),
        ({"promote": {"alias": "Prod!", "rule": "best_accuracy"}}, "promote.alias"),
        ({"promote": {"alias": "production", "rule": "newest"}}, "smallest_within, best_accuracy"),
        ({"promote": {"alias": "production", "rule": "best_accuracy", "within": 0.1}},
         "promote.within only applies"),
        ({"promote": {"alias": "production", "rule": "lowest_p50", "require": {"accuracy": 1.5}}},
         "promote.require.accuracy 1.5"),
        ({"promote": {"alias": "production", "rule": "lowest_p50", "require": {"loss": 1}}},
         "promote.require.loss"),
        ("just text", "policy must be a map"),
    ],
)  # fmt: skip
def test_a_wrong_policy_is_refused_naming_the_field_and_what_is_accepted(doc, names):
    with pytest.raises(InvalidArgument) as refused:
        parse_policy(doc)
    assert names in refused.value.message


def test_smallest_within_picks_the_smallest_variant_close_enough_to_the_parent():
    decision = choose(promote("smallest_within", within=0.01), PARENT, [INT8, PRUNED])
    assert decision.version == 5
    assert decision.reason == "smallest within 1.0 point of v3's 0.962: v5 int8 0.958"


def test_smallest_within_keeps_the_parent_when_every_variant_lost_too_much():
    decision = choose(promote("smallest_within", within=0.001), PARENT, [INT8, PRUNED])
    assert decision.version == 3


def test_best_accuracy_picks_the_most_accurate_candidate():
    decision = choose(promote("best_accuracy"), PARENT, [INT8, STUDENT])
    assert (decision.version, decision.reason) == (7, "best accuracy: v7 distill 0.965")


def test_best_accuracy_breaks_a_tie_by_size():
    twin = Candidate(8, "int8", 100, {"accuracy": 0.962})
    assert choose(promote("best_accuracy"), PARENT, [twin]).version == 8


def test_lowest_p50_picks_the_fastest_and_says_its_latency():
    decision = choose(promote("lowest_p50"), PARENT, [INT8, PRUNED, STUDENT])
    assert decision.version == 7
    assert decision.reason.endswith("v7 distill 0.100")


def test_require_removes_candidates_below_the_floor_before_the_rule():
    decision = choose(promote("lowest_p50", require={"accuracy": 0.96}), PARENT, [INT8, PRUNED])
    assert decision.version == 3  # the fastest (v5, v6) are below 0.96


def test_nothing_is_promoted_when_no_candidate_meets_the_requirement():
    decision = choose(promote("best_accuracy", require={"accuracy": 0.99}), PARENT, [INT8])
    assert decision.version is None
    assert "require.accuracy >= 0.990" in decision.reason


def test_a_candidate_without_a_measured_accuracy_is_never_smallest_within():
    unmeasured = Candidate(9, "int8", 10, {})
    assert choose(promote("smallest_within"), PARENT, [unmeasured]).version == 3


def test_the_empty_document_is_the_cleared_policy_that_does_nothing():
    policy = parse_policy({})
    assert policy.cleared and policy.to_doc() == {}
    assert not parse_policy({"promote": {"alias": "production", "rule": "best_accuracy"}}).cleared
