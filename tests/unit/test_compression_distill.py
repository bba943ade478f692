"""Knowledge distillation: a 4x narrower student learns from the teacher's soft targets."""

import pytest
import torch

from maas import artifacts, zoo
from maas.compression.distill import default_student, kd_loss, parse_student
from maas.compression.measure import artifact_metrics
from maas.compression.pipeline import check_fits, parent_variant, parse_method, run
from maas.compression.train import FitConfig, Tensors, evaluate
from maas.datasets import load_builtin
from maas.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher(trained_mlp):
    return trained_mlp


def distilled(teacher, digits, **settings):
    return run(
        parse_method({"distill": settings}),
        parent_variant(teacher, "mlp", {}),
        digits,
        FitConfig(0),
    )


def test_the_default_student_is_the_teacher_four_times_narrower():
    student = default_student("mlp", {"hidden": [128, 64]})
    assert student.config["hidden"] == [32, 16]
    assert zoo.count_parameters(zoo.build("mlp", student.config)) <= 0.25 * zoo.count_parameters(
        zoo.build("mlp", {})
    )


def test_a_named_student_with_a_bad_config_key_is_refused():
    with pytest.raises(InvalidArgument, match="widths"):
        parse_student({"arch": "mlp", "config": {"widths": [8]}}, "mlp", {})


def test_alpha_zero_is_plain_cross_entropy_on_hard_labels():
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    student = torch.randn(8, 10)
    loss = kd_loss(logits, labels, temperature=4.0, alpha=0.0)(student, torch.arange(8))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(student, labels))


def test_the_soft_term_vanishes_when_the_student_matches_the_teacher():
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = kd_loss(logits, labels, temperature=4.0, alpha=1.0)(logits.clone(), torch.arange(8))
    assert loss.abs() < 1e-6


def test_student_with_a_quarter_of_the_params_keeps_97_percent_and_beats_hard_labels(
    teacher, digits
):
    teacher_accuracy = evaluate(teacher, digits)["accuracy"]
    student = distilled(teacher, digits)
    hard_only = distilled(teacher, digits, alpha=0.0)
    files, manifest = artifacts.pack(student.model, student.arch, student.config)
    student_accuracy = artifact_metrics(manifest, files, digits, latency_repeats=0)["accuracy"]
    assert zoo.count_parameters(student.model) <= 0.25 * zoo.count_parameters(teacher)
    assert student_accuracy >= 0.97 * teacher_accuracy
    assert student_accuracy > evaluate(hard_only.model, digits)["accuracy"]


def test_distilling_for_regression_is_refused():
    regression = Tensors.of(load_builtin("regression"))
    model = zoo.build("mlp", {"in_features": 16, "num_classes": 1})
    with pytest.raises(InvalidArgument, match="classification"):
        run(
            parse_method({"distill": {"steps": 1}}),
            parent_variant(model, "mlp", {"in_features": 16, "num_classes": 1}),
            regression,
            FitConfig(0),
        )


def test_a_student_that_does_not_fit_the_teachers_data_is_refused():
    with pytest.raises(InvalidArgument, match="in_features"):
        parse_student({"arch": "mlp", "config": {"in_features": 32}}, "mlp", {})


def test_a_student_of_another_arch_is_accepted_when_it_fits():
    student = parse_student({"arch": "cnn", "config": {"channels": [8, 8]}}, "mlp", {})
    assert (student.arch, student.config["channels"]) == ("cnn", [8, 8])


def test_a_student_larger_than_its_teacher_is_refused_naming_both_sizes():
    teacher = {"hidden": [16], "num_classes": 10}
    with pytest.raises(InvalidArgument, match=r"student has 4\d{6} parameters, more than .* 1210"):
        parse_student({"config": {"hidden": [2048, 2048]}}, "mlp", teacher)


def test_a_teacher_that_predicts_a_class_at_each_position_is_refused_before_any_variant():
    gpt = {"block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 8}
    with pytest.raises(InvalidArgument, match="gpt predicts one at each position"):
        check_fits(parse_method({"distill": {"steps": 1}}), "gpt", gpt, "classification")
