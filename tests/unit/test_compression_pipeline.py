"""Compress job methods: parsed and checked before any work, named for lineage."""

import pytest
import torch

from maas import zoo
from maas.compression.pipeline import (
    Distill,
    Prune,
    Quantize,
    parent_variant,
    parse_method,
    parse_methods,
    run,
)
from maas.compression.train import FitConfig, Stopped, Tensors
from maas.datasets import load_builtin
from maas.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_single_method_is_named_by_itself_with_its_settings():
    plan = parse_method({"prune": {"sparsity": 0.8, "recovery_steps": 100}})
    assert plan.steps == (Prune(sparsity=0.8, structured=False, recovery_steps=100),)
    assert plan.method == "prune"
    assert plan.settings() == {"sparsity": 0.8, "structured": False, "recovery_steps": 100}


def test_a_chain_is_named_by_its_methods_in_order():
    plan = parse_method({"chain": [{"prune": {"sparsity": 0.8}}, {"quantize": {"dtype": "int8"}}]})
    assert plan.method == "prune+quantize"
    assert [step["method"] for step in plan.settings()["chain"]] == ["prune", "quantize"]


def test_defaults_fill_what_the_job_leaves_out():
    assert parse_method({"quantize": {}}).steps == (Quantize("int8"),)
    assert parse_method({"distill": {}}).steps == (Distill(),)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"quantize": {}, "prune": {}}, "exactly one"),
        ({"sharpen": {}}, "unknown"),
        ({"prune": {"sparsity": 0.5, "amount": 3}}, "amount"),
        ({"chain": []}, "non-empty"),
        ({"chain": [{"chain": [{"quantize": {}}]}]}, "do not nest"),
        ({"chain": [{"quantize": {}}, {"prune": {}}]}, "last"),
        ({"distill": {"steps": 0}}, "steps"),
        ({"prune": {"recovery_steps": -1}}, "recovery_steps"),
        ({"prune": {"recovery_steps": 10**30}}, "recovery_steps=.* to 100000000"),
        ({"distill": {"temperature": float("inf")}}, "distill.temperature=inf"),
        ({"distill": {"temperature": 0}}, "distill.temperature=0"),
        ({"distill": {"alpha": 1.5}}, "distill.alpha=1.5"),
    ],
)
def test_a_bad_method_is_refused_with_a_message_naming_the_problem(item, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_method(item)


def test_a_job_without_methods_is_refused():
    with pytest.raises(InvalidArgument, match="at least one"):
        parse_methods([])


def test_running_a_plan_leaves_the_parent_untouched():
    data = Tensors.of(load_builtin("digits"))
    model = zoo.build("mlp", {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(
        parse_method({"prune": {"sparsity": 0.9, "recovery_steps": 5}}),
        parent_variant(model, "mlp", {}),
        data,
        FitConfig(0),
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "method",
    [{"distill": {"steps": 10_000}}, {"prune": {"sparsity": 0.5, "recovery_steps": 10_000}}],
)
def test_a_methods_training_stops_at_the_step_its_stop_check_says(method):
    asked = []

    def stop() -> bool:
        asked.append(True)
        return len(asked) > 3

    with pytest.raises(Stopped, match="after 3 of 10000 steps"):
        run(
            parse_method(method),
            parent_variant(zoo.build("mlp", {}), "mlp", {}),
            Tensors.of(load_builtin("digits")),
            FitConfig(0, stop=stop),
        )


def test_the_same_variant_twice_in_one_job_is_refused_naming_both():
    methods = [{"quantize": {"dtype": "int8"}}, {"prune": {}}, {"quantize": {}}]
    with pytest.raises(
        InvalidArgument, match=r"compress\.methods\[2\] repeats compress\.methods\[0\]"
    ):
        parse_methods(methods)
