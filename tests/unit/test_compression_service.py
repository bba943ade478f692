"""The compressor core against an in-memory registry: jobs in, measured variants registered."""

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from maas import artifacts, events, jobs, zoo
from maas.compression import train as train_module
from maas.compression.train import FitConfig, Tensors, fit
from maas.config import Settings
from maas.datasets import load_builtin
from maas.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from maas.manifest import Manifest
from maas.registry.types import ModelRef, ModelVersion
from services.compressor import core as core_module
from services.compressor.core import Compressor
from services.compressor.job import parse_job, plan_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


DIGITS = {"uri": "builtin:digits"}


class MemoryRegistry:
    """The registry client's surface, kept in a dict: (version, files) per model name."""

    def __init__(self) -> None:
        self.models: dict[str, list[tuple[ModelVersion, dict[str, bytes]]]] = {}

    async def register(
        self,
        module_or_state: Any,
        name: str,
        arch: str,
        config: Mapping[str, Any],
        *,
        parent: Any = None,
        alias: str | None = None,
        **lineage: Any,
    ) -> ModelVersion:
        parent_ref = {"name": parent.name, "version": parent.version} if parent else None
        files, manifest = artifacts.pack(
            module_or_state, arch, config, parent=parent_ref, **lineage
        )
        versions = self.models.setdefault(name, [])
        version = ModelVersion(
            name=name,
            version=len(versions) + 1,
            arch=arch,
            format=manifest.format,
            manifest_json=manifest.to_json(),
            manifest_sha256="",
            files=(),
            bucket="maas-models",
            prefix=f"{name}/{len(versions) + 1}/",
            parent=ModelRef(parent.name, version=parent.version) if parent else None,
            method=manifest.method,
            job_id=manifest.job_id,
            metrics=manifest.metrics,
            aliases=(alias,) if alias else (),
        )
        versions.append((version, files))
        return version

    def _find(self, ref: ModelRef | str) -> tuple[ModelVersion, dict[str, bytes]]:
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        versions = self.models.get(ref.name, [])
        matches = [v for v in versions if ref.version in (None, v[0].version)]
        if not matches:
            raise NotFound(f"model {ref} is not registered")
        return matches[-1]

    async def get(self, ref: ModelRef | str) -> ModelVersion:
        return self._find(ref)[0]

    async def fetch(self, ref: ModelRef | str) -> tuple[ModelVersion, Manifest, dict[str, bytes]]:
        version, files = self._find(ref)
        return version, Manifest.from_json(version.manifest_json), files

    async def iter_versions(self, name: str) -> AsyncIterator[ModelVersion]:
        if name not in self.models:
            raise NotFound(f"model {name} is not registered")
        for version, _ in reversed(self.models[name]):
            yield version


@pytest.fixture(scope="module")
def trained():
    return fit(
        zoo.build("mlp", {}, seed=0), Tensors.of(load_builtin("digits")), FitConfig(steps=300)
    )


@pytest.fixture
async def registry(trained):
    registry = MemoryRegistry()
    await registry.register(
        trained, "digits", "mlp", {}, method="train", settings={"dataset": DIGITS}
    )
    return registry


@pytest.fixture
def statuses():
    return []


@pytest.fixture
def publish(statuses):
    async def publish(event):
        events.validate(event)
        statuses.append(event)

    return publish


@pytest.fixture
def core(registry, publish):
    return Compressor(registry, publish, latency_repeats=1)


def job(**fields):
    event = {
        "job_id": "job-1",
        "type": "compress",
        "base": {"name": "digits", "version": 1},
        "compress": {"methods": [{"quantize": {"dtype": "int8"}}, {"prune": {"sparsity": 0.5}}]},
        **fields,
    }
    present = {k: v for k, v in event.items() if v is not None}
    return events.validate(events.new_event(events.JOB, **present))


