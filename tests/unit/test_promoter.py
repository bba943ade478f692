"""The compressor's policy role against an in-memory registry and plan runner: which registered
events it acts on, what it registers and how it moves the alias."""

from dataclasses import replace

import pytest

from maas.errors import NotFound
from maas.policy import parse_policy
from maas.registry.types import AliasChange, ModelRef, ModelVersion, PolicyVersion
from services.compressor.core_types import Outcome
from services.compressor.job import CompressJob
from services.compressor.promoter import Promoter

POLICY = {
    "on_registered": {"compress": {"methods": [{"quantize": {"dtype": "int8"}}]}},
    "promote": {"alias": "production", "rule": "smallest_within", "within": 0.01},
}


def version(number: int, method: str, size: int, accuracy: float, fmt="dense") -> ModelVersion:
    return ModelVersion(
        name="m",
        version=number,
        arch="mlp",
        format=fmt,
        manifest_json=b"{}",
        manifest_sha256="",
        files=(),
        bucket="maas-models",
        prefix=f"m/{number}/",
        method=method,
        metrics={"accuracy": accuracy},
        created_ms=1000 + number,
        size_bytes=size,
    )


class FakeRegistry:
    def __init__(self) -> None:
        self.versions = {1: version(1, "train", 1000, 0.96)}
        self.policy: PolicyVersion | None = PolicyVersion("m", 2, POLICY, "admin", 500)
        self.earlier = {1: PolicyVersion("m", 1, POLICY, "admin", 400)}  # policy versions
        self.aliases: dict[str, int] = {}
        self.moves: list[AliasChange] = []
        self.clock = 10_000  # the registry's ms: after every version's created_ms here

    async def get(self, ref: ModelRef | str) -> ModelVersion:
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        number = self.aliases.get(ref.alias) if ref.alias else ref.version
        if number not in self.versions:
            raise NotFound(f"{ref} is not registered")
        return self.versions[number]

    async def get_policy(self, name: str, version: int | None = None) -> PolicyVersion:
        if self.policy is None:
            raise NotFound(f"model {name!r} has no policy")
        return self.policy if version in (None, self.policy.version) else self.earlier[version]

    async def set_alias(self, name: str, alias: str, number: int, *, reason: str = ""):
        return self._move(alias, number, "services", reason)

    def by_hand(self, alias: str, number: int, reason: str = "pinned by hand") -> None:
        """A person's move (after every version here was registered)."""
        self._move(alias, number, "admin", reason)

    def _move(self, alias: str, number: int, actor: str, reason: str) -> AliasChange:
        self.clock += 1
        change = AliasChange("m", alias, self.aliases.get(alias), number, actor, self.clock, reason)
        self.aliases[alias] = number
        self.moves.append(change)
        return change

    async def alias_history(self, name: str, alias: str | None = None) -> list[AliasChange]:
        return [m for m in self.moves if alias in (None, m.alias)]


class FakePlans:
    """Registers an int8 variant per plan job id, once, like the compressor core."""

    def __init__(self, registry: FakeRegistry) -> None:
        self.registry = registry
        self.jobs: list[CompressJob] = []
        self.made: dict[str, ModelVersion] = {}

    async def run(self, job: CompressJob, *, conclude=None, wanted=None) -> Outcome:
        self.jobs.append(job)
        self.said = await wanted() if wanted else ""  # what `cancelled` would carry
        if self.said:
            return Outcome({}, [], cancelled=True)
        if job.job_id not in self.made:
            number = max(self.registry.versions) + 1
            variant = replace(version(number, "quantize", 300, 0.955, "int8"), parent=job.base)
            self.registry.versions[number] = variant
            self.made[job.job_id] = variant
        outcome = Outcome({"accuracy": 0.96}, [self.made[job.job_id]])
        self.said = await conclude(outcome) if conclude else ""  # what `succeeded` would carry
        return outcome


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def plans(registry) -> FakePlans:
    return FakePlans(registry)


def registered(number: int) -> dict:
    return {"event": "registered", "name": "m", "version": number}


async def test_a_trained_version_is_compressed_by_the_policy_plan_and_the_pick_promoted(
    registry, plans
):
    decision = await Promoter(registry, plans).handle(registered(1))
    (job,) = plans.jobs
    assert job.job_id == "policy-m-1" and job.base == ModelRef("m", version=1)
    assert [p.method for p in job.plans] == ["quantize"]
    assert decision.version == 2 and registry.aliases == {"production": 2}
    (move,) = registry.moves
    assert move.reason == (
        "promoter (policy v2): smallest within 1.0 point of v1's 0.960: v2 int8 0.955"
    )


