"""The policy role of the compressor: ``registered`` events in, a compressed and promoted model out.

For a version made by train, finetune or import whose model has a policy (``maas.policy``) set
before the version was registered:
1. ``on_registered.compress``: the plan runs exactly as a compress job would (``Compressor.run``)
   under the job id ``policy-<name>-<version>``, so its statuses can be watched like any job's and
   a redelivered or repeated event registers nothing twice (the core skips the variants already
   registered for that job id).
2. ``promote``: the rule picks among the version and its variants (accuracy and latency as the
   compressor measured them in this run) and the alias moves with the reason in its history.
   A repeated event finds the alias already there and moves nothing; an old version's event
   read again (a redelivery, a replay) never moves an alias that points into a newer version's
   family; a move by hand after the version was registered stands; a variant deleted while the
   plan ran is no candidate.

Variants' own ``registered`` events are ignored, so a policy never feeds itself. Transport-neutral
like the core: the Kafka consumer lives in ``service.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from maas.errors import NotFound
from maas.policy import ACTOR, Candidate, Decision, Policy, choose, parse_policy, policy_job_id
from maas.registry.types import (
    PRIMARY_METHODS,
    AliasChange,
    ModelRef,
    ModelVersion,
    PolicyVersion,
)
from services.compressor.core import MAX_LINEAGE_DEPTH
from services.compressor.core_types import Conclude, Outcome, Wanted
from services.compressor.job import CompressJob, plan_job

log = logging.getLogger(__name__)


class PolicyRegistry(Protocol):
    """What the promoter needs of ``maas.registry.RegistryClient``."""

    async def get(self, ref: ModelRef | str) -> ModelVersion: ...

    async def get_policy(self, name: str, version: int | None = None) -> PolicyVersion: ...

    async def set_alias(
        self, name: str, alias: str, version: int, *, reason: str = ""
    ) -> AliasChange: ...

    async def alias_history(self, name: str, alias: str | None = None) -> list[AliasChange]: ...


def candidate(version: ModelVersion, measured: Mapping[str, float] | None = None) -> Candidate:
    """A version as a rule sees it; ``measured`` (this run's figures) wins over the recorded."""
    label = version.format if version.format != "dense" else (version.method or "train")
    return Candidate(
        version.version, label, version.size_bytes, {**version.metrics, **(measured or {})}
    )


class Plans(Protocol):
    """What the promoter needs of ``Compressor``: run a plan, registering each variant once,
    and conclude it (the promotion) before its job says succeeded."""

    async def run(
        self, job: CompressJob, *, conclude: Conclude | None = None, wanted: Wanted | None = None
    ) -> Outcome: ...


class Promoter:
    def __init__(self, registry: PolicyRegistry, compressor: Plans) -> None:
        self._registry = registry
        self._compressor = compressor

    async def handle(self, event: Mapping[str, Any]) -> Decision | None:
        """One ``maas.model/1`` event; None when it asks nothing of a policy."""
        if event.get("event") != "registered":
            return None
        found = await self._subject(str(event["name"]), int(event["version"]))
        if found is None:
            return None
        version, stored = found
        policy = parse_policy(stored.document)
        subject = _Subject(version, stored.version, policy)
        if not policy.compress_methods:
            return await self._promote(subject, Outcome(version.metrics, []))
        decided: list[Decision | None] = []

        async def promote(outcome: Outcome) -> str:
            decision = await self._promote(subject, outcome)
            decided.append(decision)
            return "" if decision is None else _said(version.name, decision)

        job = plan_job(
            policy_job_id(version.name, version.version), version.ref, policy.compress_methods
        )
        outcome = await self._compressor.run(job, conclude=promote, wanted=self._policy_on(version))
        # Cancelled: the plan stopped before its promotion, and nothing is promoted.
        return None if outcome.cancelled else decided[0]

    def _policy_on(self, version: ModelVersion) -> Wanted:
        """Asked before each of a plan's variants (and once its turn comes): a cleared policy
        ends the plan, so clearing stops plans queued or running too."""

        async def on() -> str:
            if _cleared(await self._registry.get_policy(version.name)):
                return f"the policy of {version.name} was cleared"
            return ""

        return on

    async def _subject(self, name: str, number: int) -> tuple[ModelVersion, PolicyVersion] | None:
        """The version and the policy that applies to it, if one does."""
        try:
            version = await self._registry.get(ModelRef(name, version=number))
        except NotFound:
            return None  # deleted since: nothing to do
        if (version.method or "train") not in PRIMARY_METHODS:
            return None  # a variant (maybe one a policy made)
        try:
            current = await self._registry.get_policy(name)
        except NotFound:
            return None
        # Cleared since? Its plan still starts, to end at once `cancelled` saying so (``wanted``):
        # whoever watches policy-NAME-VERSION learns why nothing came.
        policy = await self._in_force(current, version.created_ms)
        if policy is None:
            log.info("%s was registered before %s had a policy: none applies", version.ref, name)
            return None
        return version, policy

    async def _in_force(self, current: PolicyVersion, at_ms: int) -> PolicyVersion | None:
        """The policy version in force at ``at_ms`` (the newest set by then), None if there was
        none yet. ``current`` may have been set since: a version registered under the one
        before, and read late (a plan ahead of it, a restart), was left out."""
        if current.created_ms <= at_ms:
            return current
        found, low, high = None, 1, current.version - 1  # versions grow with created_ms
        while low <= high:
            middle = (low + high) // 2
            policy = await self._registry.get_policy(current.name, middle)
            if policy.created_ms <= at_ms:
                found, low = policy, middle + 1
            else:
                high = middle - 1
        return found

    async def _promote(self, subject: _Subject, outcome: Outcome) -> Decision | None:
        promote, parent = subject.policy.promote, subject.version
        if promote is None:
            return None
        where = f"{parent.name}@{promote.alias}"
        current = await self._current(parent.name, promote.alias)
        why_not = await self._stands_down(subject, current)
        if why_not:
            log.info("%s stays: %s", where, why_not)
            return Decision(promote.alias, None, why_not)
        live = [v for v in outcome.versions if await self._exists(v.ref)]
        decision = choose(
            promote, candidate(parent, outcome.parent_metrics), [candidate(v) for v in live]
        )
        if decision.version is None:
            log.info("%s stays: %s", where, decision.reason)
            return decision
        if current is not None and current.version == decision.version:
            log.info("%s already points at %s", where, decision.version)
            return decision
        reason = f"{ACTOR} (policy v{subject.policy_version}): {decision.reason}"
        try:
            await self._registry.set_alias(
                parent.name, promote.alias, decision.version, reason=reason
            )
        except NotFound as exc:  # the pick was deleted since it was seen
            log.warning("%s stays: its pick v%s is gone (%s)", where, decision.version, exc)
            return Decision(promote.alias, None, f"v{decision.version} was deleted")
        log.info("%s -> %s: %s", where, decision.version, reason)
        return decision

    async def _stands_down(self, subject: _Subject, current: ModelVersion | None) -> str:
        """Why the alias must stay where it is, "" when it may move: someone other than the
        promoter moved or split it after the version was registered (while its plan ran, or
        after it ran and its event is read again), or cleared the policy; or it points into a
        newer version's family."""
        version = subject.version
        changes = await self._registry.alias_history(version.name, subject.alias)
        by_hand = [c for c in changes if c.ts_ms > version.created_ms and not _promoters(c)]
        if by_hand:
            last = by_hand[-1]
            return (
                f"{last.actor} moved it after v{version.version} was registered "
                f"({last.reason or 'no reason given'}): a move by hand stands"
            )
        if _cleared(await self._registry.get_policy(version.name)):
            return "the policy was cleared while the plan ran"
        return await self._newer_family(version, current)

    async def _newer_family(self, subject: ModelVersion, current: ModelVersion | None) -> str:
        """Why the alias must stay where it is, if it points into the family (the version or
        its variants) of a version registered after ``subject``: an old ``registered`` event
        read again (a redelivery, a replay) rolled a newer promotion back. "" otherwise."""
        if current is None:
            return ""
        root = current
        for _ in range(MAX_LINEAGE_DEPTH):
            made_by = root.method or "train"
            if made_by in PRIMARY_METHODS or root.parent is None or root.parent.version is None:
                break
            if root.parent.name != root.name:
                break
            try:
                root = await self._registry.get(root.parent)
            except NotFound:
                return _newer(subject, current, root.parent.version)
        return _newer(subject, current, root.version)

    async def _exists(self, ref: ModelRef) -> bool:
        """Whether a variant is still registered (one may be deleted while its plan runs)."""
        try:
            await self._registry.get(ref)
        except NotFound:
            return False
        return True

    async def _current(self, name: str, alias: str) -> ModelVersion | None:
        try:
            return await self._registry.get(ModelRef(name, alias=alias))
        except NotFound:
            return None


@dataclass(frozen=True)
class _Subject:
    """A registered version and the policy that applies to it."""

    version: ModelVersion
    policy_version: int
    policy: Policy

    @property
    def alias(self) -> str:
        return self.policy.promote.alias if self.policy.promote else ""


def _promoters(change: AliasChange) -> bool:
    """Whether the promoter made ``change`` (its reasons start so; any other is by hand)."""
    return change.reason.startswith(f"{ACTOR} (policy v")


def _cleared(policy: PolicyVersion) -> bool:
    return parse_policy(policy.document).cleared


def _said(name: str, decision: Decision) -> str:
    """A promotion decision as the plan's job status says it."""
    where = f"{name}@{decision.alias}"
    if decision.version is None:
        return f"promotion: {where} stays: {decision.reason}"
    return f"promotion: {where} -> {decision.version}: {decision.reason}"


def _newer(subject: ModelVersion, current: ModelVersion, root: int) -> str:
    if root <= subject.version:
        return ""
    return (
        f"it points at v{current.version}, from v{root}, registered after v{subject.version}: "
        "an older version's event does not move it back"
    )
