"""When a stopped process counts as gone: only once it has finished exiting, not while it still
frees its memory (its command line then reads empty, though it runs)."""

from __future__ import annotations

import sys

import pytest

from infra import proc

MARKER = "/state/stack"


@pytest.mark.parametrize(
    ("seen", "gone"),
    [
        (("S", f"python -m services.inference {MARKER}"), False),
        (("R", ""), False),  # exiting: its memory is being freed
        (("Z", ""), True),
        (None, True),
        (("S", "bash -c something-else"), True),  # the pid went to another process
    ],
)
def test_a_signalled_process_is_gone_only_once_it_has_exited(monkeypatch, seen, gone):
    monkeypatch.setattr(proc, "_process", lambda pid: seen)
    assert proc._gone(1234, MARKER) is gone


def test_a_process_reading_an_empty_command_line_is_not_taken_for_ours(monkeypatch):
    monkeypatch.setattr(proc, "_process", lambda pid: ("S", ""))
    assert not proc._is_ours(1234, MARKER)


def test_start_returns_only_once_the_child_runs_its_own_program(tmp_path, monkeypatch):
    # Before its exec the child shows the exit recorder's command line, during it an empty one:
    # start() returning then would let the next alive() call a starting process dead.
    marker = str(tmp_path / "marker")
    argv = [sys.executable, "-c", "import time; time.sleep(60)", marker]
    real = proc._process
    looks: list[int] = []

    def exec_under_way(pid: int) -> tuple[str, str] | None:
        looks.append(pid)
        if len(looks) == 1:
            return ("S", f"/bin/sh -c record-exit sleeper s.pid {' '.join(argv)}")
        if len(looks) <= 3:
            return ("R", "")
        return real(pid)

    sleeper = proc.ManagedProcess("sleeper", tmp_path / "s.pid", tmp_path / "s.log", marker)
    monkeypatch.setattr(proc, "_process", exec_under_way)
    try:
        sleeper.start(argv, cwd=tmp_path)
        assert sleeper.alive()
    finally:
        monkeypatch.setattr(proc, "_process", real)
        sleeper.stop(timeout_s=5)
