"""A dataset archive's table of members is judged from its end record before it is parsed:
reading the table costs by the member, not by the byte, in every process that loads it."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from maas import datasets
from maas.errors import InvalidArgument


def archive(members: int) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, X=np.zeros((20, 3), np.float32), y=np.arange(20) % 2)
    with zipfile.ZipFile(buf, "a") as extra:
        for i in range(members - 2):
            extra.writestr(f"m{i}", b"")
    return buf.getvalue()


def test_an_npz_of_x_and_y_passes() -> None:
    data = archive(2)
    datasets.check_size("ok.npz", data, 1 << 30)
    assert datasets.from_npz("ok.npz", data).num_features == 3


@pytest.mark.parametrize("members", [65, 70_000], ids=["many", "zip64-count"])
def test_an_archive_of_more_members_than_a_dataset_has_is_refused(members: int) -> None:
    with pytest.raises(InvalidArgument, match=f"an archive of {members:,} members"):
        datasets.check_size("many.npz", archive(members), 1 << 30)


def test_a_member_table_over_its_cap_is_refused_whatever_count_it_declares() -> None:
    # zipfile reads the table by its declared size, not its count: a count of 2 proves nothing.
    data = bytearray(archive(2))
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 12, datasets.MAX_NPZ_DIRECTORY_BYTES + 1)
    with pytest.raises(InvalidArgument, match="at most 64 members and 1,048,576 bytes of table"):
        datasets.from_npz("lying.npz", bytes(data))


def test_a_file_without_an_end_record_is_left_to_the_parser_to_refuse() -> None:
    with pytest.raises(InvalidArgument, match="is not a readable .npz"):
        datasets.from_npz("junk.npz", b"PK" + b"\0" * 100)
