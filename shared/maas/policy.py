"""Model policies: what happens when a model gets a new version, and which version an alias gets.

A policy is stored per model in the registry (each set makes a new policy version):

    on_registered:                  # a train/finetune/import version was registered
      compress:
        methods: [{quantize: {dtype: int8}}, {prune: {sparsity: 0.5}}]   # as in a compress job
    promote:                        # once those variants are registered (or at once, without)
      alias: production
      rule: smallest_within         # | best_accuracy | lowest_p50
      within: 0.01                  # smallest_within: accuracy it may lose (0.01 = 1 point)
      require: {accuracy: 0.9}      # no candidate below this is ever promoted

An empty document (``{}``, what ``maas models policy clear`` stores) is no policy: while it is
the current one no plan starts and no promotion is made (plans pending or running included);
the earlier policy versions stay in the history.

The candidates of a promotion are the registered version and the variants its plan made. Plain
Python: the registry validates policies with ``parse_policy`` (no torch) and the compressor's
promoter decides with ``choose``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maas import events
from maas.errors import InvalidArgument
from maas.names import check_alias

RULES = ("smallest_within", "best_accuracy", "lowest_p50")
DEFAULT_WITHIN = 0.01
P50_METRIC = "latency_b1_ms"  # the compressor's batch-1 median latency, measured in one run
ACTOR = "promoter"
_TOP_KEYS = ("on_registered", "promote")
_PROMOTE_KEYS = ("alias", "rule", "within", "require")
_REQUIRE_KEYS = ("accuracy",)


POLICY_JOB_PREFIX = "policy-"  # reserved: a job event may not take an id that starts so


def is_plan_id(job_id: object) -> bool:
    """Whether ``job_id`` has the form of a policy plan's id (reserved for the plans)."""
    return isinstance(job_id, str) and job_id.startswith(POLICY_JOB_PREFIX)


def policy_job_id(name: str, version: int) -> str:
    """The job id under which a policy's plan for ``name@version`` runs (and can be watched)."""
    return f"{POLICY_JOB_PREFIX}{name}-{version}"


@dataclass(frozen=True)
class Promote:
    alias: str
    rule: str
    within: float = DEFAULT_WITHIN
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Policy:
    compress_methods: tuple[dict[str, Any], ...] = ()  # empty: nothing to compress
    promote: Promote | None = None

    @property
    def cleared(self) -> bool:
        """Whether this policy does nothing (``maas models policy clear``)."""
        return not self.compress_methods and self.promote is None

    def to_doc(self) -> dict[str, Any]:
        """The document ``parse_policy`` reads back to an equal policy."""
        doc: dict[str, Any] = {}
        if self.compress_methods:
            doc["on_registered"] = {
                "compress": {"methods": [dict(m) for m in self.compress_methods]}
            }
        if self.promote is not None:
            p = self.promote
            promote: dict[str, Any] = {"alias": p.alias, "rule": p.rule}
            if p.rule == "smallest_within":
                promote["within"] = p.within
            if p.min_accuracy is not None:
                promote["require"] = {"accuracy": p.min_accuracy}
            doc["promote"] = promote
        return doc