def cancel_after_registering(core, registry):
    """Make ``core`` cancel job-1 right after each registration; returns the plain register."""
    register = registry.register

    async def register_then_cancel(*args, **kwargs):
        version = await register(*args, **kwargs)
        core.cancel("job-1")
        return version

    registry.register = register_then_cancel
    return register


async def test_each_method_registers_one_variant_with_lineage_and_metrics(core, registry):
    int8, pruned = await core.handle(job())
    assert (int8.name, int8.version, int8.method, pruned.method) == (
        "digits",
        2,
        "quantize",
        "prune",
    )
    manifest = Manifest.from_json(int8.manifest_json)
    assert manifest.parent == {"name": "digits", "version": 1}
    assert manifest.job_id == "job-1"
    assert manifest.settings == {
        "dtype": "int8",
        "dataset": DIGITS,
        "seed": 0,
        "job_item": 0,
        "job_sha256": jobs.content_sha256(job()),  # the same for a redelivery of the job
    }
    assert manifest.format == "int8"
    expected = {
        "accuracy",
        "loss",
        "artifact_bytes",
        "compression_ratio",
        "accuracy_drop",
        "parameters",
        "nonzero_parameters",
        "latency_b1_ms",
        "latency_b32_ms",
    }
    assert expected <= set(int8.metrics)
    assert pruned.metrics["nonzero_parameters"] < pruned.metrics["parameters"]


async def test_progress_runs_from_accepted_through_each_variant_to_succeeded(core, statuses):
    await core.handle(job())
    assert [(s["state"], s["step"], s["total_steps"]) for s in statuses] == [
        ("accepted", 0, 2),
        ("running", 1, 2),
        ("running", 2, 2),
        ("succeeded", 2, 2),
    ]
    assert statuses[-1]["model"] == {"name": "digits", "version": 3}


async def test_the_accepted_status_says_the_base_is_being_loaded_and_measured(core, statuses):
    # A large base takes minutes to load and measure: a watcher is told why nothing moves.
    await core.handle(job())
    assert statuses[0]["reason"] == (
        "loading the base digits@1 and measuring it (accuracy, size, latency)"
    )


async def test_the_accepted_status_carries_the_jobs_fingerprint(core, statuses):
    await core.handle(job())
    assert statuses[0]["content_sha256"] == jobs.content_sha256(job())


async def test_a_policy_plan_has_no_job_event_and_its_statuses_no_fingerprint(core, statuses):
    plan = plan_job("policy-digits-1", ModelRef("digits", version=1), [{"quantize": {}}])
    await core.run(plan)  # the publish fixture validates every status against the schema
    assert [s["state"] for s in statuses] == ["accepted", "running", "succeeded"]
    assert "content_sha256" not in statuses[0]


async def test_the_final_status_lists_every_variant_the_job_registered(core, statuses):
    await core.handle(job())
    assert statuses[-1]["models"] == [
        {"name": "digits", "version": 2, "method": "quantize", "format": "int8"},
        {"name": "digits", "version": 3, "method": "prune", "format": "sparse"},
    ]


async def test_a_job_with_an_unknown_key_is_refused_before_any_work(core, statuses):
    typo = events.new_event(
        events.JOB,
        job_id="job-typo",
        type="compress",
        base={"name": "digits", "version": 1},
        compress={"methods": [{"quantize": {"dtyp": "int8"}}]},
    )
    with pytest.raises(InvalidArgument, match="quantize.dtyp: unknown key; did you mean 'dtype'"):
        await core.handle(typo)
    assert statuses == []


async def test_other_job_types_are_ignored(core, registry, statuses):
    assert await core.handle(job(type="train", compress=None)) == []
    assert statuses == [] and len(registry.models["digits"]) == 1


async def test_a_redelivered_job_registers_nothing_new(core, registry):
    await core.handle(job())
    assert await core.handle(job()) == []
    assert len(registry.models["digits"]) == 3


