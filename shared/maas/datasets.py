"""Datasets a job can name: ``builtin:<name>`` (generated or shipped, never downloaded) or
``s3://bucket/key.npz`` holding arrays ``X`` (float) and ``y`` (int labels or float targets).

Splits are fixed (seeded), so every worker, the evaluator and the tests see the same rows.

S3 datasets come only from the buckets ``MAAS_DATASET_BUCKETS`` names (the datasets bucket by
default), uploaded by any S3 tool. Every read is verified against the sha256 kept in a sidecar
object ``<key>.sha256``: ``maas datasets upload`` writes it (and the sha256 in the object's
metadata); an object without one is hashed on first use and its sha256 recorded then. So bytes
replaced since by any other means are refused, however they were first put.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.lib.format as npy_format

from maas.errors import IntegrityError, InvalidArgument, NotFound
from maas.events import shown

if TYPE_CHECKING:
    from maas.config import Settings
    from maas.store import ObjectStore

SIDECAR_SUFFIX = ".sha256"

MIN_ROWS = 10  # so the held-out fifth has rows to evaluate on
# What reading a hostile .npz raises besides BadZipFile: RuntimeError covers an encrypted member
# and an unknown compression method (zipfile's error for it subclasses RuntimeError);
# OverflowError a header's dimension past int64.
UNREADABLE = (ValueError, OSError, EOFError, MemoryError, RuntimeError, OverflowError)
MAX_CLASSES = 1 << 20
MAX_NPZ_MEMBERS = 64  # np.savez writes two: X and y
MAX_NPZ_DIRECTORY_BYTES = 1 << 20  # its table of them: about 100 bytes a member
_EOCD, _ZIP64_LOCATOR, _ZIP64_EOCD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
_EOCD_SEARCH_BYTES = 22 + 0xFFFF  # the record, and a comment of at most 64 KiB after it
TEST_FRACTION = 0.2
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Dataset:
    """Train and held-out test arrays for one task."""

    name: str
    task: str  # "classification" | "regression"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str | None = None  # of the file it was read from (an S3 dataset)

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        if self.task != "classification":
            return 1
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0)) + 1)

    def shard(self, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Worker ``index`` of ``count`` gets every ``count``-th training row (disjoint)."""
        if not 0 <= index < count:
            raise InvalidArgument(f"shard index {index} outside 0..{count - 1}")
        return self.x_train[index::count], self.y_train[index::count]

    def subset(self, fraction: float, seed: int = 0) -> Dataset:
        """A seeded fraction of the training rows (the test split is kept whole)."""
        if not 0 < fraction <= 1:
            raise InvalidArgument(f"dataset fraction {fraction} must be in (0, 1]")
        n = max(1, round(len(self.x_train) * fraction))
        rows = np.random.default_rng(seed).permutation(len(self.x_train))[:n]
        rows.sort()
        return Dataset(
            f"{self.name}@{fraction}",
            self.task,
            self.x_train[rows],
            self.y_train[rows],
            self.x_test,
            self.y_test,
            self.sha256,
        )


