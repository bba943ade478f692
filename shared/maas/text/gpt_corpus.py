"""The GPT's training text: Python standard library sources, read from the running interpreter.

Source and licence: the ``.py`` files of the modules in ``MODULES``, as installed with CPython
under ``sysconfig.get_paths()["stdlib"]`` — present on every machine that runs MaaS, never
downloaded. They are distributed under the Python Software Foundation License (PSF-2.0), which
permits use, copying and derivative works. Roughly 0.67 MB on Python 3.11; the exact bytes follow
the interpreter's patch release, and the order here is fixed, so one interpreter always yields the
same corpus.

Documents are joined with the end-of-text token. The held-out split is the tail of the token
stream (not random windows), so no held-out window overlaps a training one.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from maas.errors import InvalidArgument
from maas.text import byte_tokenizer

MODULES: tuple[str, ...] = (
    "abc", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "heapq", "keyword",
    "numbers", "operator", "pprint", "queue", "random", "reprlib", "sched", "shlex",
    "statistics", "string", "textwrap", "tokenize", "types", "weakref",
)  # fmt: skip
LICENCE = "PSF-2.0 (Python Software Foundation License)"
HELD_OUT_FRACTION = 0.1
# The platform dataset ``builtin:python-stdlib``: windows of this many bytes (a GPT trained on
# it has block_size = WINDOW) from the corpus's first DATASET_BYTES tokens.
WINDOW = 128
DATASET_BYTES = 256 * 1024


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def documents() -> list[str]:
    """The corpus documents, in ``MODULES`` order (a module missing here is skipped)."""
    root = stdlib_dir()
    texts = []
    for name in MODULES:
        path = root / f"{name}.py"
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    if not texts:
        raise InvalidArgument(f"no standard library sources under {root}: cannot build the corpus")
    return texts


def tokens(max_bytes: int | None = None) -> np.ndarray:
    """The whole corpus as token ids (int64), at most ``max_bytes`` tokens when given."""
    ids: list[int] = []
    for text in documents():
        ids += byte_tokenizer.encode(text)
        ids.append(byte_tokenizer.EOT)
        if max_bytes is not None and len(ids) >= max_bytes:
            break
    return np.asarray(ids[:max_bytes], dtype=np.int64)


def windows(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping training pairs: inputs (n, block_size) and next tokens (n, block_size)."""
    if block_size < 1:
        raise InvalidArgument(f"block_size={block_size} must be at least 1")
    n = (len(ids) - 1) // block_size
    if n < 1:
        raise InvalidArgument(
            f"{len(ids)} tokens cannot fill one window of block_size={block_size} (+1 target)"
        )
    x = ids[: n * block_size].reshape(n, block_size)
    y = ids[1 : n * block_size + 1].reshape(n, block_size)
    return x, y


def split(
    block_size: int, max_bytes: int | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)): the held-out windows come from the tail."""
    ids = tokens(max_bytes)
    cut = int(len(ids) * (1 - HELD_OUT_FRACTION))
    return windows(ids[:cut], block_size), windows(ids[cut:], block_size)


def dataset_rows() -> tuple[np.ndarray, np.ndarray]:
    """``builtin:python-stdlib``: (inputs, next tokens), each (n, WINDOW) int64; the platform's
    seeded split holds out whole windows, which never overlap."""
    return windows(tokens(DATASET_BYTES), WINDOW)