async def test_a_restarted_compressor_resumes_a_job_where_it_stopped(core, registry, publish):
    # As if the process died after registering the job's first variant, before committing: the
    # first variant's registration is the last thing this compressor does.
    register = cancel_after_registering(core, registry)
    await core.handle(job())
    registry.register = register
    first = registry.models["digits"][1][0]
    told: list[int] = []
    fresh = Compressor(
        registry, publish, latency_repeats=1, on_registered=lambda v: told.append(v.version)
    )
    resumed = await fresh.handle(job())
    assert [v.version for v in resumed] == [first.version, 3]
    assert len(registry.models["digits"]) == 3
    assert told == [3]  # the variant found done is not counted as registered again


async def test_another_job_under_a_used_job_id_is_refused_not_answered_with_old_variants(
    core, registry, publish
):
    await core.handle(job())
    other = job(compress={"methods": [{"prune": {"sparsity": 0.3}}]})
    with pytest.raises(AlreadyExists, match="job_id='job-1' belongs to another compress job"):
        await core.handle(other)
    with pytest.raises(AlreadyExists):  # a restarted compressor knows it from the registry
        await Compressor(registry, publish, latency_repeats=1).handle(other)
    assert len(registry.models["digits"]) == 3


async def test_a_job_id_held_by_another_job_of_any_type_is_refused_before_any_variant(
    registry, publish
):
    claims: list[tuple[str, str, str]] = []

    async def held_by_a_train_job(job_id: str, kind: str, content_sha256: str) -> None:
        claims.append((job_id, kind, content_sha256))
        raise AlreadyExists(f"job_id={job_id!r} belongs to another job (a train job ...)")

    core = Compressor(registry, publish, latency_repeats=1, claim=held_by_a_train_job)
    with pytest.raises(AlreadyExists, match="a train job"):
        await core.handle(job())
    assert claims == [("job-1", "compress", jobs.content_sha256(job()))]
    assert len(registry.models["digits"]) == 1  # the parent alone


async def test_a_method_that_cannot_run_on_the_parent_fails_the_job_before_any_variant(
    core, registry
):
    student = {"arch": "mlp", "config": {"in_features": 64, "num_classes": 3}}
    methods = [{"quantize": {"dtype": "int8"}}, {"distill": {"student": student, "steps": 5}}]
    with pytest.raises(InvalidArgument, match="distill.student takes 3 outputs but the teacher"):
        await core.handle(job(compress={"methods": methods}))
    assert [v.method for v, _ in registry.models["digits"]] == ["train"]  # no int8 left behind


async def test_a_variant_in_training_says_its_step_and_loss_in_running_statuses(
    core, statuses, monkeypatch
):
    monkeypatch.setattr(train_module, "PROGRESS_EVERY_S", 0.0)  # every step says so
    student = {"arch": "mlp", "config": {"in_features": 64, "hidden": [8], "num_classes": 10}}
    await core.handle(job(compress={"methods": [{"distill": {"student": student, "steps": 3}}]}))
    said = [s["reason"] for s in statuses if s["state"] == "running" and "reason" in s]
    assert len(said) == 3 and said[-1].startswith(
        "compress.methods[0] (distill): step 3 of 3, loss"
    )


async def test_a_variant_whose_training_diverged_fails_naming_the_learning_rate(core, registry):
    student = {"arch": "mlp", "config": {"in_features": 64, "hidden": [8], "num_classes": 10}}
    diverging = job(
        compress={"methods": [{"distill": {"student": student, "steps": 5}}]},
        training={"optimizer": {"name": "adam", "lr": 1e30}},
    )
    with pytest.raises(
        FailedPrecondition,
        match=r"distill diverged: .*lower training.optimizer.lr \(it is 1e\+30\)",
    ):
        await core.handle(diverging)
    assert [v.method for v, _ in registry.models["digits"]] == ["train"]  # nothing registered


