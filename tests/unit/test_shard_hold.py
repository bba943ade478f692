"""A shard holds a version back while its newest durable checkpoint is too far behind: the
bound on what workers keep for a replay (``held_back``)."""

from services.aggregator.shard_job import held_back


def test_versions_within_two_checkpoint_intervals_of_the_durable_one_go_out() -> None:
    assert not held_back(version=40, durable=0, checkpoint_every=20)
    assert not held_back(version=61, durable=21, checkpoint_every=20)


def test_a_version_past_two_intervals_is_held() -> None:
    assert held_back(version=41, durable=0, checkpoint_every=20)


def test_a_landed_checkpoint_releases_the_held_version() -> None:
    assert held_back(version=41, durable=0, checkpoint_every=20)
    assert not held_back(version=41, durable=20, checkpoint_every=20)


def test_checkpointing_every_step_holds_a_version_two_past_the_durable_one() -> None:
    assert not held_back(version=2, durable=0, checkpoint_every=1)
    assert held_back(version=3, durable=0, checkpoint_every=1)
