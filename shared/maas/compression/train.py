"""The small seeded training loop compression needs: recovery fine-tuning and distillation.

It is deliberately local and single-process: a compress job fine-tunes a model that already
fits one machine for a few hundred steps, where the distributed trainer's Kafka round trips
would cost more than the work. The same seed gives the same batches and the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maas.datasets import Dataset
from maas.errors import InvalidArgument
from maas.training.replica import predict

# (model outputs for a batch, the batch's row indices into the training set) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[nn.Module], None]


class Stopped(Exception):
    """``FitConfig.stop`` asked for it: training ended before its last step."""


SCHEDULES = ("constant", "warmup_linear")
PROGRESS_EVERY_S = 5.0
TEACHER_ROWS = 256  # rows a teacher's forward pass takes at once
Progress = Callable[[int, int, float], None]
WARMUP_FRACTION = 0.1  # of the steps, for "warmup_linear" (BERT's fine-tuning recipe)


@dataclass(frozen=True)
class FitConfig:
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    # "constant": ``lr`` throughout. "warmup_linear": from lr/warmup up to ``lr`` over the first
    # WARMUP_FRACTION of the steps, then linearly down to zero at the last step.
    schedule: str = "constant"
    # Asked before each step: True ends training with Stopped (a cancelled job's method stops
    # within a step rather than running its thousands of steps to the end).
    stop: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    # Told (steps done, steps, the last batch's loss) at most every PROGRESS_EVERY_S: a job
    # training a variant for minutes said nothing past 'accepted'.
    progress: Progress | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise InvalidArgument(
                f"training needs steps >= 0, batch_size >= 1 and lr > 0; got {self}"
            )
        if self.schedule not in SCHEDULES:
            raise InvalidArgument(
                f"schedule={self.schedule!r} is unknown; use one of {list(SCHEDULES)}"
            )

    def lr_factor(self, step: int) -> float:
        """The multiple of ``lr`` that step ``step`` (0-based) trains with."""
        if self.schedule == "constant":
            return 1.0
        warmup = max(1, round(WARMUP_FRACTION * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (self.steps - step) / max(1, self.steps - warmup))


@dataclass(frozen=True)
class Tensors:
    """A dataset as torch tensors, converted once."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str

    @classmethod
    def of(cls, data: Dataset) -> Tensors:
        return cls(
            torch.from_numpy(np.ascontiguousarray(data.x_train, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(data.y_train)),
            torch.from_numpy(np.ascontiguousarray(data.x_test, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(data.y_test)),
            data.task,
        )


def task_loss(data: Tensors, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if data.task == "classification":
        # Sequence models (gpt) predict a class per position: (N, T, C) against (N, T).
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())
    return F.mse_loss(outputs, targets.reshape(outputs.shape).float())


def hard_label_loss(data: Tensors) -> LossFn:
    return lambda outputs, rows: task_loss(data, outputs, data.y_train[rows])


def fit(
    model: nn.Module,
    data: Tensors,
    config: FitConfig,
    loss: LossFn | None = None,
    after_step: AfterStep | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam for ``config.steps`` seeded mini-batches, the learning
    rate following ``config.schedule``.

    ``after_step`` runs after every optimizer step (pruning re-applies its masks there, so
    pruned weights stay exactly zero). Raises Stopped when ``config.stop`` says so.
    """
    loss = loss or hard_label_loss(data)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    n = len(data.x_train)
    model.train()
    reported = time.monotonic()
    for step in range(config.steps):
        if config.stop is not None and config.stop():
            raise Stopped(f"training stopped after {step} of {config.steps} steps")
        rows = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        value = loss(model(data.x_train[rows]), rows)
        value.backward()
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(model)
        if config.progress is not None and time.monotonic() - reported >= PROGRESS_EVERY_S:
            reported = time.monotonic()
            config.progress(step + 1, config.steps, float(value))
    return model.eval()


@torch.inference_mode()
def evaluate(model: nn.Module, data: Tensors) -> dict[str, float]:
    """Loss (and accuracy for classification) on the held-out split."""
    model.eval()
    outputs = predict(model, data.x_test)
    metrics = {"loss": float(task_loss(data, outputs, data.y_test))}
    if data.task == "classification":
        metrics["accuracy"] = float((outputs.argmax(dim=-1) == data.y_test).float().mean())
    return metrics


def teacher_outputs(teacher: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The teacher's outputs on ``rows``, computed a batch at a time: in one pass, a text
    model's activations took ~0.85 MiB a row (40 GB for 50 000 rows). Not inference_mode: the
    loss keeps these as autograd targets."""
    teacher.eval()
    with torch.no_grad():
        return torch.cat(
            [teacher(rows[i : i + TEACHER_ROWS]) for i in range(0, len(rows), TEACHER_ROWS)]
        )
