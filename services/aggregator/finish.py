"""A training job's last step: its model from the shards' final checkpoints, evaluated, registered.

``JobFinisher.result`` assembles the final parameters (each partition's slice into the plan's
layout, over the job's starting weights), evaluates them on the held-out split on a worker
thread, and registers the version with lineage (job id, the base of a finetune, the training
settings and dataset) and metrics. A registration that already happened — the coordinator
crashed before writing the result — is found by job id and not repeated. What it returns is the
job's ``succeeded`` result; writing and announcing it is the coordinator's.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from maas import datasets, zoo
from maas.config import Settings
from maas.errors import FailedPrecondition, MaasError, NotFound
from maas.registry.client import RegistryClient
from maas.registry.types import ModelVersion
from maas.store_async import AsyncObjectStore
from maas.training import checkpoint as ck
from maas.training.plan import JobPlan
from maas.training.prepare import load_dataset
from maas.training.replica import evaluate, recalibrate_norms
from maas.training.storage import TrainingStore

# A trained model whose held-out loss is this many times its starting weights' diverged: it
# learned nothing usable (an lr of 1e6 ended at 1.5e6 times; over-fitting stays within ~5 times).
DIVERGED_LOSS_FACTOR = 100.0


def check_diverged(plan: JobPlan, metrics: dict[str, float], initial_loss: float) -> None:
    """FailedPrecondition when the trained model's held-out metrics are not numbers, or its
    loss is DIVERGED_LOSS_FACTOR times that of the weights it started from: training diverged
    (a learning rate too high, say), and such a model is not registered."""
    broken = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if broken:
        raise FailedPrecondition(
            f"training diverged: held-out {', '.join(broken)} is not a number after "
            f"{plan.target_version} steps; {plan.training.optimizer.divergence_advice()}"
        )
    loss = metrics.get("loss")
    if loss is not None and initial_loss > 0 and loss > DIVERGED_LOSS_FACTOR * initial_loss:
        raise FailedPrecondition(
            f"training diverged: the held-out loss rose from {initial_loss:.4g} (the starting "
            f"weights) to {loss:.4g} after {plan.target_version} steps; "
            f"{plan.training.optimizer.divergence_advice()}"
        )


class JobFinisher:
    def __init__(
        self,
        settings: Settings,
        objects: AsyncObjectStore,
        store: TrainingStore,
        registry: RegistryClient,
    ) -> None:
        self._settings = settings
        self._objects = objects
        self._store = store
        self._registry = registry

    async def check_base(self, plan: JobPlan) -> None:
        """FailedPrecondition when the version a fine-tune started from was deleted while the
        job ran: its result could never be registered with that parent, so the job ends now
        rather than after its last step. A registry out of reach says nothing here (the
        finish waits such outages out)."""
        if not plan.parent:
            return
        base = f"{plan.parent['name']}@{plan.parent['version']}"
        try:
            await self._registry.get(base)
        except NotFound as exc:
            raise FailedPrecondition(
                f"the job's base {base} is gone ({exc.message}); a model fine-tuned from it "
                "cannot be registered with it as parent: submit the job again on a version that "
                "exists (and delete a base only once the jobs using it ended)"
            ) from None
        except MaasError:
            return

    async def result(self, plan: JobPlan, pointers: list[ck.Pointer]) -> dict[str, Any]:
        """The ``succeeded`` result of ``plan`` whose partitions' final checkpoints are
        ``pointers`` (one per shard, in order), with its model registered."""
        # The starting weights hold what no partition trains (buffers; norm statistics are
        # computed from the training rows in _evaluate).
        initial = load_safetensors(await self._store.read_init(plan.job_id))
        state = await self._final_state(plan, pointers, dict(initial))
        metrics, initial_metrics = await asyncio.to_thread(self._evaluate, plan, state, initial)
        check_diverged(plan, metrics, initial_metrics.get("loss", math.inf))
        lead = pointers[0]
        seconds = max(1e-3, (lead.written_ms - lead.started_ms) / 1000)
        metrics["samples_per_s"] = lead.samples / seconds
        version = await self._register(plan, state, metrics)
        return {
            "state": "succeeded",
            "step": plan.target_version,
            "total_steps": plan.target_version,
            "metrics": metrics,
            "model": {"name": version.name, "version": version.version},
        }

    async def _final_state(
        self, plan: JobPlan, pointers: list[ck.Pointer], state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``state`` (the starting weights) with every partition's trained values in it."""
        flat = np.empty(plan.layout.size, dtype=np.float32)
        for part, pointer in zip(plan.partitions, pointers, strict=True):
            snap = await self._store.read_checkpoint(pointer)
            part.scatter(snap.theta, flat)
        for name, value in plan.layout.unflatten(flat).items():
            state[name] = torch.from_numpy(value.copy())
        return state

    def _evaluate(
        self, plan: JobPlan, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Held-out metrics of the trained weights and of the starting ones. The trained ones'
        batch-norm statistics are first computed over the training rows (no shard trains them),
        in ``trained``."""
        fetch = datasets.fetcher(self._objects.sync, self._settings)
        data = load_dataset(plan.dataset, seed=plan.training.seed, fetch=fetch)
        model = zoo.build(plan.arch, plan.config)
        model.load_state_dict(trained)
        if recalibrate_norms(model, data.x_train, plan.training.batch_size):
            trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        metrics = evaluate(model, data.x_test, data.y_test, plan.loss)
        model.load_state_dict(initial)
        return metrics, evaluate(model, data.x_test, data.y_test, plan.loss)

    async def _register(
        self, plan: JobPlan, state: dict[str, torch.Tensor], metrics: dict[str, float]
    ) -> ModelVersion:
        existing = await self._registered_by(plan.register_name, plan.job_id)
        if existing is not None:
            return existing
        parent = f"{plan.parent['name']}@{plan.parent['version']}" if plan.parent else None
        return await self._registry.register(
            state,
            plan.register_name,
            plan.arch,
            plan.config,
            parent=parent,
            method=plan.kind,
            job_id=plan.job_id,
            metrics=metrics,
            # The dataset in lineage lets a later compress job find its evaluation data.
            settings=plan.lineage_settings,
            alias=plan.register_alias,
        )

    async def _registered_by(self, name: str, job_id: str) -> ModelVersion | None:
        try:
            async for version in self._registry.iter_versions(name):
                if version.job_id == job_id:
                    return version
        except NotFound:
            return None
        return None
