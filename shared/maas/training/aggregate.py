"""One aggregator shard's job state: admit gradients, reduce them, apply the optimizer.

``ShardCore`` is plain Python with time passed in, so every rule is unit-testable:

- **sync**: a step closes when ``ceil(quorum * members)`` of the job's current members reported.
  With ``quorum`` 1.0 nothing else closes it: a slow worker is waited for, and a dead one leaves
  only by being removed from the members explicitly (``remove``, on a heartbeat timeout), which
  the service records in the job's status. Below 1.0 the step deadline also closes a step that
  has at least one gradient. A gradient for an older version is stale and dropped; a second one
  from the same worker is a duplicate.
- **local_sgd**: steps close like sync ones, but a contribution is a worker's parameter delta
  after ``sync_every`` local steps, and closing adds the mean delta to the parameters (the
  workers' models averaged; no optimizer here, each worker keeps its own).
- **async**: a gradient is applied on arrival unless it was computed on a version more than
  ``staleness`` behind; a worker's gradients must come in increasing version order, so a replayed
  one is a duplicate.
- A gradient for a *newer* version than the shard holds arrives when a restarted shard is sent
  again what workers kept since its checkpoint: it is held until its version comes up.
- A worker that can only push from a later version on (``defer``: it took its rank over after
  the checkpoint this shard restarted from, and its predecessor's pushes died with it) is not
  waited for until the shard reaches that version; when no member is left to wait for, the
  versions up to the nearest such one close empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from maas.errors import InvalidArgument
from maas.training.codecs import Decoded, DenseGradient, axpy
from maas.training.optim import Optimizer, make_optimizer
from maas.training.plan import JobPlan


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    EARLY = "early"  # held until the shard reaches its version (replay after a restart)


@dataclass(frozen=True)
class Contribution:
    """One worker's gradient for one shard; ``decode`` runs only if it is used."""

    worker: int
    version: int
    samples: int
    decode: Callable[[], Decoded]
    loss: float | None = None
    accuracy: float | None = None


class GradientSum:
    """The running sum of a step's gradients, in as few passes over memory as possible.

    The first gradient is only held (a view into its message); the second is added to it in one
    three-operand pass; later ones are added in place. With a single contribution nothing is
    copied at all: the optimizer reads the message's bytes directly.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0
        self._first: Decoded | None = None
        self._acc: np.ndarray | None = None

    def _buffer(self) -> np.ndarray:
        if self._acc is None:
            self._acc = np.empty(self.size, dtype=np.float32)
        return self._acc

    def add(self, grad: Decoded) -> None:
        if grad.size != self.size:
            raise InvalidArgument(f"gradient has {grad.size} values, the partition {self.size}")
        if self.count == 0:
            self._first = grad
        elif self._first is not None:
            first, self._first = self._first, None
            acc = self._buffer()
            if _plain(first) and _plain(grad):
                np.add(first.values, grad.values, out=acc)  # type: ignore[union-attr]
            else:
                first.write_to(acc)
                grad.add_to(acc)
        else:
            grad.add_to(self._buffer())
        self.count += 1

    def add_to(self, target: np.ndarray, alpha: float) -> None:
        """``target += alpha * sum`` in one pass."""
        if self._first is not None:
            self._first.add_to(target, alpha)
        elif self.count:
            axpy(target, self._buffer(), alpha)

    def materialize(self, alpha: float) -> np.ndarray:
        """``alpha * sum`` in a buffer the caller may overwrite until ``reset``."""
        acc = self._buffer()
        if self._first is not None:
            self._first.write_to(acc, alpha)
            self._first = None
        elif self.count == 0:
            acc.fill(0.0)
        elif alpha != 1.0:
            acc *= np.float32(alpha)
        return acc

    def reset(self) -> None:
        self.count = 0
        self._first = None


def _plain(grad: Decoded) -> bool:
    return isinstance(grad, DenseGradient) and grad.scale == 1.0 and grad.values.dtype == np.float32


@dataclass(frozen=True)
class SyncRule:
    quorum: float
    deadline_ms: int

    def need(self, members: int) -> int:
        # The epsilon keeps 0.5 * 2 == 1 from becoming 2 through float rounding.
        return max(1, min(members, math.ceil(self.quorum * members - 1e-9)))

    def ready(self, count: int, members: int, opened_ms: int, now_ms: int) -> bool:
        if count >= self.need(members):
            return True
        # Full quorum means every member: only removing one (explicitly) lets a step close.
        late = self.quorum < 1.0 and now_ms - opened_ms >= self.deadline_ms
        return count > 0 and late


def accepts_staleness(grad_version: int, current: int, staleness: int) -> bool:
    """Async rule: apply a gradient computed at most ``staleness`` versions ago."""
    return current - grad_version <= staleness


@dataclass
class ShardStats:
    """What progress reports need: samples applied, and the loss/accuracy workers saw."""

    samples: int = 0
    window_samples: int = 0
    window_loss: list[float] = field(default_factory=list)
    window_accuracy: list[float] = field(default_factory=list)

    def record(self, c: Contribution) -> None:
        self.samples += c.samples
        self.window_samples += c.samples
        if c.loss is not None:
            self.window_loss.append(c.loss)
        if c.accuracy is not None:
            self.window_accuracy.append(c.accuracy)

    def take_window(self) -> dict[str, float]:
        """Mean loss/accuracy and samples since the last call."""
        out: dict[str, float] = {"samples": float(self.window_samples)}
        if self.window_loss:
            out["loss"] = float(np.mean(self.window_loss))
        if self.window_accuracy:
            out["accuracy"] = float(np.mean(self.window_accuracy))
        self.window_samples = 0
        self.window_loss.clear()
        self.window_accuracy.clear()
        return out


@dataclass(frozen=True)
class ShardSnapshot:
    """A shard's durable state: enough to resume exactly at ``version``."""

    version: int
    theta: np.ndarray
    optimizer_scalars: dict[str, Any]
    optimizer_arrays: dict[str, np.ndarray]
    last_version: dict[int, int]  # async: newest gradient version seen per worker
    samples: int


