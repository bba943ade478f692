"""A decode process logs as the server does: its lines carry a timestamp, level and logger."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A server-like parent: logging at INFO, one decode process started and stopped.
PARENT = """
import logging, os
from maas import zoo
from services.inference import decode_worker
logging.basicConfig(level="INFO")
model = zoo.build("gpt", {"block_size": 16, "n_layer": 1, "n_head": 1, "n_embd": 8}).eval()
worker = decode_worker.start_process(model, 2, "tiny")
os.close(worker.commands)  # end of its commands: the child's loop ends
assert worker.join(30), "the decode process did not end"
"""
CHILD_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO services\.inference\.decode_worker: "
    r"maas-decode-tiny \(pid \d+\) holds the model: 2 slots",
    re.MULTILINE,
)


def test_the_decode_process_logs_its_start_in_the_services_format_at_the_servers_level():
    done = subprocess.run(
        [sys.executable, "-c", PARENT],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert CHILD_LINE.search(done.stderr), done.stderr