async def test_a_repeated_event_registers_nothing_and_moves_nothing_twice(registry, plans):
    promoter = Promoter(registry, plans)
    await promoter.handle(registered(1))
    await promoter.handle(registered(1))
    assert len(registry.versions) == 2
    assert len(registry.moves) == 1


async def test_a_variants_own_registered_event_starts_no_plan(registry, plans):
    registry.versions[2] = version(2, "quantize", 300, 0.955, fmt="int8")
    assert await Promoter(registry, plans).handle(registered(2)) is None
    assert plans.jobs == [] and registry.moves == []


async def test_a_model_without_a_policy_is_left_alone(registry, plans):
    registry.policy = None
    assert await Promoter(registry, plans).handle(registered(1)) is None
    assert plans.jobs == []


async def test_a_policy_set_after_the_version_was_registered_does_not_apply_to_it(registry, plans):
    registry.policy = replace(registry.policy, created_ms=5000)
    registry.earlier[1] = replace(registry.earlier[1], created_ms=4000)
    assert await Promoter(registry, plans).handle(registered(1)) is None
    assert plans.jobs == []


async def test_a_version_read_after_its_policy_changed_gets_the_policy_it_was_registered_under(
    registry, plans
):
    staging = {"promote": {"alias": "staging", "rule": "best_accuracy"}}
    registry.policy = replace(registry.policy, version=3, document=staging, created_ms=5000)
    registry.earlier[2] = PolicyVersion("m", 2, POLICY, "admin", 900)  # in force at 1001
    decision = await Promoter(registry, plans).handle(registered(1))
    assert [job.job_id for job in plans.jobs] == ["policy-m-1"]
    assert decision.version == 2 and registry.aliases == {"production": 2}
    assert registry.moves[0].reason.startswith("promoter (policy v2)")


async def test_alias_events_and_deleted_versions_are_ignored(registry, plans):
    promoter = Promoter(registry, plans)
    assert await promoter.handle({"event": "alias-set", "name": "m", "alias": "x"}) is None
    assert await promoter.handle(registered(9)) is None
    assert plans.jobs == []


async def test_a_policy_without_a_plan_promotes_the_registered_version_itself(registry, plans):
    registry.policy = replace(
        registry.policy, document={"promote": {"alias": "staging", "rule": "best_accuracy"}}
    )
    decision = await Promoter(registry, plans).handle(registered(1))
    assert plans.jobs == []
    assert decision.version == 1 and registry.aliases == {"staging": 1}


async def test_nothing_moves_when_no_candidate_meets_the_requirement(registry, plans):
    strict = {**POLICY, "promote": {**POLICY["promote"], "require": {"accuracy": 0.99}}}
    registry.policy = replace(registry.policy, document=parse_policy(strict).to_doc())
    decision = await Promoter(registry, plans).handle(registered(1))
    assert decision.version is None and registry.moves == []
    assert plans.said == (
        "promotion: m@production stays: no candidate meets require.accuracy >= 0.990"
    )


async def test_the_plans_job_ends_saying_where_the_alias_moved(registry, plans):
    await Promoter(registry, plans).handle(registered(1))
    assert plans.said.startswith("promotion: m@production -> 2: smallest within 1.0 point")


async def test_a_cancelled_policy_plan_promotes_nothing(registry, plans):
    async def cancelled(job: CompressJob, *, conclude=None, wanted=None) -> Outcome:
        return Outcome({}, [], cancelled=True)

    plans.run = cancelled
    assert await Promoter(registry, plans).handle(registered(1)) is None
    assert registry.aliases == {} and registry.moves == []


async def test_an_old_versions_event_read_again_does_not_roll_a_newer_promotion_back(
    registry, plans
):
    promoter = Promoter(registry, plans)
    await promoter.handle(registered(1))  # v2: int8 of v1, promoted
    registry.versions[3] = version(3, "train", 1000, 0.97)
    await promoter.handle(registered(3))  # v4: int8 of v3, promoted
    assert registry.aliases == {"production": 4}
    decision = await promoter.handle(registered(1))
    assert registry.aliases == {"production": 4} and len(registry.moves) == 2
    assert decision.version is None and "from v3, registered after v1" in decision.reason


