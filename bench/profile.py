"""Sampling profiles of another process, summarised as their top entries.

``sampling_profile(pid)`` (py-spy) records while its block runs; ``summary`` reads py-spy's
collapsed stacks into the functions where the samples were (self) and this project's functions
they passed through (inclusive), in percent of the samples. Only running threads are sampled,
so an idle thread waiting in epoll counts nothing. Without py-spy on PATH the profile says so.

py-spy sees Python frames only: time spent in compiled code called from the event loop (grpc's
Cython coroutines, torch, the interpreter itself) lands on whichever Python frame is nearest,
``Handle._run`` mostly. ``native_profile(pid)`` (Linux ``perf``, when installed and permitted)
samples every thread's CPU and says which shared object each sample was in: the interpreter,
grpc, torch, numpy, protobuf, libc or the kernel (system calls, thread switches).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def sampling_profile(pid: int, out: Path, rate_hz: int = 250) -> Iterator[dict[str, Any]]:
    """Profile ``pid`` while the block runs; the yielded dict is filled in afterwards."""
    result: dict[str, Any] = {}
    spy = shutil.which("py-spy")
    if spy is None:
        result["not_run"] = "py-spy is not installed (pip install py-spy)"
        yield result
        return
    argv = [spy, "record", "-p", str(pid), "--subprocesses", "-r", str(rate_hz), "-f", "raw"]
    with _recording([*argv, "-o", str(out), "--nonblocking"]) as err:
        yield result
    if out.exists():
        result.update(summary(out.read_text()))
    else:
        result["not_run"] = f"py-spy wrote nothing: {err[0][-300:]}"


@contextlib.contextmanager
def _recording(argv: list[str]) -> Iterator[list[str]]:
    """Run the profiler ``argv`` while the block runs, then stop it with SIGINT (on which py-spy
    and perf write what they recorded); the yielded list then holds its stderr."""
    err: list[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield err
    finally:
        proc.send_signal(signal.SIGINT)
        err.append(proc.communicate(timeout=60)[1].decode(errors="replace"))


def summary(collapsed: str, top: int = 12) -> dict[str, Any]:
    own: Counter[str] = Counter()
    through: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        # --subprocesses: "process PID:CMD" frames nest a child under its parent; the last names it
        named = [f for f in frames if f.startswith("process ")]
        if named:
            processes[_process_label(named[-1])] += n
        own[frames[-1]] += n
        for frame in set(frames):
            through[frame] += n
    return {
        "samples": total,
        "samples_by_process": dict(processes.most_common()),
        "top_self_pct": _top(own, total, top),
        # Inclusive: this project's own functions only (the loop and thread roots hold 100%).
        "top_inclusive_pct": _top(
            Counter({f: n for f, n in through.items() if "(services/" in f or "(maas/" in f}),
            total,
            top,
        ),
    }


def _process_label(frame: str) -> str:
    """``process 123:"python -m services.inference"`` -> ``123 services.inference``; a child
    started by multiprocessing's fork server shows the fork server's command line."""
    pid, _, command = frame.removeprefix("process ").partition(":")
    if "multiprocessing.forkserver" in command:
        return f"{pid} forkserver child"
    module = re.search(r"-m ([\w.]+)", command)
    return f"{pid} {module.group(1)}" if module else pid


def _top(counts: Counter[str], total: int, top: int) -> list[tuple[str, float]]:
    return [(f, round(100 * n / max(total, 1), 1)) for f, n in counts.most_common(top)]


# Shared objects grouped by what they are; the first matching prefix names a sample's group.
LIBRARY_GROUPS = (
    ("libpython", "python interpreter"),
    ("cygrpc", "grpc"),
    ("libgrpc", "grpc"),
    ("libtorch", "torch"),
    ("libc10", "torch"),
    ("_C.", "torch"),
    ("libgomp", "torch"),
    ("_multiarray", "numpy"),
    ("_message", "protobuf"),
    ("[kernel", "kernel"),
    ("libc.so", "libc"),
    ("libm.so", "libc"),
    ("ld-linux", "libc"),
)


@contextlib.contextmanager
def native_profile(pid: int, out: Path, rate_hz: int = 499) -> Iterator[dict[str, Any]]:
    """CPU samples of every thread of ``pid`` while the block runs, by shared object (perf)."""
    result: dict[str, Any] = {}
    perf = shutil.which("perf")
    if perf is None:
        result["not_run"] = "perf is not installed (Debian: apt install linux-perf)"
        yield result
        return
    with _recording(
        [perf, "record", "-q", "-F", str(rate_hz), "-p", str(pid), "-o", str(out)]
    ) as err:
        yield result
    report = subprocess.run(
        [perf, "report", "-i", str(out), "--no-children", "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    shares = by_library(report.stdout)
    if not shares:  # not permitted (perf_event_paranoid), or the process had gone
        why = (err[0] + report.stderr).strip()[-300:]
        result["not_run"] = f"perf recorded nothing: {why}"
        return
    result["by_library_pct"] = shares


def by_library(report: str) -> dict[str, float]:
    """``perf report --sort dso`` text -> percent of the samples per library group."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        found = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if found is None:
            continue
        dso = found.group(2)
        group = next((name for prefix, name in LIBRARY_GROUPS if dso.startswith(prefix)), "other")
        shares[group] = shares.get(group, 0.0) + float(found.group(1))
    return {name: round(pct, 1) for name, pct in sorted(shares.items(), key=lambda s: -s[1])}
