"""A pool member id is leased by heartbeats: the process that started first keeps it."""

from __future__ import annotations

from maas.training.control import Identity, member_event


def test_a_newer_process_under_a_held_id_is_fenced_naming_the_holder() -> None:
    holder = Identity("w-1", "worker", incarnation="aaa", since=1000)
    newcomer = Identity("w-1", "worker", incarnation="bbb", since=2000)
    reason = newcomer.fenced_by(member_event(holder, "up"))
    assert reason is not None
    assert "'w-1' is held by another process" in reason and "incarnation aaa" in reason
    assert "MAAS_MEMBER_ID" in reason


def test_the_holder_is_not_fenced_by_a_newer_process() -> None:
    holder = Identity("w-1", "worker", incarnation="aaa", since=1000)
    newcomer = Identity("w-1", "worker", incarnation="bbb", since=2000)
    assert holder.fenced_by(member_event(newcomer, "up")) is None


def test_its_own_heartbeats_and_other_ids_fence_nobody() -> None:
    me = Identity("w-1", "worker")
    assert me.fenced_by(member_event(me, "up")) is None
    other = Identity("w-2", "worker", since=0)
    assert me.fenced_by(member_event(other, "up")) is None


def test_a_tie_in_start_time_is_broken_by_incarnation() -> None:
    first = Identity("w-1", "worker", incarnation="aaa", since=1000)
    second = Identity("w-1", "worker", incarnation="bbb", since=1000)
    assert second.fenced_by(member_event(first, "up")) is not None
    assert first.fenced_by(member_event(second, "up")) is None


def test_a_generated_id_is_not_fenced_by_a_record_claiming_it() -> None:
    # Generated ids hold the pid and a random part: no other process holds one. A forged `up`
    # with an older `since` stopped such a worker for good (nothing restarts it).
    mine = Identity("host-123-ab12", "worker", incarnation="bbb", since=2000, chosen=False)
    forged = Identity("host-123-ab12", "worker", incarnation="forged", since=0)
    assert mine.fenced_by(member_event(forged, "up")) is None