async def test_a_variant_deleted_while_its_plan_ran_is_no_candidate(registry, plans):
    class DeletingPlans(FakePlans):
        async def run(self, job: CompressJob, *, conclude=None, wanted=None) -> Outcome:
            async def deleted_then_concluded(outcome: Outcome) -> str:
                for variant in outcome.versions:
                    del self.registry.versions[variant.version]  # deleted by hand meanwhile
                return await conclude(outcome)

            return await super().run(job, conclude=deleted_then_concluded, wanted=wanted)

    decision = await Promoter(registry, DeletingPlans(registry)).handle(registered(1))
    assert decision.version == 1 and registry.aliases == {"production": 1}


async def test_a_cleared_policy_leaves_new_versions_alone(registry, plans):
    registry.policy = replace(registry.policy, document={})
    assert await Promoter(registry, plans).handle(registered(1)) is None
    assert plans.jobs == [] and registry.moves == []


class MeanwhilePlans(FakePlans):
    """Runs ``meanwhile`` while the plan runs, as a person acting during a long plan would."""

    def __init__(self, registry: FakeRegistry, meanwhile) -> None:
        super().__init__(registry)
        self.meanwhile = meanwhile

    async def run(self, job: CompressJob, *, conclude=None, wanted=None) -> Outcome:
        async def after_meanwhile(outcome: Outcome) -> str:
            self.meanwhile(self.registry)
            return await conclude(outcome)

        return await super().run(job, conclude=after_meanwhile, wanted=wanted)


async def test_an_alias_moved_by_hand_while_the_plan_ran_stays_where_it_was_put(registry):
    plans = MeanwhilePlans(registry, lambda registry: registry.by_hand("production", 1))
    decision = await Promoter(registry, plans).handle(registered(1))
    assert registry.aliases == {"production": 1} and len(registry.moves) == 1
    assert decision.reason == (
        "admin moved it after v1 was registered (pinned by hand): a move by hand stands"
    )


async def test_a_hand_rollback_is_not_undone_when_the_versions_event_is_read_again(registry, plans):
    promoter = Promoter(registry, plans)
    await promoter.handle(registered(1))  # production -> 2, int8 of v1
    registry.by_hand("production", 1, "rollback: v2 is bad")
    decision = await promoter.handle(registered(1))  # a redelivery, a replay
    assert registry.aliases == {"production": 1} and decision.version is None
    assert "(rollback: v2 is bad): a move by hand stands" in decision.reason


async def test_a_move_by_hand_before_the_version_was_registered_does_not_hold_it_back(
    registry, plans
):
    registry.by_hand("production", 1)
    registry.versions[3] = replace(version(3, "train", 1000, 0.97), created_ms=registry.clock + 1)
    decision = await Promoter(registry, plans).handle(registered(3))
    assert decision.version == 4 and registry.aliases == {"production": 4}


async def test_a_policy_cleared_while_the_plan_ran_promotes_nothing(registry):
    def clear(registry):
        registry.policy = PolicyVersion("m", 3, {}, "admin", 5000)

    plans = MeanwhilePlans(registry, clear)
    decision = await Promoter(registry, plans).handle(registered(1))
    assert registry.moves == [] and decision.reason == "the policy was cleared while the plan ran"
    assert plans.said == "promotion: m@production stays: the policy was cleared while the plan ran"


async def test_a_version_not_yet_reached_when_its_policy_was_cleared_has_its_plan_cancelled(
    registry, plans
):
    registry.earlier[2] = registry.policy  # in force when v1 was registered
    registry.policy = PolicyVersion("m", 3, {}, "admin", 5000)
    assert await Promoter(registry, plans).handle(registered(1)) is None
    assert plans.said == "the policy of m was cleared" and plans.made == {}
    assert registry.moves == []


async def test_a_plan_whose_policy_is_cleared_before_its_turn_ends_cancelled_saying_so(
    registry, plans
):
    class ClearedWhileQueued(FakePlans):
        async def run(self, job: CompressJob, *, conclude=None, wanted=None) -> Outcome:
            self.registry.policy = PolicyVersion("m", 3, {}, "admin", 5000)  # while it waited
            return await super().run(job, conclude=conclude, wanted=wanted)

    plans = ClearedWhileQueued(registry)
    assert await Promoter(registry, plans).handle(registered(1)) is None
    assert plans.said == "the policy of m was cleared" and plans.made == {}
