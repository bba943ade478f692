"""When a stopped process counts as gone: only once it has finished exiting, not while it still
frees its memory (its command line then reads empty, though it runs)."""

from __future__ import annotations

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
