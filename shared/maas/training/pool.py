"""The elastic training pool: which gradient workers and aggregator shards are alive, and which
job each one serves. Plain Python with time passed in; the coordinator drives it from the
training control topic (``maas.training.control``) and publishes what it decides.

Members have no fixed ids: each process names itself, says ``up`` on the control topic every
heartbeat period and ``down`` when it stops. One silent for the timeout is gone — unless the
whole topic was silent (the coordinator heartbeats to itself through it, so a broker outage is
not mistaken for the death of every member).

A job asks for ``workers`` ranks (data shards 0..W-1) and ``shards`` parameter partitions. It is
placed when at least ``min_workers`` workers are free (not serving another job) and one shard is
alive; until then it is queued, with the reason. Placing gives each rank a free worker (as many
as there are, up to ``workers``) and each partition the least-loaded live shard. Then, on every
``schedule``:

- a worker that went silent loses its rank (the job goes on without it);
- a vacant rank goes to a free worker (a worker that joins mid-job is added at the next step; its
  data shard is the rank's, so the job's data split never changes). While a rank is vacant its
  data shard is not trained on, and the job's status says so;
- a partition whose shard went silent moves to another live shard heard from within half a
  timeout (one about to time out too is no place to go), which resumes it from the partition's
  last checkpoint; with no such shard the partition waits, and the job's status says so once;
  one whose shard came back at another address (a restart within the timeout) gets the new
  address;
- a partition whose shard still says ``up`` but that no worker of the job can reach (every rank
  reported it, ``unreached``) moves too, and that shard gets no partition while it keeps that
  address: a heartbeat alone does not prove a data plane (a ghost member, a wrong advertised
  address).

Each change bumps the job's ``epoch``; members act on the newest epoch they saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from maas.errors import InvalidArgument
from maas.events import shown

WORKER = "worker"
SHARD = "shard"
KINDS = (WORKER, SHARD)


@dataclass
class Member:
    member_id: str
    kind: str
    address: str  # a shard's data-plane address; empty for a worker
    seen_ms: int


@dataclass
class Assignment:
    """Who serves one job: rank -> worker member, partition -> (shard member, its address)."""

    job_id: str
    epoch: int
    workers: dict[int, str]
    shards: dict[int, str]
    addresses: dict[int, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "epoch": self.epoch,
            "workers": [{"rank": r, "member": m} for r, m in sorted(self.workers.items())],
            "shards": [
                {"partition": p, "member": m, "address": self.addresses.get(p, "")}
                for p, m in sorted(self.shards.items())
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Assignment:
        shards = list(data["shards"])
        return cls(
            job_id=str(data["job_id"]),
            epoch=int(data["epoch"]),
            workers={int(w["rank"]): str(w["member"]) for w in data["workers"]},
            shards={int(s["partition"]): str(s["member"]) for s in shards},
            addresses={int(s["partition"]): str(s["address"]) for s in shards},
        )

    def rank_of(self, member_id: str) -> int | None:
        for rank, member in self.workers.items():
            if member == member_id:
                return rank
        return None

    def partitions_of(self, member_id: str) -> list[int]:
        return sorted(p for p, m in self.shards.items() if m == member_id)


@dataclass(frozen=True)
class Want:
    """What a job asks of the pool."""

    job_id: str
    workers: int
    shards: int
    min_workers: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.workers:
            raise InvalidArgument(
                f"training.min_workers={self.min_workers} must be in 1..training.workers "
                f"({self.workers})"
            )


def check_shard_address(address: str, what: str) -> str:
    """``host:port`` with a port a worker can dial, or InvalidArgument naming ``what``."""
    host, colon, port = address.rpartition(":")
    if not (colon and host and port.isdecimal() and 0 < int(port) < 65536):
        raise InvalidArgument(
            f"{what} is {shown(address)}; a shard's data-plane address is host:port, e.g. "
            "10.0.0.5:7070"
        )
    return address


@dataclass(frozen=True)
class Change:
    """What ``schedule`` decided for one job: it starts, its assignment moved, or it waits."""

    job_id: str
    kind: str  # "started" | "moved" | "queued" | "waiting" (a partition has no shard to go to)
    reason: str
    assignment: Assignment | None = None


@dataclass
class Pool:
    timeout_ms: int
    members: dict[str, Member] = field(default_factory=dict)
    running: dict[str, Assignment] = field(default_factory=dict)
    queue: dict[str, Want] = field(default_factory=dict)  # insertion order = arrival order
    control_ms: int = 0  # when the last record of any kind came from the control topic
    # Shards no worker could reach, with the address they could not be reached at.
    unreachable: dict[str, str] = field(default_factory=dict)
    now_ms: int = 0  # when members were last expired: "heard recently" is measured from it
    _wants: dict[str, Want] = field(default_factory=dict)
    _queued_reason: dict[str, str] = field(default_factory=dict)
    _stranded: set[tuple[str, int]] = field(default_factory=set)  # (job, partition) said to wait
    # (job, partition) -> rank -> when that rank's worker last said it cannot reach the shard
    _unreached: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)
    _gone_why: dict[str, str] = field(default_factory=dict)  # member -> why it left the pool

    # --- membership -------------------------------------------------------------------------

    def control_record(self, now_ms: int) -> None:
        """Any record read from the control topic (the coordinator's own heartbeat included).

        After a silence of the whole topic (the broker, or this reader, was away) every member
        gets a fresh timeout: nobody could be heard, so nobody is known to be gone.
        """
        if self.control_ms and now_ms - self.control_ms > self._quiet_ms:
            for member in self.members.values():
                member.seen_ms = max(member.seen_ms, now_ms)
        self.control_ms = now_ms

    @property
    def _quiet_ms(self) -> int:
        return self.timeout_ms // 2

    def heard(self, member_id: str, kind: str, address: str, now_ms: int) -> bool:
        """A member said ``up``; True if it is new to the pool."""
        if kind not in KINDS:
            raise InvalidArgument(f"member kind {kind!r} is unknown; use one of {KINDS}")
        if kind == SHARD:  # no worker could dial it: a partition placed there would wait
            check_shard_address(address, f"shard {shown(member_id)}'s address")
        known = self.members.get(member_id)
        self.members[member_id] = Member(member_id, kind, address, now_ms)
        if self.unreachable.get(member_id, address) != address:
            del self.unreachable[member_id]  # a new address may be reachable: try it again
        return known is None

    def left(self, member_id: str) -> None:
        if self.members.pop(member_id, None) is not None:
            self._gone_why[member_id] = "it said it is going down"
        self.unreachable.pop(member_id, None)

    def expire(self, now_ms: int) -> list[Member]:
        """Forget members silent for the timeout; the ones forgotten. While the control topic
        itself is silent nothing is forgotten (see ``control_record``)."""
        self.now_ms = now_ms
        if now_ms - self.control_ms > self._quiet_ms:
            return []
        gone = [m for m in self.members.values() if now_ms - m.seen_ms > self.timeout_ms]
        for member in gone:
            del self.members[member.member_id]
            self.unreachable.pop(member.member_id, None)
            self._gone_why[member.member_id] = "no heartbeat"
        return gone

    def alive(self, kind: str) -> list[str]:
        return sorted(m.member_id for m in self.members.values() if m.kind == kind)

    def usable_shards(self) -> list[str]:
        """Live shards, less those no worker could reach at the address they still give."""
        return [m for m in self.alive(SHARD) if self.unreachable.get(m) != self.members[m].address]

    def unreached(
        self, job_id: str, partition: int, shard: str, address: str, rank: int, now_ms: int
    ) -> None:
        """The worker of ``rank`` cannot reach ``shard`` at ``address`` for ``partition``. Only
        a report about the job's current assignment counts (one about a partition that has
        moved since is late, not news)."""
        a = self.running.get(job_id)
        if a is None or rank not in a.workers:
            return
        if a.shards.get(partition) != shard or a.addresses.get(partition) != address:
            return
        self._unreached.setdefault((job_id, partition), {})[rank] = now_ms

    def _nobody_reaches(self, a: Assignment, partition: int) -> bool:
        """Whether every rank of the job reported the partition's shard unreachable, within
        two timeouts of each other (workers repeat the report every timeout while it lasts; one
        worker's old report does not add up with another's new one). One worker that cannot
        reach a shard others reach is that worker's problem, not the shard's."""
        reports = self._unreached.get((a.job_id, partition), {})
        if not a.workers or not set(a.workers) <= reports.keys():
            return False
        times = [reports[rank] for rank in a.workers]
        return max(times) - min(times) <= 2 * self.timeout_ms

    def free_workers(self) -> list[str]:
        busy = {m for a in self.running.values() for m in a.workers.values()}
        return [m for m in self.alive(WORKER) if m not in busy]

    # --- jobs ---------------------------------------------------------------------------------

    def submit(self, want: Want) -> None:
        if want.job_id not in self.running:
            self.queue.setdefault(want.job_id, want)
        self._wants[want.job_id] = want

    def resume(self, assignment: Assignment, want: Want) -> None:
        """A job that was running before the coordinator restarted."""
        self.running[assignment.job_id] = assignment
        self._wants[assignment.job_id] = want
        self.queue.pop(assignment.job_id, None)

    def release(self, job_id: str) -> Assignment | None:
        self.queue.pop(job_id, None)
        self._wants.pop(job_id, None)
        self._queued_reason.pop(job_id, None)
        self._stranded = {k for k in self._stranded if k[0] != job_id}
        for key in [k for k in self._unreached if k[0] == job_id]:
            del self._unreached[key]
        return self.running.pop(job_id, None)

    def schedule(self) -> list[Change]:
        """Repair running jobs, then place queued ones in arrival order."""
        changes = [c for job_id in list(self.running) if (c := self._repair(job_id))]
        self._gone_why.clear()  # told by the repairs that needed it; the rest held no rank
        for want in list(self.queue.values()):
            change = self._place(want)
            if change is not None:
                changes.append(change)
        return changes

    def _repair(self, job_id: str) -> Change | None:
        a = self.running[job_id]
        want = self._wants[job_id]
        notes: list[str] = []
        for rank, member in sorted(a.workers.items()):
            if member not in self.members:
                del a.workers[rank]
                why = self._gone_why.pop(member, "no heartbeat")
                notes.append(f"worker {member} (rank {rank}) removed: {why}")
        free = self.free_workers()
        for rank in range(want.workers):
            if rank not in a.workers and free:
                a.workers[rank] = free.pop(0)
                notes.append(f"worker {a.workers[rank]} joined as rank {rank}")
        waits: list[str] = []
        for part in sorted(a.shards):
            if note := self._repair_partition(a, part, waits):
                notes.append(note)
        if notes:
            a.epoch += 1
            return Change(job_id, "moved", "; ".join(notes + waits + vacancies(a, want)), a)
        if waits:
            return Change(job_id, "waiting", "; ".join(waits))
        return None

    def _repair_partition(self, a: Assignment, part: int, waits: list[str]) -> str | None:
        """A note on how the partition moved, if it did; one that cannot move says why in
        ``waits``, once."""
        member = a.shards[part]
        why = ""
        if member in self.members:
            address = self.members[member].address
            if self._nobody_reaches(a, part):
                self.unreachable[member] = a.addresses.get(part, "")
                why = f" (no worker of the job could reach it at {self.unreachable[member]})"
            elif a.addresses.get(part) != address:  # restarted within the timeout
                a.addresses[part] = address
                self._unreached.pop((a.job_id, part), None)
                return f"partition {part}: shard {member} now serves at {address}"
            else:
                return None
        target = self._least_loaded_shard()
        key = (a.job_id, part)
        if target is None:  # the partition waits; workers keep their pushes for its next shard
            if key not in self._stranded:
                self._stranded.add(key)
                lost = f"is unreachable{why}" if why else "is gone (no heartbeat)"
                waits.append(
                    f"partition {part} waits for an aggregator shard: {member} {lost} and no "
                    "live shard can take it (`maas stack status` shows the shards)"
                )
            return None
        self._stranded.discard(key)
        a.shards[part], a.addresses[part] = target.member_id, target.address
        self._unreached.pop(key, None)
        return f"partition {part} moved from shard {member} to {target.member_id}{why}"

    def _place(self, want: Want) -> Change | None:
        free = self.free_workers()
        shards = self._targets()
        reason = ""
        if len(free) < want.min_workers:
            reason = (
                f"waiting for {want.min_workers} free gradient workers (training.min_workers); "
                f"the pool has {len(self.alive(WORKER))}, {len(free)} free"
            )
        elif not shards:
            reason = "waiting for an aggregator shard; none is alive"
            if self.unreachable:
                reason += f" that workers can reach (unreachable: {self._unreachable_list()})"
        if reason:
            if self._queued_reason.get(want.job_id) == reason:
                return None  # said already
            self._queued_reason[want.job_id] = reason
            return Change(want.job_id, "queued", reason)
        workers = dict(enumerate(free[: want.workers]))
        a = Assignment(want.job_id, 1, workers, {}, {})
        self.running[want.job_id] = a  # before picking shards: they count its partitions
        for part in range(want.shards):
            target = self._least_loaded_shard()
            assert target is not None  # shards is not empty
            a.shards[part], a.addresses[part] = target.member_id, target.address
        del self.queue[want.job_id]
        self._queued_reason.pop(want.job_id, None)
        started = "; ".join([f"{len(workers)} of {want.workers} workers", *vacancies(a, want)])
        return Change(want.job_id, "started", started, a)

    def _unreachable_list(self) -> str:
        return ", ".join(f"{m} at {addr}" for m, addr in sorted(self.unreachable.items()))

    def _targets(self) -> list[str]:
        """Shards a partition may go to: usable, and heard from within half a timeout (when
        several shards die together their timeouts run out one tick apart, and the first
        partition to move must not go to the next one to be declared gone)."""
        return [
            m
            for m in self.usable_shards()
            if self.now_ms - self.members[m].seen_ms <= self._quiet_ms
        ]

    def _least_loaded_shard(self) -> Member | None:
        load = {m: 0 for m in self._targets()}
        for a in self.running.values():
            for member in a.shards.values():
                if member in load:
                    load[member] += 1
        if not load:
            return None
        best = min(load, key=lambda m: (load[m], m))
        return self.members[best]


def vacancies(a: Assignment, want: Want) -> list[str]:
    """A note naming the job's vacant ranks, whose data shards go untrained while they are
    vacant (the split is by rank; see the module's docstring); none when every rank is held."""
    vacant = [rank for rank in range(want.workers) if rank not in a.workers]
    if not vacant:
        return []
    ranks = ", ".join(map(str, vacant))
    return [
        f"rank{'s' if len(vacant) > 1 else ''} {ranks} vacant: {len(vacant)}/{want.workers} of "
        "the training rows are not trained on until a gradient worker takes "
        f"{'them' if len(vacant) > 1 else 'it'}"
    ]