async def test_a_variant_torch_cannot_compute_fails_the_job_at_once_naming_the_method(
    core, registry, monkeypatch
):
    # Retried as if transient, such a job held the compressor for five attempts.
    run = core_module.run

    def prune_refused(plan, *args, **kwargs):
        if plan.method == "prune":
            raise ValueError("Expected more than 1 value per channel when training")
        return run(plan, *args, **kwargs)

    monkeypatch.setattr(core_module, "run", prune_refused)
    with pytest.raises(FailedPrecondition) as failed:
        await core.handle(job())
    assert failed.value.message == (
        "compress.methods[1] (prune) could not be computed with these settings: ValueError: "
        "Expected more than 1 value per channel when training; registered before it: digits@2"
    )


async def test_variants_can_go_under_another_name_with_an_alias(core, registry):
    (variant,) = await core.handle(
        job(
            compress={"methods": [{"quantize": {}}]},
            register_as={"name": "digits-small", "alias": "edge"},
        )
    )
    assert (variant.name, variant.version, variant.aliases) == ("digits-small", 1, ("edge",))


async def test_a_missing_parent_model_is_not_found(core):
    with pytest.raises(NotFound, match="nope"):
        await core.handle(job(base={"name": "nope"}))


async def test_a_compressed_parent_is_refused(core, registry):
    await core.handle(job(compress={"methods": [{"quantize": {}}]}))
    with pytest.raises(FailedPrecondition, match="int8"):
        await core.handle(job(job_id="job-2", base={"name": "digits", "version": 2}))


async def test_the_dataset_comes_from_the_lineage_when_the_job_names_none(core, registry, trained):
    await registry.register(
        trained, "digits", "mlp", {}, method="finetune", parent=await registry.get("digits@1")
    )
    (variant,) = await core.handle(
        job(base={"name": "digits", "version": 2}, compress={"methods": [{"quantize": {}}]})
    )
    assert Manifest.from_json(variant.manifest_json).settings["dataset"] == DIGITS


async def test_without_any_dataset_the_job_is_refused_saying_how_to_fix_it(core, registry, trained):
    await registry.register(trained, "orphan", "mlp", {}, method="train")
    with pytest.raises(InvalidArgument, match="name one in the job"):
        await core.handle(job(base={"name": "orphan"}))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"base": None}, "base is required"),
        ({"compress": None}, "compress is required"),
        ({"register_as": {"alias": "edge"}}, "exactly one method"),
        ({"compress": {"methods": [{"prune": {"sparsity": 0.5, "speed": 1}}]}}, "speed"),
    ],
)
def test_a_bad_compress_job_is_refused_naming_the_field(fields, message):
    event = {
        "job_id": "j",
        "type": "compress",
        "base": {"name": "digits"},
        "compress": {"methods": [{"quantize": {}}, {"prune": {}}]},
    }
    event |= fields
    with pytest.raises(InvalidArgument, match=message):
        parse_job({k: v for k, v in event.items() if v is not None})


async def test_a_dataset_that_does_not_fit_the_parent_is_refused(core):
    with pytest.raises(InvalidArgument, match="16 features"):
        await core.handle(job(dataset={"uri": "builtin:regression"}))


async def test_a_dataset_whose_labels_the_parent_cannot_score_is_refused_naming_both(
    core, registry
):
    # A 5-class model on the 10-class digits: the parent's evaluation failed in torch
    # (IndexError), retried five times, and ended as handler_failed.
    few = zoo.build("mlp", {"num_classes": 5}, seed=0)
    await registry.register(few, "five", "mlp", {"num_classes": 5}, method="train")
    refused = job(base={"name": "five", "version": 1}, dataset=DIGITS)
    with pytest.raises(
        InvalidArgument, match=r"builtin:digits does not fit base five@1: .*need 10"
    ):
        await core.handle(refused)


