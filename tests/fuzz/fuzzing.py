"""How the fuzzers that collect examples up front draw them: generation only, no example
database, no deadline and no health checks (the examples then feed real servers)."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings


def drawing(count: int) -> settings:
    """Settings that draw up to ``count`` fresh examples per run of a ``@given`` function."""
    return settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
