"""The training pool's placement rules (maas.training.pool), with time passed in."""

from __future__ import annotations

import pytest

from maas.errors import InvalidArgument
from maas.training.pool import SHARD, WORKER, Assignment, Pool, Want

TIMEOUT = 1000


def pool_with(workers: int, shards: int = 1) -> Pool:
    pool = Pool(TIMEOUT)
    for w in range(workers):
        pool.heard(f"w{w}", WORKER, "", now_ms=0)
    for s in range(shards):
        pool.heard(f"s{s}", SHARD, f"10.0.0.{s}:7070", now_ms=0)
    return pool


def started(pool: Pool, job_id: str) -> Assignment:
    (change,) = [c for c in pool.schedule() if c.job_id == job_id]
    assert change.kind == "started" and change.assignment is not None
    return change.assignment


def test_two_jobs_get_disjoint_workers() -> None:
    pool = pool_with(4, shards=2)
    pool.submit(Want("a", workers=2, shards=2, min_workers=2))
    pool.submit(Want("b", workers=2, shards=2, min_workers=2))
    changes = {c.job_id: c.assignment for c in pool.schedule()}
    a, b = changes["a"], changes["b"]
    assert a is not None and b is not None
    assert len(set(a.workers.values()) | set(b.workers.values())) == 4


def test_partitions_spread_over_the_live_shards() -> None:
    pool = pool_with(2, shards=2)
    pool.submit(Want("a", workers=2, shards=2, min_workers=2))
    a = started(pool, "a")
    assert set(a.shards.values()) == {"s0", "s1"}
    assert a.addresses == {0: "10.0.0.0:7070", 1: "10.0.0.1:7070"}


def test_a_job_larger_than_the_free_pool_is_queued_with_the_reason_once() -> None:
    pool = pool_with(1)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    (change,) = pool.schedule()
    assert change.kind == "queued"
    assert "waiting for 2 free gradient workers" in change.reason and "1 free" in change.reason
    assert pool.schedule() == []  # not said again while nothing changed


def test_a_queued_job_starts_when_a_worker_joins() -> None:
    pool = pool_with(1)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    pool.schedule()
    pool.heard("w9", WORKER, "", now_ms=10)
    a = started(pool, "a")
    assert sorted(a.workers.values()) == ["w0", "w9"]


def test_min_workers_starts_a_job_short_and_fills_the_rank_later() -> None:
    pool = pool_with(1)
    pool.submit(Want("a", workers=2, shards=1, min_workers=1))
    a = started(pool, "a")
    assert a.workers == {0: "w0"}
    pool.heard("w1", WORKER, "", now_ms=10)
    (change,) = pool.schedule()
    assert change.kind == "moved" and change.assignment is not None
    assert change.assignment.workers == {0: "w0", 1: "w1"}
    assert change.assignment.epoch == 2
    assert "w1 joined as rank 1" in change.reason


def test_a_silent_worker_loses_its_rank_and_a_free_one_takes_it() -> None:
    pool = pool_with(3)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    a = started(pool, "a")
    lost = a.workers[1]
    for member in pool.alive(WORKER) + pool.alive(SHARD):
        if member != lost:
            pool.heard(member, pool.members[member].kind, pool.members[member].address, 900)
    pool.control_record(1400)  # the topic flows: the coordinator heard its own heartbeat
    assert [m.member_id for m in pool.expire(now_ms=1500)] == [lost]
    (change,) = pool.schedule()
    assert change.assignment is not None
    assert lost not in change.assignment.workers.values()
    assert set(change.assignment.workers) == {0, 1}
    assert f"worker {lost} (rank 1) removed: no heartbeat" in change.reason


def test_a_worker_that_said_down_is_removed_for_saying_so_not_for_silence() -> None:
    pool = pool_with(3)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    lost = started(pool, "a").workers[1]
    pool.left(lost)  # its `down` record
    (change,) = pool.schedule()
    assert f"worker {lost} (rank 1) removed: it said it is going down" in change.reason


def test_a_partition_of_a_silent_shard_moves_to_a_live_one() -> None:
    pool = pool_with(1, shards=1)
    pool.submit(Want("a", workers=1, shards=2, min_workers=1))
    a = started(pool, "a")
    assert set(a.shards.values()) == {"s0"}
    pool.left("s0")
    pool.heard("s7", SHARD, "h:1", now_ms=5)
    (change,) = pool.schedule()
    assert change.assignment is not None
    assert change.assignment.shards == {0: "s7", 1: "s7"}
    assert change.assignment.addresses == {0: "h:1", 1: "h:1"}