async def test_distilling_a_regression_model_is_refused_before_any_variant(core, registry):
    regression = zoo.build("mlp", {"in_features": 16, "num_classes": 1}, seed=0)
    config = {"in_features": 16, "num_classes": 1}
    await registry.register(regression, "reg", "mlp", config, method="train")
    methods = [{"quantize": {"dtype": "int8"}}, {"distill": {"steps": 5}}]
    refused = job(
        base={"name": "reg", "version": 1},
        dataset={"uri": "builtin:regression"},
        compress={"methods": methods},
    )
    with pytest.raises(
        InvalidArgument, match=r"methods\[1\] \(distill\) on reg@1: distill needs a"
    ):
        await core.handle(refused)
    assert [v.method for v, _ in registry.models["reg"]] == ["train"]  # no int8 left behind


async def test_a_job_cancelled_before_it_starts_ends_cancelled_and_registers_nothing(
    core, registry, statuses
):
    core.cancel("job-1")
    assert await core.handle(job()) == []
    assert [(s["state"], s["step"], s["total_steps"]) for s in statuses] == [("cancelled", 0, 2)]
    assert len(registry.models["digits"]) == 1


async def test_a_cancel_during_a_variants_build_drops_it_and_ends_the_job(
    core, registry, statuses, monkeypatch
):
    build = core._build

    def build_then_cancel(*args):
        built = build(*args)
        core.cancel("job-1")  # arrives while this variant is being built
        return built

    monkeypatch.setattr(core, "_build", build_then_cancel)
    assert await core.handle(job()) == []
    assert [s["state"] for s in statuses] == ["accepted", "cancelled"]
    assert statuses[-1]["reason"] == "a cancel event asked for it"
    assert len(registry.models["digits"]) == 1


async def test_a_job_past_the_time_one_may_run_fails_naming_the_limit_and_what_it_kept(
    registry, publish
):
    # distill.steps 10**8 (the schema's most) would have held the one compressor for 13 days,
    # and past max.poll.interval.ms its partition moves and the job runs again elsewhere.
    settings = Settings(compressor_max_poll_interval_ms=3000)
    core = Compressor(registry, publish, latency_repeats=1, settings=settings)
    methods = [{"quantize": {"dtype": "int8"}}, {"distill": {"steps": 100_000_000}}]
    with pytest.raises(
        ResourceExhausted, match=r"methods\[1\] \(distill\) was stopped: the job ran past 3 s"
    ) as ended:
        await core.handle(job(compress={"methods": methods}))
    assert "registered before it: digits@2" in ended.value.message


async def test_a_base_deleted_while_the_job_runs_fails_it_before_the_next_variant(
    core, registry, monkeypatch
):
    register = registry.register

    async def register_then_delete_the_base(*args, **kwargs):
        version = await register(*args, **kwargs)
        del registry.models["digits"][0]  # the base, digits@1: deleted after the first variant
        return version

    monkeypatch.setattr(registry, "register", register_then_delete_the_base)
    with pytest.raises(FailedPrecondition, match="the base digits@1 was deleted") as ended:
        await core.handle(job())
    assert "registered before it: digits@2" in ended.value.message
    assert len(registry.models["digits"]) == 1  # the int8 only: no prune variant was built


async def test_a_cancel_between_variants_keeps_the_registered_ones(core, registry, statuses):
    cancel_after_registering(core, registry)
    await core.handle(job())
    assert [(s["state"], s["step"]) for s in statuses] == [
        ("accepted", 0),
        ("running", 1),
        ("cancelled", 1),
    ]
    assert [v.method for v, _ in registry.models["digits"]] == ["train", "quantize"]


async def test_a_cancel_while_a_method_trains_stops_its_training_and_ends_the_job(
    core, registry, statuses
):
    running = asyncio.create_task(
        core.handle(job(compress={"methods": [{"distill": {"steps": 10**6}}]}))
    )
    while not statuses:  # accepted: the parent is loading or the student training
        await asyncio.sleep(0.01)
    core.cancel("job-1")
    # A million distillation steps would take hours: the job ends because training stopped.
    assert await asyncio.wait_for(running, 120) == []
    assert [(s["state"], s["step"]) for s in statuses] == [("accepted", 0), ("cancelled", 0)]
    assert len(registry.models["digits"]) == 1


