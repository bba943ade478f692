"""A shard's checkpoint is refused once its partition was checkpointed under a newer assignment:
a shard frozen mid-write (SIGSTOP, a paused VM) that wakes after its partition moved must not
roll the pointer back to its own version, nor prune the new owner's checkpoints."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from maas.errors import FailedPrecondition, NotFound
from maas.training import checkpoint as ck
from maas.training.storage import TrainingStore


class Objects:
    """The parts of AsyncObjectStore the training store's checkpoints use, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put_bytes(self, bucket: str, key: str, data: bytes, **_: object) -> object:
        self.objects[key] = data
        return SimpleNamespace(sha256=hashlib.sha256(data).hexdigest())

    async def get_bytes(self, bucket: str, key: str, **_: object) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise NotFound(key) from None

    async def list(self, bucket: str, prefix: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(key=k) for k in self.objects if k.startswith(prefix)]

    async def delete(self, bucket: str, key: str) -> None:
        self.objects.pop(key, None)


def at(version: int, epoch: int) -> ck.Pointer:
    return ck.Pointer(version=version, key="", sha256="", epoch=epoch)


async def test_a_writer_under_an_older_assignment_is_refused_and_changes_nothing() -> None:
    objects = Objects()
    store = TrainingStore(objects)  # type: ignore[arg-type]
    await store.write_checkpoint("j", 1, 1380, b"old owner", at(1380, epoch=1))
    await store.write_checkpoint("j", 1, 1400, b"new owner", at(1400, epoch=2))
    before = dict(objects.objects)
    with pytest.raises(FailedPrecondition, match="epoch 2, newer than this writer's 1"):
        await store.write_checkpoint("j", 1, 1420, b"woken old owner", at(1420, epoch=1))
    assert objects.objects == before
    pointer = await store.pointer("j", 1)
    assert pointer is not None and (pointer.version, pointer.epoch) == (1400, 2)


async def test_the_same_or_a_newer_assignment_writes_on() -> None:
    store = TrainingStore(Objects())  # type: ignore[arg-type]
    await store.write_checkpoint("j", 0, 0, b"initial", at(0, epoch=0))  # the coordinator's
    await store.write_checkpoint("j", 0, 20, b"a", at(20, epoch=1))
    await store.write_checkpoint("j", 0, 40, b"b", at(40, epoch=1))
    pointer = await store.pointer("j", 0)
    assert pointer is not None and pointer.version == 40


def test_a_pointer_written_before_epochs_reads_as_epoch_zero() -> None:
    old = b'{"final": false, "key": "k", "sha256": "s", "version": 3}'
    assert ck.Pointer.from_json(old).epoch == 0
