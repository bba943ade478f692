"""`maas datasets upload | list`: user datasets (.npz with X and y) in the datasets bucket.

Any S3 tool may upload too (``mc cp``, ``aws s3 cp``): such an object is hashed on its first
use and verified against that sha256 ever after; ``maas datasets upload`` checks the file and
records the sha256 as it uploads, so nothing needs hashing later.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from maas.command_line import command
from maas.config import Settings
from maas.errors import InvalidArgument
from maas.events import shown

MAX_DATASET_NAME = 200  # SeaweedFS refuses a file name of over 255 bytes, .npz.sha256 included

# Spelt out rather than read from maas.datasets: that would import numpy for every command.
BUILTINS_TEXT = (
    "builtin:digits, builtin:digits-0-4, builtin:digits-5-9, builtin:python-stdlib, "
    "builtin:regression, builtin:stdlib-docs"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    group = command(
        subparsers,
        "datasets",
        help="upload and list user datasets (.npz with arrays X and y)",
        description="Datasets are .npz files in the maas-datasets bucket; a job names one as "
        "dataset.uri: s3://maas-datasets/NAME.npz (builtins need no upload: "
        f"{BUILTINS_TEXT}).",
        example="maas datasets upload my-data.npz my-data",
    )
    actions = group.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    upload = command(
        actions,
        "upload",
        help="check an .npz and upload it; prints the dataset uri for job files",
        example="maas datasets upload my-data.npz my-data",
    )
    upload.add_argument("file", help="an .npz holding X (rows x features) and y (labels/targets)")
    upload.add_argument(
        "name", help="dataset name (stored as NAME.npz): letters, digits, '-', '_' and '.'"
    )
    upload.add_argument("--task", choices=["classification", "regression"], default=None)
    upload.set_defaults(func=_upload)
    listing = command(actions, "list", help="datasets in the bucket", example="maas datasets list")
    listing.set_defaults(func=_list)


def _upload(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    from maas import datasets
    from maas.store import DATASETS_BUCKET, ObjectStore

    path = Path(args.file)
    if not path.is_file():
        raise InvalidArgument(f"{path} does not exist or is not a file")
    if not args.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidArgument(f"dataset name {args.name!r} may hold only letters, digits, - _ .")
    if len(args.name) > MAX_DATASET_NAME:
        raise InvalidArgument(
            f"dataset name {shown(args.name)} has {len(args.name)} characters; at most "
            f"{MAX_DATASET_NAME} are accepted (S3 servers refuse longer object names)"
        )
    if args.name.endswith(".npz"):
        raise InvalidArgument(
            f"dataset name {args.name!r}: give it without .npz (it is stored as NAME.npz): "
            f"maas datasets upload {args.file} {args.name.removesuffix('.npz')}"
        )
    datasets.check_stored_size(str(path), path.stat().st_size, settings.max_dataset_bytes)
    raw = path.read_bytes()
    datasets.check_size(str(path), raw, settings.max_dataset_bytes)
    data = datasets.from_npz(str(path), raw, args.task)  # refuse bad files early
    key = f"{args.name}.npz"
    store, sha256 = ObjectStore(settings), hashlib.sha256(raw).hexdigest()
    info = store.put_file(DATASETS_BUCKET, key, path, sha256=sha256)  # refused if it changed
    datasets.record_sha256(store, DATASETS_BUCKET, key, sha256, len(raw))
    Console().print(
        f"uploaded {data.task} dataset: {len(data.x_train)} train / {len(data.x_test)} test rows, "
        f"{data.num_features} features, sha256 {sha256[:12]}…"
    )
    print(info.uri)
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from maas.store import DATASETS_BUCKET, ObjectStore

    table = Table("URI", "BYTES")
    for obj in ObjectStore(settings).list(DATASETS_BUCKET):
        if obj.key.endswith(".npz"):
            table.add_row(f"s3://{DATASETS_BUCKET}/{obj.key}", str(obj.size))
    Console().print(table)
    return 0