def test_a_text_model_and_a_dataset_of_other_rows_are_told_apart_in_tokens() -> None:
    from services.compressor.core_types import dataset_mismatch

    said = dataset_mismatch("builtin:stdlib-docs", 256, 64, "imp@1", "bert")
    assert "has rows of 256 tokens but imp@1 reads rows of 64 tokens (its max_seq_length)" in said
    said = dataset_mismatch("builtin:x", 32, 64, "imp@1", "mlp")
    assert "has 32 features per row but imp@1 takes 64" in said


async def plan_queued_behind_a_job(core, registry, statuses):
    """job-1 running (held at its first registration) and a policy plan told it is queued
    behind it; returns both tasks and the event that lets job-1 go on."""
    register, reached, release = registry.register, asyncio.Event(), asyncio.Event()

    async def held_register(*args, **kwargs):
        reached.set()
        await release.wait()
        return await register(*args, **kwargs)

    registry.register = held_register
    first = asyncio.create_task(core.handle(job()))
    await reached.wait()
    plan = plan_job("policy-digits-1", ModelRef("digits", version=1), [{"quantize": {}}])
    second = asyncio.create_task(core.run(plan))
    async with asyncio.timeout(30):
        while not any(s["job_id"] == "policy-digits-1" for s in statuses):
            await asyncio.sleep(0.01)
    return first, second, release


async def test_a_plan_arriving_while_a_job_runs_is_queued_naming_it_and_runs_after(
    core, registry, statuses
):
    first, second, release = await plan_queued_behind_a_job(core, registry, statuses)
    release.set()
    await asyncio.gather(first, second)
    order = [(s["job_id"], s["state"]) for s in statuses]
    queued = next(s for s in statuses if s["job_id"] == "policy-digits-1")
    assert queued["state"] == "queued" and "waiting for job job-1" in queued["reason"]
    assert order.index(("job-1", "succeeded")) < order.index(("policy-digits-1", "accepted"))


async def test_a_conclusion_acts_before_the_job_says_succeeded_and_is_its_reason(core, statuses):
    async def conclude(outcome) -> str:
        assert statuses[-1]["state"] == "running"  # not succeeded yet
        return f"promotion: digits@production -> {outcome.versions[-1].version}"

    plan = plan_job("policy-digits-1", ModelRef("digits", version=1), [{"quantize": {}}])
    await core.run(plan, conclude=conclude)
    assert statuses[-1]["state"] == "succeeded"
    assert statuses[-1]["reason"] == "promotion: digits@production -> 2"


async def test_a_job_cancelled_while_it_waits_for_its_turn_ends_at_once(core, registry, statuses):
    first, second, release = await plan_queued_behind_a_job(core, registry, statuses)
    core.cancel("policy-digits-1")
    outcome = await second  # while the first job still holds its turn
    assert outcome.cancelled and not first.done()
    assert [s["state"] for s in statuses if s["job_id"] == "policy-digits-1"] == [
        "queued",
        "cancelled",
    ]
    release.set()
    await first
    assert statuses[-1]["job_id"] == "job-1" and statuses[-1]["state"] == "succeeded"


async def test_a_job_no_longer_wanted_ends_cancelled_before_its_next_variant(core, statuses):
    asked = []

    async def wanted() -> str:
        asked.append(1)
        return "" if len(asked) < 3 else "the policy of digits was cleared"

    outcome = await core.run(job_of_two_methods(), wanted=wanted)
    assert outcome.cancelled and len(outcome.versions) == 0
    assert statuses[-1]["state"] == "cancelled" and statuses[-1]["step"] == 1
    assert statuses[-1]["reason"] == "the policy of digits was cleared"


def job_of_two_methods():
    return plan_job(
        "policy-digits-1",
        ModelRef("digits", version=1),
        [{"quantize": {"dtype": "int8"}}, {"prune": {"sparsity": 0.5}}],
    )
