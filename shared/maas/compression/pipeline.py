"""A compress job's methods as typed plans, run on a parent model into stored variants.

One job item is one variant: ``{"quantize": {...}}``, ``{"prune": {...}}``, ``{"distill": {...}}``
or ``{"chain": [item, ...]}`` (e.g. prune 80 % then int8). Every plan is parsed and checked
before any work starts, so a bad item fails the job with a message instead of half its variants.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from maas import zoo
from maas.compression import distill as kd
from maas.compression import formats, prune, quant
from maas.compression.train import FitConfig, Tensors, fit
from maas.datasets import Dataset
from maas.errors import InvalidArgument
from maas.events import shown
from maas.training.plan import MAX_STEPS


@dataclass(frozen=True)
class Quantize:
    dtype: str = "int8"

    def __post_init__(self) -> None:
        quant.check_dtype(self.dtype)


@dataclass(frozen=True)
class Prune:
    sparsity: float = 0.5
    structured: bool = False
    recovery_steps: int = 0

    def __post_init__(self) -> None:
        prune.check_sparsity(self.sparsity)
        _check_count("prune.recovery_steps", self.recovery_steps, least=0)


@dataclass(frozen=True)
class Distill:
    student: dict[str, Any] | None = None  # {arch, config}; default: the teacher 4x narrower
    # Soft targets pay off once the student has converged (measured on digits: at 3000 steps
    # they beat hard labels at every T in 2..8; at 600 steps both are still undertrained).
    steps: int = 3000
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        _check_count("distill.steps", self.steps, least=1)
        if not _is_number(self.temperature) or not 0 < self.temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(
                f"distill.temperature={shown(self.temperature)} must be a number in "
                f"(0, {MAX_TEMPERATURE}]"
            )
        if not _is_number(self.alpha) or not 0 <= self.alpha <= 1:
            raise InvalidArgument(f"distill.alpha={shown(self.alpha)} must be a number in [0, 1]")


MAX_TEMPERATURE = 100.0  # softmax at T=100 is flat to float32 for any sane logits


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_count(field: str, value: object, *, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_STEPS:
        raise InvalidArgument(
            f"{field}={shown(value)} must be an integer from {least} to {MAX_STEPS}"
        )


Step = Quantize | Prune | Distill
STEP_TYPES: dict[str, type[Step]] = {"quantize": Quantize, "prune": Prune, "distill": Distill}


@dataclass(frozen=True)
class Plan:
    """The steps of one variant, in order."""

    steps: tuple[Step, ...]

    @property
    def method(self) -> str:
        """Lineage method: ``quantize``, ``prune``, ... or ``prune+quantize`` for a chain."""
        return "+".join(_name(step) for step in self.steps)

    def settings(self) -> dict[str, Any]:
        described = [{"method": _name(step), **asdict(step)} for step in self.steps]
        if len(described) == 1:
            return {k: v for k, v in described[0].items() if k != "method"}
        return {"chain": described}


def _name(step: Step) -> str:
    return next(name for name, cls in STEP_TYPES.items() if isinstance(step, cls))


def _parse_step(kind: str, raw: Any) -> Step:
    cls = STEP_TYPES.get(kind)
    if cls is None:
        raise InvalidArgument(
            f"compress method {kind!r} is unknown; use one of {[*STEP_TYPES, 'chain']}"
        )
    options = dict(raw or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgument(f"{kind} has unknown settings {unknown}; known: {sorted(known)}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise InvalidArgument(f"{kind} settings are invalid: {exc}") from None


def _single_key(item: Mapping[str, Any]) -> tuple[str, Any]:
    if not isinstance(item, Mapping) or len(item) != 1:
        raise InvalidArgument(
            f"each compress method is a map with exactly one of {[*STEP_TYPES, 'chain']}; "
            f"got {item!r}"
        )
    return next(iter(item.items()))


def parse_method(item: Mapping[str, Any]) -> Plan:
    """One ``compress.methods`` item -> a checked Plan."""
    kind, raw = _single_key(item)
    if kind == "chain":
        if not isinstance(raw, Sequence) or not raw:
            raise InvalidArgument("chain must be a non-empty list of methods")
        subs = [_single_key(sub) for sub in raw]
        if any(kind == "chain" for kind, _ in subs):
            raise InvalidArgument("chains do not nest; list every method in one chain")
        steps = tuple(_parse_step(kind, options) for kind, options in subs)
    else:
        steps = (_parse_step(kind, raw),)
    _check_order(steps)
    return Plan(steps)


def _check_order(steps: tuple[Step, ...]) -> None:
    for i, step in enumerate(steps):
        if isinstance(step, Quantize) and i != len(steps) - 1:
            raise InvalidArgument("quantize must be the last method of a chain (it fixes storage)")
        if (
            isinstance(step, Prune)
            and step.structured
            and any(isinstance(s, Prune) and not s.structured for s in steps[:i])
        ):
            raise InvalidArgument(
                "structured pruning cannot follow unstructured pruning (the masks would be "
                "lost); put the structured prune first"
            )


def check_fits(plan: Plan, arch: str, config: Mapping[str, Any], task: str | None) -> None:
    """What the plan's steps need of the model they start from and of the ``task`` of the
    dataset (classification, regression), checked before any variant of the job is built (a
    job whose third method cannot run must not register its first two; None: not known yet, as
    in a dry run on an S3 dataset): a distill's teacher
    scores one class a row and its student fits the teacher's inputs and outputs (or the arch
    has a default student), a structured prune knows the arch."""
    config = dict(config)
    for step in plan.steps:
        if isinstance(step, Prune) and step.structured:
            prune.check_structured(arch)
        elif isinstance(step, Distill):
            _check_teacher(arch, config, task)
            student = kd.parse_student(step.student, arch, config)
            arch, config = student.arch, student.config


def check_method(
    index: int, plan: Plan, arch: str, config: Mapping[str, Any], task: str | None, base: str
) -> None:
    """``check_fits`` for ``compress.methods[index]`` on the version ``base``, named so."""
    try:
        check_fits(plan, arch, config, task)
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"compress.methods[{index}] ({plan.method}) on {base}: {exc.message}"
        ) from None


def check_dataset(arch: str, config: Mapping[str, Any], data: Dataset, base: str) -> None:
    """The dataset's rows and labels fit the version ``base`` being compressed (its outputs
    cover the classes): a 5-class model on the 10-class digits failed in torch, retried."""
    from maas.training.prepare import check_fit

    try:
        check_fit(arch, config, data, f"base {base}: model.config")
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"dataset {data.name} does not fit {exc.message}; name the dataset it was trained "
            "on (or leave dataset out: its lineage's is used)"
        ) from None


def _check_teacher(arch: str, config: Mapping[str, Any], task: str | None) -> None:
    """Distillation matches the teacher's class distribution of each row (soft targets), or a
    headless encoder's embedding of it."""
    if zoo.outputs_embeddings(arch, config):
        return
    if task not in (None, "classification"):
        raise InvalidArgument(
            f"distill needs a classification dataset (soft class targets); this one is {task}: "
            "compress a regression model with prune or quantize"
        )
    if len(zoo.output_shape(arch, config)) > 1:
        raise InvalidArgument(
            f"distill needs a teacher that scores one class a row; {arch} predicts one at each "
            "position: compress it with quantize or prune"
        )