class ShardCore:
    def __init__(
        self, plan: JobPlan, shard: int, theta: np.ndarray, *, now_ms: int, version: int = 0
    ) -> None:
        self.plan = plan
        self.shard = shard
        self.partition = plan.partitions[shard]
        if theta.shape != (self.partition.size,):
            raise InvalidArgument(
                f"shard {shard} parameters have shape {theta.shape}, the plan says "
                f"({self.partition.size},)"
            )
        self.theta = np.array(theta, dtype=np.float32, copy=True)
        self.version = version
        self.optimizer: Optimizer = make_optimizer(plan.training.optimizer, self.partition.size)
        self.stats = ShardStats()
        self.opened_ms = now_ms
        t = plan.training
        self._sync = SyncRule(t.quorum, t.step_deadline_ms)
        self.members: set[int] = set(range(plan.workers))
        self._scale_mean = t.reduce == "mean"
        self._sum = GradientSum(self.partition.size)
        self._round: dict[int, Contribution] = {}
        # version -> worker -> its early gradient (one per worker and version: the first counts)
        self._held: dict[int, dict[int, Contribution]] = {}
        self._deferred: dict[int, int] = {}  # worker -> the version it is a member again from
        self._last_version: dict[int, int] = {}

    # --- state ----------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.version >= self.plan.target_version

    @property
    def round_size(self) -> int:
        return len(self._round)

    @property
    def held_count(self) -> int:
        """Early gradients waiting for their version."""
        return sum(len(by_worker) for by_worker in self._held.values())

    def snapshot(self) -> ShardSnapshot:
        """The durable state as *views*: encode it before the core changes (no await between).

        Not copying keeps a checkpoint of a large partition from doubling the shard's memory.
        """
        scalars, arrays = self.optimizer.state()
        return ShardSnapshot(
            version=self.version,
            theta=self.theta,
            optimizer_scalars=dict(scalars),
            optimizer_arrays=dict(arrays),
            last_version=dict(self._last_version),
            samples=self.stats.samples,
        )

    @classmethod
    def restore(cls, plan: JobPlan, shard: int, snap: ShardSnapshot, *, now_ms: int) -> ShardCore:
        core = cls(plan, shard, snap.theta, now_ms=now_ms, version=snap.version)
        core.optimizer.load_state(snap.optimizer_scalars, snap.optimizer_arrays)
        core._last_version = dict(snap.last_version)
        core.stats.samples = snap.samples
        return core

    # --- gradients ------------------------------------------------------------------------------

    def offer(self, c: Contribution, now_ms: int) -> Verdict:
        if self.done:
            return Verdict.STALE
        if self.plan.training.mode == "async":
            return self._offer_async(c, now_ms)
        return self._offer_sync(c, now_ms)

    def tick(self, now_ms: int) -> bool:
        """Close a sync step that is ready (deadline, fewer members); True if it advanced."""
        if (
            self.plan.training.mode != "async"
            and self._round
            and not self.done
            and self._sync.ready(len(self._round), len(self.members), self.opened_ms, now_ms)
        ):
            self._close(now_ms)
            return True
        return False

    def add(self, worker: int) -> bool:
        """Make ``worker`` a member from the open step on (a deferred one from its version);
        True if it was not one."""
        if worker in self.members or worker in self._deferred:
            return False
        self.members.add(worker)
        return True

    def remove(self, worker: int, now_ms: int) -> bool:
        """Stop waiting for ``worker``; True if it was a member. A gradient it already sent for
        the open step still counts; the step closes now if the others are all in."""
        self._deferred.pop(worker, None)
        if worker not in self.members:
            return False
        self.members.discard(worker)
        self.tick(now_ms)
        self._skip_unpushable(now_ms)
        return True

    def defer(self, worker: int, version: int, now_ms: int) -> bool:
        """``worker`` can push from ``version`` on only: not waited for (nor heard) before it,
        a member again from it. True if that leaves this shard's versions up to it without the
        worker (sync and local SGD; async waits for nobody)."""
        if version <= self.version or self.plan.training.mode == "async":
            self._deferred.pop(worker, None)
            return False
        self._deferred[worker] = version
        self.members.discard(worker)
        self.tick(now_ms)
        self._skip_unpushable(now_ms)
        return True

    def deferred(self, worker: int) -> int | None:
        """The version ``worker`` is waited for again from, if it is deferred."""
        return self._deferred.get(worker)

    def undefer(self, worker: int) -> None:
        """Forget ``worker``'s deferral (``add`` makes it a member again)."""
        self._deferred.pop(worker, None)

    def _skip_unpushable(self, now_ms: int) -> None:
        """No member is left to push the open step and every rank waits for a later version:
        the versions before the nearest one close empty (nothing to apply)."""
        if self.members or self._round or not self._deferred or self.done:
            return
        self.version = min(min(self._deferred.values()), self.plan.target_version)
        self.opened_ms = now_ms
        for version in [v for v in self._held if v < self.version]:
            del self._held[version]
        self._reached(now_ms)

    def _reached(self, now_ms: int) -> None:
        """The version moved: deferred workers due are members again, early gradients for it
        are offered."""
        for worker, version in list(self._deferred.items()):
            if version <= self.version:
                del self._deferred[worker]
                self.members.add(worker)
        for c in self._held.pop(self.version, {}).values():
            self.offer(c, now_ms)

    def _offer_sync(self, c: Contribution, now_ms: int) -> Verdict:
        if c.version < self.version:
            return Verdict.STALE
        if c.version > self.version:
            self._held.setdefault(c.version, {}).setdefault(c.worker, c)
            return Verdict.EARLY
        if c.worker in self._round:
            return Verdict.DUPLICATE
        if c.worker in self._deferred:
            return Verdict.STALE  # before the version it said it pushes from
        self.members.add(c.worker)  # a removed worker that is back counts again
        self._sum.add(c.decode())
        self._round[c.worker] = c
        if self._sync.ready(len(self._round), len(self.members), self.opened_ms, now_ms):
            self._close(now_ms)
        return Verdict.ACCEPTED

    def _offer_async(self, c: Contribution, now_ms: int) -> Verdict:
        if c.version <= self._last_version.get(c.worker, -1):
            return Verdict.DUPLICATE
        if c.version > self.version:
            self._held.setdefault(c.version, {}).setdefault(c.worker, c)
            return Verdict.EARLY
        self._last_version[c.worker] = c.version
        if not accepts_staleness(c.version, self.version, self.plan.training.staleness):
            return Verdict.STALE
        self._sum.add(c.decode())
        self._round[c.worker] = c
        self._close(now_ms)
        return Verdict.ACCEPTED

    def _close(self, now_ms: int) -> None:
        count = self._sum.count
        if self.plan.training.mode == "local_sgd":
            self._sum.add_to(self.theta, 1.0 / count)
        else:
            self.optimizer.step(self.theta, self._sum, 1.0 / count if self._scale_mean else 1.0)
        for c in self._round.values():
            self.stats.record(c)
        self._sum.reset()
        self._round.clear()
        self.version += 1
        self.opened_ms = now_ms
        self._reached(now_ms)