def _keys(section: Any, where: str, known: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        raise InvalidArgument(f"{where} must be a map with keys {', '.join(known)}")
    unknown = sorted(str(k) for k in section if k not in known)
    if unknown:
        raise InvalidArgument(
            f"{where}.{unknown[0]} is not a policy key; accepted: {', '.join(known)}"
        )
    return section


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidArgument(f"{where} {value!r} is not accepted: give a number from 0 to 1")
    return float(value)


def _compress_methods(section: Any) -> tuple[dict[str, Any], ...]:
    """Judged by the compress job's own schema (one definition of a method)."""
    on_registered = _keys(section, "on_registered", ("compress",))
    if "compress" not in on_registered:
        raise InvalidArgument("on_registered needs compress: {methods: [...]}")
    probe = events.new_event(
        events.JOB, job_id="policy", type="compress", base={"name": "policy"},
        compress=on_registered["compress"],
    )  # fmt: skip
    try:
        events.validate(probe, events.JOB)
    except InvalidArgument as exc:
        raise InvalidArgument(f"on_registered.{exc.message}") from None
    return tuple(dict(m) for m in on_registered["compress"]["methods"])


def _promote(section: Any) -> Promote:
    promote = _keys(section, "promote", _PROMOTE_KEYS)
    alias = promote.get("alias")
    if alias is None:
        raise InvalidArgument("promote.alias is required: the alias to move, e.g. production")
    try:
        check_alias(alias)
    except InvalidArgument as exc:
        raise InvalidArgument(f"promote.{exc.message}") from None
    rule = promote.get("rule")
    if rule not in RULES:
        raise InvalidArgument(
            f"promote.rule {rule!r} is not accepted; use one of {', '.join(RULES)}"
        )
    if "within" in promote and rule != "smallest_within":
        raise InvalidArgument(f"promote.within only applies to rule smallest_within, not {rule}")
    within = _fraction(promote.get("within", DEFAULT_WITHIN), "promote.within")
    require = _keys(promote.get("require", {}), "promote.require", _REQUIRE_KEYS)
    accuracy = require.get("accuracy")
    floor = None if accuracy is None else _fraction(accuracy, "promote.require.accuracy")
    return Promote(alias, rule, within, floor)


def parse_policy(doc: Any) -> Policy:
    """A policy document -> a checked Policy, or InvalidArgument naming the field; ``{}`` is
    the cleared policy (nothing to compress, nothing to promote)."""
    doc = _keys(doc, "policy", _TOP_KEYS)
    methods = _compress_methods(doc["on_registered"]) if "on_registered" in doc else ()
    promote = _promote(doc["promote"]) if "promote" in doc else None
    return Policy(methods, promote)


# --- promotion -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A version as the rule sees it: its number, what made it, its size and measurements."""

    version: int
    label: str  # "train", "int8", "pruned", ... shown in the reason
    size_bytes: int
    metrics: Mapping[str, float]

    @property
    def accuracy(self) -> float | None:
        value = self.metrics.get("accuracy")
        return None if value is None or math.isnan(value) else float(value)

    def shown(self, metric: str = "accuracy") -> str:
        value = self.metrics.get(metric)
        number = "n/a" if value is None else f"{value:.3f}"
        return f"v{self.version} {self.label} {number}"


@dataclass(frozen=True)
class Decision:
    """What the rule picked (None: nothing qualifies) and why, in words for the alias history."""

    alias: str
    version: int | None
    reason: str


def _points(delta: float) -> str:
    return f"{delta * 100:.1f} point{'' if delta == 0.01 else 's'}"


def choose(promote: Promote, parent: Candidate, variants: Sequence[Candidate]) -> Decision:
    """Apply ``promote`` to the parent and its variants (pure, deterministic on ties: lower
    version first)."""
    pool = sorted([parent, *variants], key=lambda c: c.version)
    if promote.min_accuracy is not None:
        floor = promote.min_accuracy
        pool = [c for c in pool if (c.accuracy or 0.0) >= floor]
        if not pool:
            return Decision(
                promote.alias, None, f"no candidate meets require.accuracy >= {floor:.3f}"
            )
    pick, because = _RULES[promote.rule](promote, parent, pool)
    if pick is None:
        return Decision(promote.alias, None, because)
    return Decision(promote.alias, pick.version, f"{because}: {pick.shown(_METRIC[promote.rule])}")


Rule = Callable[[Promote, Candidate, Sequence[Candidate]], tuple[Candidate | None, str]]


def _smallest_within(
    promote: Promote, parent: Candidate, pool: Sequence[Candidate]
) -> tuple[Candidate | None, str]:
    base = parent.accuracy or 0.0
    floor = base - promote.within - 1e-9  # a drop of exactly `within` is allowed
    eligible = [c for c in pool if c.accuracy is not None and c.accuracy >= floor]
    where = f"within {_points(promote.within)} of v{parent.version}'s {base:.3f}"
    if not eligible:
        return None, f"no candidate {where}"
    return min(eligible, key=lambda c: c.size_bytes), f"smallest {where}"


def _best_accuracy(
    promote: Promote, parent: Candidate, pool: Sequence[Candidate]
) -> tuple[Candidate | None, str]:
    measured = [c for c in pool if c.accuracy is not None]
    if not measured:
        return None, "no candidate has an accuracy"
    return max(measured, key=lambda c: (c.accuracy, -c.size_bytes)), "best accuracy"


def _lowest_p50(
    promote: Promote, parent: Candidate, pool: Sequence[Candidate]
) -> tuple[Candidate | None, str]:
    timed = [c for c in pool if P50_METRIC in c.metrics]
    if not timed:
        return None, f"no candidate has {P50_METRIC}"
    return min(timed, key=lambda c: c.metrics[P50_METRIC]), "lowest p50 latency (batch 1, ms)"


_RULES: dict[str, Rule] = {
    "smallest_within": _smallest_within,
    "best_accuracy": _best_accuracy,
    "lowest_p50": _lowest_p50,
}
_METRIC = {"smallest_within": "accuracy", "best_accuracy": "accuracy", "lowest_p50": P50_METRIC}
