"""A worker's model replica (torch): trainable parameters and their gradients live in two flat
fp32 vectors, so installing a shard's new values is one slice copy and a partition's gradient
is a view, never a per-tensor gather.

``backward`` calls ``on_grad(name)`` as soon as a tensor's gradient is final (a post-accumulate
hook), while backward goes on with the layers below: that is when a worker can send it.

Also the loss functions and the held-out evaluation every part of the platform uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maas import zoo
from maas.errors import InvalidArgument
from maas.training.layout import FlatLayout
from maas.training.optim import OptimizerSpec


def compute_loss(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "cross_entropy":
        # Sequence models predict a class per position: (N, T, C) against (N, T) flattens.
        return F.cross_entropy(output.flatten(0, -2), target.flatten())
    if name == "mse":
        if not target.is_floating_point():  # class labels: regress their one-hot encoding
            target = F.one_hot(target.long(), output.shape[-1]).to(output.dtype)
        return F.mse_loss(output, target.reshape(output.shape))
    raise InvalidArgument(f"loss {name!r} is unknown; use cross_entropy or mse")


@dataclass(frozen=True)
class BatchResult:
    loss: float
    accuracy: float | None
    samples: int


def _accuracy(output: torch.Tensor, target: torch.Tensor, loss: str) -> float | None:
    if target.is_floating_point():  # regression targets: no classes to be right about
        return None
    return float((output.argmax(dim=-1) == target).float().mean())


# Rows a held-out split is scored in at a time. In one pass, every layer's activations for all
# of its rows were held together: 359 rows of a 16-parameter conv padded by 100 took 560 MB of
# the coordinator, and a 28x28 image set of 14 000 test rows would take gigabytes.
PREDICT_ROWS = 256


@torch.inference_mode()
def predict(model: nn.Module, rows: torch.Tensor, batch_rows: int = PREDICT_ROWS) -> torch.Tensor:
    """``model``'s outputs on ``rows``, ``batch_rows`` at a time, without autograd."""
    if len(rows) <= batch_rows:
        return model(rows)  # type: ignore[no-any-return]
    return torch.cat([model(rows[i : i + batch_rows]) for i in range(0, len(rows), batch_rows)])


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, loss: str) -> dict[str, float]:
    """Loss (and accuracy for classification) of ``model`` on held-out rows."""
    was_training = model.training
    model.eval()
    try:
        output = predict(model, torch.from_numpy(np.ascontiguousarray(x)))
        target = torch.from_numpy(np.ascontiguousarray(y))
        metrics = {"loss": float(compute_loss(loss, output, target))}
        accuracy = _accuracy(output, target, loss)
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        if output.dim() == 3 and loss == "cross_entropy":  # a language model: per-token terms
            metrics["perplexity"] = float(np.exp(metrics["loss"]))
        return metrics
    finally:
        model.train(was_training)


def recalibrate_norms(model: nn.Module, x: np.ndarray, batch_rows: int) -> bool:
    """Set the running mean and variance of ``model``'s batch norms to their average over ``x``'s
    batches of about ``batch_rows``; False (nothing changed) when it has none. The shards
    train parameters only: a distributed job's norm statistics would otherwise stay those of
    its starting weights (mean 0, variance 1), and a model trained to 0.98 served at 0.39."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]
    if not norms or len(x) < 2:  # train-mode statistics of one row are undefined
        return False
    was_training = model.training
    model.eval()  # dropout and the rest as served; only the norms gather statistics
    momenta = [norm.momentum for norm in norms]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: every batch weighs the same
            norm.train()
        rows = torch.from_numpy(np.ascontiguousarray(x))
        # Whole batches, the remainder spread over them: a last batch of one row cannot be used.
        with torch.no_grad():
            for batch in torch.tensor_split(rows, max(1, len(rows) // max(2, batch_rows))):
                model(batch)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return True


def torch_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """The torch optimizer a job's optimizer spec names (local training and local SGD)."""
    if spec.name == "adam":
        return torch.optim.Adam(
            params,
            lr=spec.lr,
            betas=(spec.beta1, spec.beta2),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


def trainable_shapes(model: nn.Module, frozen: set[str]) -> list[tuple[str, list[int]]]:
    return [(n, list(p.shape)) for n, p in model.named_parameters() if n not in frozen]


class Replica:
    """A model whose trainable parameters are views into ``flat`` and gradients into ``grad``."""

    def __init__(
        self,
        arch: str,
        config: Mapping[str, Any],
        state: Mapping[str, torch.Tensor],
        layout: FlatLayout,
        loss: str,
    ) -> None:
        self.model = zoo.build(arch, dict(config))
        self.model.load_state_dict(dict(state), strict=True)
        self.model.train()
        self.layout = layout
        self.loss = loss
        self.flat = torch.zeros(layout.size, dtype=torch.float32)
        self.grad = torch.zeros(layout.size, dtype=torch.float32)
        self._on_grad: Callable[[str], None] | None = None
        params = dict(self.model.named_parameters())
        missing = sorted(set(layout.names) - set(params))
        if missing:
            raise InvalidArgument(f"the plan's parameters {missing} are not in the {arch} model")
        trainable = set(layout.names)
        for name, param in params.items():
            param.requires_grad_(name in trainable)
        for spec in layout.specs:
            param = params[spec.name]
            view = self.flat[spec.offset : spec.stop].view(spec.shape)
            view.copy_(param.detach())
            # The parameter now *is* a slice of `flat`, and backward accumulates into `grad`.
            param.data = view
            param.grad = self.grad[spec.offset : spec.stop].view(spec.shape)
            param.register_post_accumulate_grad_hook(self._hook(spec.name))

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        # The parameters hold their hooks, so a hook holding the replica would make a cycle:
        # every finished job's model, buffers and data would then wait for a full collection
        # (a long-lived worker grew ~400 MB per job that way). A weak reference frees it at once.
        replica = weakref.ref(self)

        def done(_: torch.Tensor) -> None:
            owner = replica()
            if owner is not None and owner._on_grad is not None:
                owner._on_grad(name)

        return done

    @property
    def flat_numpy(self) -> np.ndarray:
        return self.flat.numpy()

    @property
    def grad_numpy(self) -> np.ndarray:
        return self.grad.numpy()

    def forward(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, BatchResult]:
        """The mean loss on one batch (to call ``backward`` on) and what it measured."""
        inputs = torch.from_numpy(np.ascontiguousarray(x))
        target = torch.from_numpy(np.ascontiguousarray(y))
        output = self.model(inputs)
        loss = compute_loss(self.loss, output, target)
        result = BatchResult(
            float(loss.detach()), _accuracy(output.detach(), target, self.loss), len(x)
        )
        return loss, result

    def backward(self, loss: torch.Tensor, on_grad: Callable[[str], None] | None = None) -> None:
        """The gradient of ``loss`` into ``grad``; ``on_grad(name)`` as each tensor's is final."""
        self.grad.zero_()
        self._on_grad = on_grad
        try:
            loss.backward()
        finally:
            self._on_grad = None

    def compute(self, x: np.ndarray, y: np.ndarray) -> BatchResult:
        """Forward and backward on one batch; the mean-loss gradient lands in ``grad``."""
        loss, result = self.forward(x, y)
        self.backward(loss)
        return result

    def trainable(self) -> list[torch.nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[name] for name in self.layout.names]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
