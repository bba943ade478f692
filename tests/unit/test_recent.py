from __future__ import annotations

import pytest

from maas.recent import RecentKeys


def test_the_oldest_key_is_forgotten_past_the_limit() -> None:
    recent = RecentKeys(2)
    for key in ("a", "b", "c"):
        recent.add(key)
    assert "a" not in recent and "b" in recent and "c" in recent and len(recent) == 2


def test_a_key_added_again_counts_as_the_newest() -> None:
    recent = RecentKeys(2)
    for key in ("a", "b", "a", "c"):
        recent.add(key)
    assert "a" in recent and "b" not in recent


def test_a_limit_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        RecentKeys(0)