def test_released_workers_are_free_for_the_next_job() -> None:
    pool = pool_with(2)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    started(pool, "a")
    pool.submit(Want("b", workers=2, shards=1, min_workers=2))
    assert [c.kind for c in pool.schedule()] == ["queued"]
    pool.release("a")
    assert started(pool, "b").workers.keys() == {0, 1}


def test_an_assignment_survives_its_json_form() -> None:
    pool = pool_with(2, shards=2)
    pool.submit(Want("a", workers=2, shards=2, min_workers=2))
    a = started(pool, "a")
    assert Assignment.from_json(a.to_json()) == a


def test_min_workers_above_workers_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="min_workers=3 must be in 1..training.workers"):
        Want("a", workers=2, shards=1, min_workers=3)


def test_a_shard_back_at_a_new_address_within_the_timeout_is_dialled_there() -> None:
    pool = pool_with(1, shards=1)
    pool.submit(Want("a", workers=1, shards=1, min_workers=1))
    started(pool, "a")
    pool.heard("s0", SHARD, "10.0.0.0:9999", now_ms=5)
    (change,) = pool.schedule()
    assert change.assignment is not None and change.assignment.addresses == {0: "10.0.0.0:9999"}


def test_nobody_is_forgotten_while_the_control_topic_itself_is_silent() -> None:
    pool = pool_with(2)
    pool.control_record(0)
    assert pool.expire(now_ms=30_000) == []  # a broker outage is not every member's death


def test_after_a_silent_topic_every_member_gets_a_fresh_timeout() -> None:
    pool = pool_with(2)
    pool.control_record(0)
    pool.control_record(30_000)  # the first record after the outage
    assert pool.expire(now_ms=30_900) == []  # nobody said up yet, but they may be about to
    for now in (30_300, 30_600, 30_900):  # the coordinator's own heartbeats
        pool.control_record(now)
    pool.heard("w0", WORKER, "", now_ms=30_900)
    pool.control_record(31_200)
    assert sorted(m.member_id for m in pool.expire(now_ms=31_200)) == ["s0", "w1"]


def ghost_and_real_shard() -> tuple[Pool, Assignment]:
    """A job whose one partition went to ``s0`` (a member that says up but serves nothing)."""
    pool = pool_with(2, shards=2)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    a = started(pool, "a")
    assert a.shards == {0: "s0"}
    return pool, a


def test_a_partition_that_no_worker_can_reach_moves_and_its_shard_gets_no_more() -> None:
    pool, _ = ghost_and_real_shard()
    pool.unreached("a", 0, "s0", "10.0.0.0:7070", rank=0, now_ms=100)
    assert pool.schedule() == []  # one worker alone may be the one with the problem
    pool.unreached("a", 0, "s0", "10.0.0.0:7070", rank=1, now_ms=200)
    (change,) = pool.schedule()
    assert change.assignment is not None and change.assignment.shards == {0: "s1"}
    assert "partition 0 moved from shard s0 to s1" in change.reason
    assert "no worker of the job could reach it at 10.0.0.0:7070" in change.reason
    pool.submit(Want("b", workers=1, shards=1, min_workers=1))
    pool.heard("w5", WORKER, "", now_ms=300)
    assert started(pool, "b").shards == {0: "s1"}  # s1 carries two, s0 still none
    pool.heard("s0", SHARD, "10.0.0.9:7070", now_ms=400)  # back somewhere workers may reach
    assert "s0" in pool.usable_shards()


def test_reports_far_apart_or_about_an_older_assignment_move_nothing() -> None:
    pool, a = ghost_and_real_shard()
    pool.unreached("a", 0, "s0", "10.0.0.0:7070", rank=0, now_ms=0)
    pool.unreached("a", 0, "s0", "10.0.0.0:7070", rank=1, now_ms=2 * TIMEOUT + 1)
    assert pool.schedule() == []  # rank 0 said it long ago: it may reach s0 by now
    pool.unreached("a", 0, "s0", "10.0.0.8:7070", rank=0, now_ms=2 * TIMEOUT + 2)
    pool.unreached("a", 0, "s9", "10.0.0.0:7070", rank=0, now_ms=2 * TIMEOUT + 3)
    assert pool.schedule() == []  # neither is the partition's current shard and address
    assert a.shards == {0: "s0"}


def test_with_no_other_shard_an_unreachable_one_keeps_its_partition_and_says_so() -> None:
    pool = pool_with(2, shards=1)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    started(pool, "a")
    for rank in (0, 1):
        pool.unreached("a", 0, "s0", "10.0.0.0:7070", rank=rank, now_ms=10)
    (waiting,) = pool.schedule()  # nowhere to move it: it waits, and says so once
    assert (waiting.kind, waiting.assignment) == ("waiting", None)
    assert waiting.reason.startswith("partition 0 waits for an aggregator shard: s0 is unreachable")
    assert pool.schedule() == []
    pool.heard("w7", WORKER, "", now_ms=20)
    pool.submit(Want("b", workers=1, shards=1, min_workers=1))
    (change,) = pool.schedule()
    assert change.kind == "queued"
    assert "unreachable: s0 at 10.0.0.0:7070" in change.reason


