"""Why a stack process that stopped on its own is down, read from its log: how it exited (the
exit recorder's line that ``infra.proc`` writes: a status, or the signal that killed it) and
the fatal line of its last moments, if any. ``maas stack status`` prints it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from infra.proc import RUN_EXITED, RUN_MARKER, RUN_STARTED, RUN_STOPPED
from maas.events import clip
from maas.lifecycle import is_kafka_client

# Signals another process sends (an operator, an OOM killer, a supervisor): a line the process
# logged before one is no reason it ended, however late (a job it refused a second before a
# SIGKILL was given as why it was killed).
SENT_BY_OTHERS = frozenset(
    f"killed by {sig.name}"
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
)


def why_down(log_file: Path, *, tail_bytes: int = 64 * 1024) -> str:
    """Why the log's latest run ended, for one that was not stopped on request: how it exited
    (its status, or the signal that killed it, as the exit recorder wrote it) and the fatal
    line of its last moments, if any (``last_words``). Runs before the latest say nothing."""
    try:
        with log_file.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - tail_bytes))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    run = latest_run(text.splitlines())
    if any(_marks(line, RUN_STOPPED) for line in run):
        return ""
    how = exit_of(run)
    if how in SENT_BY_OTHERS:  # whatever it logged last did not end it: the signal did
        return how
    cause = last_words([line for line in run if not line.startswith(RUN_MARKER)])
    return clip(": ".join(part for part in (how, cause) if part), 300)


def latest_run(lines: Sequence[str]) -> Sequence[str]:
    """The lines from the last start marker on (all of them when the tail holds none)."""
    starts = [i for i, line in enumerate(lines) if _marks(line, RUN_STARTED)]
    return lines[starts[-1] + 1 :] if starts else lines


def _marks(line: str, event: str) -> bool:
    return line.startswith(RUN_MARKER) and f" {event} " in line


_EXITED = re.compile(rf"^{re.escape(RUN_MARKER)}.* {RUN_EXITED} (\d+) ")


def exit_of(run: Sequence[str]) -> str:
    """How the run's process ended, from the exit recorder's line (e.g. ``killed by SIGKILL``,
    ``exited with status 1``); nothing when the run has none (the recorder was killed too, or
    the process predates it)."""
    for line in reversed(run):
        found = _EXITED.match(line)
        if found:
            status = int(found[1])
            if status > 128:  # sh's $? for a child killed by a signal
                with contextlib.suppress(ValueError):
                    return f"killed by {signal.Signals(status - 128).name}"
            return f"exited with status {status}"
    return ""


# A line that may say why a process ended must be among its last ones, and an ERROR line must
# also be from the last seconds it logged: a service that lived on after an error was not
# ended by it (e.g. a Kafka outage that the clients rode out, minutes before a SIGKILL).
LAST_LINES = 10
LAST_MOMENTS_S = 5.0

# maas.lifecycle.LOG_FORMAT's ERROR and CRITICAL lines: time, level, logger, message.
_ERROR_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ (ERROR|CRITICAL) (\S+): (.*)$")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


def last_words(output: Sequence[str]) -> str:
    """The last line among the process's last ones that looks like why it ended: the exception
    line of a traceback, a CRITICAL line, or an ERROR line from its last moments. A Kafka
    client's lines never are: its clients reconnect on their own (see maas.lifecycle)."""
    fatal = _traceback_ends(output) | _late_errors(output)
    if not fatal or max(fatal) < len(output) - LAST_LINES:
        return ""
    last = max(fatal)
    found = _ERROR_LINE.match(output[last])
    return (found[4] if found else output[last]).strip()


def _traceback_ends(output: Sequence[str]) -> set[int]:
    """Where each traceback's exception line is: the first unindented line after its header."""
    ends: set[int] = set()
    inside = False
    for i, line in enumerate(output):
        if line.startswith("Traceback (most recent call last):"):
            inside = True
        elif inside and line.strip() and not line[0].isspace():
            ends.add(i)
            inside = False
    return ends


def _late_errors(output: Sequence[str]) -> set[int]:
    times = [found[1] for line in output if (found := _LOG_TIME.match(line))]
    if not times:
        return set()
    last = _seconds(times[-1])
    late = set()
    for i, line in enumerate(output):
        found = _ERROR_LINE.match(line)
        if found is None or is_kafka_client(found[3]):
            continue
        if found[2] == "CRITICAL" or last - _seconds(found[1]) <= LAST_MOMENTS_S:
            late.add(i)
    return late


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()
