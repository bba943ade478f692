"""CPU lists read and written as Linux does, reservations checked, a process pinned whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from maas import cpus
from maas.config import Settings
from maas.errors import InvalidArgument
from services.inference.server import decode_cpus

USABLE = sorted(os.sched_getaffinity(0))


def test_a_cpu_list_names_single_cpus_and_ranges():
    assert cpus.parse("2-4,7, 0", "X") == {0, 2, 3, 4, 7}


@pytest.mark.parametrize("text", ["two", "3-1", "-2", "1,,2", "1-"])
def test_a_bad_cpu_list_is_refused_naming_the_setting(text):
    with pytest.raises(InvalidArgument, match=r"^X="):
        cpus.parse(text, "X")


def test_cpus_are_rendered_as_runs():
    assert cpus.render({5, 0, 1, 2, 9, 10}) == "0-2,5,9-10"
    assert cpus.parse(cpus.render({5, 0, 1, 2}), "X") == {0, 1, 2, 5}


def test_nothing_is_reserved_by_an_empty_list():
    assert cpus.reserve(" ", "X") is None


def test_a_cpu_this_process_may_not_use_is_refused():
    with pytest.raises(InvalidArgument, match="may not use"):
        cpus.reserve(str(max(USABLE) + 1), "X")


def test_reserving_every_cpu_is_refused():
    with pytest.raises(InvalidArgument, match="leaving none"):
        cpus.reserve(cpus.render(USABLE), "X")


@pytest.mark.skipif(len(USABLE) < 2, reason="reserving a CPU needs two")
def test_a_reservation_splits_the_usable_cpus():
    reservation = cpus.reserve(str(USABLE[-1]), "X")
    assert reservation == cpus.Reservation(frozenset({USABLE[-1]}), frozenset(USABLE[:-1]))


PINNED = """
import os, threading
from maas import cpus
release = threading.Event()
before = threading.Thread(target=release.wait, daemon=True)
before.start()
cpus.pin_process([CPU])
after = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0))))
after.start()
after.join()
print(sorted(os.sched_getaffinity(before.native_id)))
release.set()
"""


def test_pinning_moves_every_thread_and_the_threads_started_later():
    cpu = USABLE[-1]
    out = subprocess.run(
        [sys.executable, "-c", PINNED.replace("CPU", str(cpu))],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout.split()
    assert out == [f"[{cpu}]", f"[{cpu}]"]


@pytest.mark.skipif(len(USABLE) < 2, reason="reserving a CPU needs two")
def test_decode_cpus_need_decode_processes():
    settings = Settings(inference_decode_cpus=str(USABLE[-1]), inference_decode_process=False)
    with pytest.raises(InvalidArgument, match="MAAS_INFERENCE_DECODE_PROCESS=false"):
        decode_cpus(settings)
