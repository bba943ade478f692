"""bench.serve_peers: a peer that cannot run is reported as not run, with the reason."""

from pathlib import Path

import pytest

from bench.serve_peers import go_floor_peer


def test_a_go_floor_without_a_go_command_is_reported_as_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))

    with go_floor_peer(tmp_path, tmp_path / "cache") as started:
        assert isinstance(started, str)
        assert started.startswith("not run: the Go no-op server could not be built")
    assert not list((tmp_path / "cache").glob("bench-noop-go-*"))