def test_a_partition_whose_shard_is_gone_with_no_other_alive_waits_and_says_so_once() -> None:
    pool = pool_with(1, shards=1)
    pool.submit(Want("a", workers=1, shards=1, min_workers=1))
    started(pool, "a")
    pool.left("s0")
    (change,) = pool.schedule()
    assert (change.kind, change.assignment) == ("waiting", None)
    assert change.reason == (
        "partition 0 waits for an aggregator shard: s0 is gone (no heartbeat) and no live shard "
        "can take it (`maas stack status` shows the shards)"
    )
    assert pool.schedule() == []
    pool.heard("s1", SHARD, "h:1", now_ms=5)
    (moved,) = pool.schedule()
    assert moved.assignment is not None and moved.assignment.shards == {0: "s1"}


def test_a_partition_does_not_move_to_a_shard_about_to_time_out_too() -> None:
    # Two shards die together: s0's timeout runs out first, while s1's has a tick to go.
    pool = pool_with(1, shards=2)
    pool.submit(Want("a", workers=1, shards=1, min_workers=1))
    a = started(pool, "a")
    assert a.shards == {0: "s0"}
    pool.heard("s1", SHARD, "10.0.0.1:7070", now_ms=100)
    pool.heard("w0", WORKER, "", now_ms=1000)
    pool.control_record(1050)
    assert [m.member_id for m in pool.expire(now_ms=1050)] == ["s0"]
    (change,) = pool.schedule()
    assert change.kind == "waiting"  # not moved to s1, silent for 950 of its 1000 ms
    pool.heard("s1", SHARD, "10.0.0.1:7070", now_ms=1060)  # it was only late
    pool.expire(now_ms=1070)
    (moved,) = pool.schedule()
    assert moved.assignment is not None and moved.assignment.shards == {0: "s1"}


def test_a_job_started_short_names_its_vacant_ranks_and_their_untrained_rows() -> None:
    pool = pool_with(1)
    pool.submit(Want("a", workers=3, shards=1, min_workers=1))
    (change,) = pool.schedule()
    assert change.reason == (
        "1 of 3 workers; ranks 1, 2 vacant: 2/3 of the training rows are not trained on until "
        "a gradient worker takes them"
    )


def test_a_rank_left_vacant_by_a_lost_worker_is_named() -> None:
    pool = pool_with(2)
    pool.submit(Want("a", workers=2, shards=1, min_workers=1))
    started(pool, "a")
    pool.left("w1")
    (change,) = pool.schedule()
    assert change.reason.endswith(
        "rank 1 vacant: 1/2 of the training rows are not trained on until a gradient worker "
        "takes it"
    )


def test_the_coordinators_gauges_show_the_pool_jobs_and_free_workers() -> None:
    from prometheus_client import CollectorRegistry

    from services.aggregator.scheduler import PoolGauges

    registry = CollectorRegistry()
    pool = pool_with(3, shards=2)
    pool.submit(Want("a", workers=2, shards=1, min_workers=2))
    pool.submit(Want("b", workers=2, shards=1, min_workers=2))
    pool.schedule()
    PoolGauges(registry).observe(pool)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("maas_training_pool_jobs", state="running") == 1
    assert value("maas_training_pool_jobs", state="queued") == 1
    assert value("maas_training_pool_members", kind="worker") == 3
    assert value("maas_training_pool_members", kind="shard") == 2
    assert value("maas_training_pool_free_workers") == 1


@pytest.mark.parametrize("address", ["", "not a host:port", "host", ":7070", "h:0", "h:99999"])
def test_a_shard_heartbeat_without_an_address_workers_can_dial_is_refused(address: str) -> None:
    # Counted as a shard, it was given a partition that then waited ~11 s to move.
    pool = Pool(timeout_ms=1000)
    with pytest.raises(InvalidArgument, match="shard 'ghost'.s address is .*host:port"):
        pool.heard("ghost", SHARD, address, 0)
    assert pool.alive(SHARD) == []


def test_an_advertised_address_that_is_not_host_port_stops_the_shard_at_start() -> None:
    from services.aggregator.dataplane import advertised

    assert advertised("0.0.0.0:7070", 7070, "shard-1.example:7070") == "shard-1.example:7070"
    with pytest.raises(InvalidArgument, match="MAAS_AGGREGATOR_ADVERTISE is 'shard-1'"):
        advertised("0.0.0.0:7070", 7070, "shard-1")
