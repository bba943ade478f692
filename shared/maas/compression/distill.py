"""Knowledge distillation: a zoo student learns the teacher's softened outputs.

Loss (Hinton et al., 2015), teacher logits t, student logits s, labels y:
``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) * CE(s, y)``.
The T² factor keeps the soft term's gradient scale independent of T, so ``alpha`` means the same
at any temperature. ``alpha = 0`` is plain hard-label training of the same student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maas import zoo
from maas.compression.prune import WIDTH_FIELDS
from maas.compression.train import FitConfig, LossFn, Tensors, fit, teacher_outputs
from maas.errors import InvalidArgument

# A student narrower by this factor in every hidden width has about 1/4 of the parameters or
# fewer (hidden-to-hidden weights shrink by its square).
DEFAULT_NARROWING = 4


@dataclass(frozen=True)
class Student:
    arch: str
    config: dict[str, Any]


def default_student(arch: str, config: dict[str, Any]) -> Student:
    """The teacher's arch with every hidden width divided by ``DEFAULT_NARROWING``."""
    field = WIDTH_FIELDS.get(arch)
    if field is None:
        raise InvalidArgument(f"distill.student is required for arch {arch!r}")
    parsed = zoo.config_to_dict(zoo.parse_config(arch, config))
    narrow = [max(1, int(w) // DEFAULT_NARROWING) for w in parsed[field]]
    return Student(arch, {**parsed, field: narrow})


def parse_student(spec: dict[str, Any] | None, arch: str, config: dict[str, Any]) -> Student:
    """The job's ``distill.student`` (or the default), checked to fit the teacher's data."""
    if not spec:
        return default_student(arch, config)
    unknown = sorted(set(spec) - {"arch", "config"})
    if unknown:
        raise InvalidArgument(f"distill.student has unknown keys {unknown}; use arch and config")
    student_arch = spec.get("arch", arch)
    parsed = zoo.config_to_dict(zoo.parse_config(student_arch, dict(spec.get("config") or {})))
    for what, shape in (("inputs", zoo.input_shape), ("outputs", zoo.output_shape)):
        theirs, ours = math.prod(shape(student_arch, parsed)), math.prod(shape(arch, config))
        if theirs != ours:
            raise InvalidArgument(
                f"distill.student takes {theirs} {what} but the teacher has {ours}; "
                "set its config (in_features / num_classes) to match"
            )
    theirs, ours = zoo.parameter_count(student_arch, parsed), zoo.parameter_count(arch, config)
    if theirs > ours:
        raise InvalidArgument(
            f"distill.student has {theirs} parameters, more than the teacher's {ours}: a "
            "distilled variant is a smaller model; narrow or shorten its config (or leave "
            "student out for the teacher 4x narrower)"
        )
    return Student(student_arch, parsed)


def kd_loss(
    teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> LossFn:
    """The distillation loss over training rows, with the teacher's logits computed once."""
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise InvalidArgument(
            f"distill needs temperature > 0 and 0 <= alpha <= 1; got {temperature}, {alpha}"
        )
    soft_targets = F.log_softmax(teacher_logits / temperature, dim=1)

    def loss(outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(outputs, labels[rows])
        if alpha == 0:
            return hard
        soft = F.kl_div(
            F.log_softmax(outputs / temperature, dim=1),
            soft_targets[rows],
            reduction="batchmean",
            log_target=True,
        )
        return alpha * temperature**2 * soft + (1 - alpha) * hard

    return loss


def distill(
    teacher: nn.Module,
    student: Student,
    data: Tensors,
    config: FitConfig,
    temperature: float,
    alpha: float,
) -> nn.Module:
    """Train a fresh ``student`` (seeded from ``config.seed``) on the teacher's soft targets; a
    headless encoder's student learns the teacher's embeddings of the rows instead (cosine)."""
    model = zoo.build(student.arch, student.config, seed=config.seed)
    if student.arch == "bert":  # a shallower BERT starts from the teacher's own layers
        from maas.text.compress import distill_embeddings, student_like

        model = student_like(teacher, student.config, fallback=model)
        if zoo.outputs_embeddings(student.arch, student.config):
            # Its 384 outputs scored as classes trained a student to cosine 0.13 of the teacher.
            return distill_embeddings(teacher, model, data.x_train, config)
    if data.task != "classification":
        raise InvalidArgument("distillation needs a classification dataset (soft class targets)")
    loss = kd_loss(teacher_outputs(teacher, data.x_train), data.y_train, temperature, alpha)
    return fit(model, data, config, loss)