def parse_methods(items: Sequence[Mapping[str, Any]]) -> list[Plan]:
    if not items:
        raise InvalidArgument("compress.methods must name at least one method")
    plans = [parse_method(item) for item in items]
    for i, plan in enumerate(plans):
        if plan in plans[:i]:  # the same variant twice: twice the work, two equal versions
            raise InvalidArgument(
                f"compress.methods[{i}] repeats compress.methods[{plans.index(plan)}] "
                f"({plan.method} with the same settings); list each variant once"
            )
    return plans


@dataclass
class Variant:
    """A model on its way through a plan: fp32 weights, pruning masks, the weight codec."""

    arch: str
    config: dict[str, Any]
    model: nn.Module
    masks: prune.Masks = field(default_factory=dict)
    codec: str | None = None

    def encode(self) -> tuple[str, dict[str, torch.Tensor]]:
        """``(manifest format, tensors to store)``."""
        return formats.encode(self.model, self.masks, self.codec)


def _prune(step: Prune, variant: Variant, data: Tensors, fit_config: FitConfig) -> Variant:
    model = copy.deepcopy(variant.model)
    if step.structured:
        model, config = prune.structured(model, variant.arch, variant.config, step.sparsity)
        masks: prune.Masks = {}
    else:
        config = variant.config
        masks = prune.magnitude_masks(model, step.sparsity)
        prune.apply_masks(model, masks)
    if step.recovery_steps:
        fit(
            model,
            data,
            dataclasses.replace(fit_config, steps=step.recovery_steps),
            after_step=(lambda m: prune.apply_masks(m, masks)) if masks else None,
        )
    return Variant(variant.arch, config, model, masks)


def _distill(step: Distill, variant: Variant, data: Tensors, fit_config: FitConfig) -> Variant:
    student = kd.parse_student(step.student, variant.arch, variant.config)
    config = dataclasses.replace(fit_config, steps=step.steps)
    model = kd.distill(variant.model, student, data, config, step.temperature, step.alpha)
    return Variant(student.arch, student.config, model)


def run(plan: Plan, parent: Variant, data: Tensors, fit_config: FitConfig) -> Variant:
    """Apply the plan's steps to (a copy of) the parent; the parent is left untouched."""
    variant = parent
    for step in plan.steps:
        if isinstance(step, Prune):
            variant = _prune(step, variant, data, fit_config)
        elif isinstance(step, Distill):
            variant = _distill(step, variant, data, fit_config)
        else:
            variant = copy.copy(variant)
            variant.codec = step.dtype
    return variant


def parent_variant(model: nn.Module, arch: str, config: Mapping[str, Any]) -> Variant:
    parsed = zoo.config_to_dict(zoo.parse_config(arch, dict(config)))
    return Variant(arch, parsed, model.eval())