def _split(name: str, task: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    """A seeded fifth of the rows held out. The rows are shuffled once into one array and both
    splits are views of it: a dataset costs two copies of itself at the peak (the caller's and
    the shuffled one), not three."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = round(len(x) * TEST_FRACTION)
    x, y = x[order], y[order]
    return Dataset(name, task, x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def _digits(classes: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
    y = bunch.target.astype(np.int64)
    if classes is not None:
        keep = np.isin(y, list(classes))
        x, y = x[keep], y[keep] - classes.start  # relabel to 0..k-1 for a k-class head
    return x, y


def _regression() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    w = rng.normal(size=(16,)).astype(np.float32)
    y = (x @ w + 0.1 * rng.normal(size=2000)).astype(np.float32)
    return x, y.reshape(-1, 1)


def _stdlib_docs() -> tuple[np.ndarray, np.ndarray]:
    from maas.text import corpus  # tokenizers loads only for the text dataset

    return corpus.token_rows()


def _python_stdlib() -> tuple[np.ndarray, np.ndarray]:
    from maas.text import gpt_corpus  # next-byte windows of Python sources, for arch gpt

    return gpt_corpus.dataset_rows()


BUILTINS: dict[str, tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]] = {
    "digits": ("classification", _digits),
    "digits-0-4": ("classification", lambda: _digits(range(0, 5))),
    "digits-5-9": ("classification", lambda: _digits(range(5, 10))),
    "regression": ("regression", _regression),
    "stdlib-docs": ("classification", _stdlib_docs),  # English text, maas.text.corpus
    "python-stdlib": ("classification", _python_stdlib),  # a class per byte position: gpt
}


def load_builtin(name: str) -> Dataset:
    try:
        task, make = BUILTINS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown builtin dataset {name!r}; builtins are "
            + ", ".join(f"builtin:{n}" for n in sorted(BUILTINS))
        ) from None
    x, y = make()
    return _split(f"builtin:{name}", task, x, y)


def from_npz(name: str, data: bytes, task: str | None = None) -> Dataset:
    """Parse a user dataset: an .npz with ``X`` (n, features) and ``y`` (n,) or (n, k)."""
    check_members(name, data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            arrays = {label: _read_array(name, archive, label) for label in ("X", "y")}
    except (*UNREADABLE, zipfile.BadZipFile):
        # numpy's own words would suggest allow_pickle=True: never, for a file from outside.
        raise InvalidArgument(
            f"{name} is not a readable .npz of numeric arrays (np.savez(path, X=..., y=...) or "
            "np.savez_compressed, unencrypted; object arrays are refused)"
        ) from None
    x, y = arrays["X"], arrays["y"]
    if (
        x.ndim != 2
        or y.ndim == 0
        or len(x) != len(y)
        or len(x) < MIN_ROWS
        or 0 in x.shape[1:] + y.shape[1:]
    ):
        raise InvalidArgument(
            f"{name}: X must be 2-D with one row per label, at least one feature and at least "
            f"{MIN_ROWS} rows (a fifth are held out for evaluation); got X{x.shape} and "
            f"y{y.shape}"
        )
    for label, array in (("X", x), ("y", y)):
        if array.dtype.kind not in "biuf":
            raise InvalidArgument(
                f"{name}: {label} has dtype {array.dtype}; use integers or floats (real numbers)"
            )
    with np.errstate(over="ignore"):  # 1e300 is finite in float64, what training never reads
        x = x.astype(np.float32, copy=False)
    if not _all_finite(x):
        raise InvalidArgument(
            f"{name}: X holds NaN or infinite values, or values beyond float32's range "
            "(+-3.4e38); features must be finite float32 numbers"
        )
    if task is None:  # true/false labels are the classes 0 and 1
        task = "classification" if y.dtype.kind in "biu" else "regression"
    if task == "classification":
        if y.dtype.kind not in "biu" or y.ndim != 1 or y.min() < 0:
            raise InvalidArgument(
                f"{name}: classification labels y must be one integer >= 0 per row; got "
                f"y{y.shape} of {y.dtype}"
            )
        if y.max() >= MAX_CLASSES:
            raise InvalidArgument(
                f"{name}: a label is {y.max()}; labels must be below {MAX_CLASSES}"
            )
        y = y.astype(np.int64)
    else:
        y = y.astype(np.float32).reshape(len(y), -1)
        if not np.isfinite(y).all():
            raise InvalidArgument(f"{name}: y holds NaN or infinite values; targets must be finite")
    return _split(name, task, x, y)


def every_block(
    x: np.ndarray, holds: Callable[[np.ndarray], bool], rows_at_once: int = 65_536
) -> bool:
    """Whether ``holds`` is true of every block of ``rows_at_once`` rows of ``x``: for checks
    whose elementwise temporary (a mask, a remainder) would be a fraction of the dataset again,
    or all of it."""
    return all(holds(x[i : i + rows_at_once]) for i in range(0, len(x), rows_at_once))


def _all_finite(x: np.ndarray) -> bool:
    return every_block(x, lambda rows: bool(np.isfinite(rows).all()))


def _read_array(name: str, archive: zipfile.ZipFile, label: str) -> np.ndarray:
    """Array ``label`` of an .npz, read only after its header's shape is seen to fit the bytes the
    archive holds for it (numpy allocates the declared shape first: a 1 KiB file could ask for
    terabytes)."""
    member = f"{label}.npy"
    if member not in archive.namelist():
        held = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise InvalidArgument(f"{name} must hold arrays 'X' and 'y'; it has {held}")
    info = archive.getinfo(member)
    with archive.open(info) as stream:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy format {version}")
    if dtype.hasobject:
        raise ValueError("object array")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise InvalidArgument(
            f"{name}: {member}'s header says shape {shape} of {dtype} ({declared} bytes) but the "
            f"archive holds {info.file_size} bytes for it; write the file with np.savez"
        )
    with archive.open(info) as stream:
        return np.asarray(npy_format.read_array(stream, allow_pickle=False))


def _central_directory(data: bytes) -> tuple[int, int] | None:
    """(members, bytes) of a zip's central directory as its end record declares them (the zip64
    record's where the short fields are full), read before ``zipfile`` parses the table; None
    when there is no such record (``from_npz`` says what is wrong with the file)."""
    at = data.rfind(_EOCD, max(0, len(data) - _EOCD_SEARCH_BYTES))
    if at < 0 or at + 16 > len(data):
        return None
    count, size = struct.unpack_from("<HI", data, at + 10)
    locator = at - 20  # a zip64 end-of-central-directory locator sits right before the record
    if locator < 0 or data[locator : locator + 4] != _ZIP64_LOCATOR:
        return int(count), int(size)
    (record,) = struct.unpack_from("<Q", data, locator + 8)
    if record + 48 > len(data) or data[record : record + 4] != _ZIP64_EOCD:
        return None
    count64, size64 = struct.unpack_from("<QQ", data, record + 32)
    return int(count64), int(size64)


def check_members(name: str, data: bytes) -> None:
    """Refuse an archive whose table of members is larger than a dataset has any use for:
    reading it costs time and memory by the member, not by the byte (a million empty members,
    86 MB: 52 s and +570 MB in every process that loads it)."""
    directory = _central_directory(data)
    if directory is None:
        return
    count, size = directory
    if count > MAX_NPZ_MEMBERS or size > MAX_NPZ_DIRECTORY_BYTES:
        raise InvalidArgument(
            f"{name} is an archive of {count:,} members ({size:,} bytes of member table); a "
            f"dataset is X and y (np.savez(path, X=..., y=...)): at most {MAX_NPZ_MEMBERS} "
            f"members and {MAX_NPZ_DIRECTORY_BYTES:,} bytes of table are read"
        )


def check_size(name: str, data: bytes, limit: int) -> None:
    """Refuse a dataset over ``limit`` bytes as stored or unpacked, before any array is read: a
    1 MB archive can unpack to gigabytes in every worker that loads it."""
    check_members(name, data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError):
        return  # from_npz says what is wrong with it
    check_stored_size(name, max(len(data), unpacked), limit)


def allowed_buckets(settings: Settings) -> tuple[str, ...]:
    return tuple(b.strip() for b in settings.dataset_buckets.split(",") if b.strip())


# S3 servers refuse a key holding these (SeaweedFS: BadRequest), or read "\\" as "/".
_UNSAFE_KEY_CHARACTER = re.compile(r"[\x00-\x1f\x7f\\]")


def check_uri(uri: str, settings: Settings) -> None:
    """A dataset uri a job may name: a builtin, or an .npz in an allowed bucket."""
    if uri.startswith("builtin:"):
        name = uri.removeprefix("builtin:")
        if name not in BUILTINS:
            known = ", ".join(f"builtin:{n}" for n in sorted(BUILTINS))
            raise InvalidArgument(f"dataset.uri {uri!r} is not a builtin; builtins are {known}")
        return
    if not (uri.startswith("s3://") and uri.endswith(".npz")):
        raise InvalidArgument(f"dataset.uri {uri!r} must be builtin:<name> or s3://bucket/key.npz")
    bucket, _, key = uri[5:].partition("/")
    if _UNSAFE_KEY_CHARACTER.search(key):
        raise InvalidArgument(
            f"dataset.uri {shown(uri)} holds a control character or a backslash; a dataset's "
            "key is printable text with '/' between its parts"
        )
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidArgument(
            f"dataset.uri {shown(uri)} has an empty, '.' or '..' path segment; name the object's "
            "key as stored, e.g. s3://maas-datasets/mine/train.npz"
        )
    allowed = allowed_buckets(settings)
    if bucket not in allowed:
        raise InvalidArgument(
            f"dataset.uri {uri!r}: bucket {bucket!r} is not a datasets bucket; use "
            f"{' or '.join(allowed)} (MAAS_DATASET_BUCKETS names the allowed ones)"
        )


class FetchedBytes(NamedTuple):
    data: bytes
    sha256: str  # of ``data``, computed once as it was verified


def fetch_bytes(store: ObjectStore, uri: str, settings: Settings) -> FetchedBytes:
    """The bytes of an S3 dataset, verified by sha256: recorded at upload, or on first use."""
    from maas.store import parse_uri

    check_uri(uri, settings)
    bucket, key = parse_uri(uri)
    stored = store.stat(bucket, key)
    check_stored_size(uri, stored.size, settings.max_dataset_bytes)
    fetched = _verified_bytes(store, bucket, key, recorded=stored.sha256)
    check_size(uri, fetched.data, settings.max_dataset_bytes)
    return fetched


def check_stored_size(name: str, size: int, limit: int) -> None:
    """Refuse a dataset of ``size`` bytes (as stored, or unpacked) over ``limit``."""
    if size > limit:
        raise InvalidArgument(
            f"{name} holds {size} bytes (stored or unpacked), over MAAS_MAX_DATASET_BYTES={limit}"
            "; every worker loads all of it: sample it down to a file that fits, or raise the "
            "setting"
        )


def _verified_bytes(
    store: ObjectStore, bucket: str, key: str, *, recorded: str | None
) -> FetchedBytes:
    uri = f"s3://{bucket}/{key}"
    sidecar = key + SIDECAR_SUFFIX
    try:
        kept = store.get_bytes(bucket, sidecar)
    except NotFound:
        if recorded is None:
            return _first_use(store, bucket, key)
        # Uploaded through maas.store (its sha256 in the metadata, checked as it is read) before
        # uploads wrote the sidecar too: recorded now, for every later read.
        fetched = FetchedBytes(*store.get_bytes_and_sha256(bucket, key))
        record_sha256(store, bucket, key, fetched.sha256, len(fetched.data))
        return fetched
    recorded = _recorded_sha256(kept)
    if recorded is None:
        raise IntegrityError(
            f"s3://{bucket}/{sidecar}, the sha256 recorded for {uri}, is not "
            '{"sha256": "<64 hex digits>", ...}: delete it to record the dataset\'s bytes again'
        )
    try:
        return FetchedBytes(*store.get_bytes_and_sha256(bucket, key, expected_sha256=recorded))
    except IntegrityError:
        raise IntegrityError(
            f"{uri} changed since its sha256 was recorded at upload or first use "
            f"(s3://{bucket}/{sidecar}): upload it with `maas datasets upload`, or delete the "
            "sidecar to accept the new bytes"
        ) from None


def _recorded_sha256(sidecar: bytes) -> str | None:
    """The sha256 a sidecar records, or None if it is not one ``_first_use`` could have written."""
    try:
        record = json.loads(sidecar)
    except (ValueError, UnicodeDecodeError):
        return None
    digest = record.get("sha256") if isinstance(record, dict) else None
    if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
        return digest
    return None


def _first_use(store: ObjectStore, bucket: str, key: str) -> FetchedBytes:
    """Read an object no sha256 vouches for yet, and record its sha256 for every later read."""
    data = b"".join(store.iter_chunks(bucket, key))
    digest = hashlib.sha256(data).hexdigest()
    record_sha256(store, bucket, key, digest, len(data))
    return FetchedBytes(data, digest)


def record_sha256(store: ObjectStore, bucket: str, key: str, sha256: str, size: int) -> None:
    """Keep ``sha256`` as what every later read of ``key`` must hash to (its sidecar)."""
    record = {"sha256": sha256, "size_bytes": size}
    store.put_bytes(
        bucket, key + SIDECAR_SUFFIX, json.dumps(record).encode(), content_type="application/json"
    )


def fetcher(store: ObjectStore, settings: Settings) -> Callable[[str], FetchedBytes]:
    """``uri -> verified bytes`` for the services' dataset loading (see ``fetch_bytes``)."""
    return lambda uri: fetch_bytes(store, uri, settings)
