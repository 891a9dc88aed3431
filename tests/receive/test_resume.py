"""A receive stopped after any record and resumed (what replication does after a cut or a
killed receiver): the count of records applied is stored after each one; the resumed
receive skips those and looks at the next one, which a receiver killed between its system
call and storing its count applied already. Oracle: the tree of one uninterrupted receive
of the same stream (every entry's type, mode, size, mtime, owner, links, content)."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.errors import TransportError
from btrdelta.receive import receive
from btrdelta.receive.resume import ResumePoint
from btrdelta.receive.subvolumes import Subvolumes
from btrdelta.stream.reader import Event, StreamHeader
from btrdelta.stream.records import (
    Chmod,
    End,
    Link,
    Mkdir,
    Mkfile,
    Record,
    RemoveXattr,
    Rename,
    Rmdir,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Utimes,
    Write,
)

from .helpers import UUID_A, events, snapshot_tree, subvol

TMP = b".btrdelta-tmp-resume-partial"

RECORDS: list[Record] = [
    subvol(),
    Mkdir(path=b"o256", ino=256),
    Mkfile(path=b"o257", ino=257),
    Write(path=b"o257", offset=0, data=b"a" * 5000),
    Rename(path=b"o257", path_to=b"o256/f"),
    Mkfile(path=b"o257", ino=258),  # the old name again: a rename is judged by it
    Write(path=b"o257", offset=0, data=b"b" * 300),
    Link(path=b"g", path_link=b"o256/f"),
    SetXattr(path=b"g", name=b"user.k", data=b"v"),
    RemoveXattr(path=b"g", name=b"user.k"),
    SetXattr(path=b"g", name=b"user.k", data=b"w"),
    Unlink(path=b"o256/f"),
    Symlink(path=b"s", ino=259, target=b"g"),
    Mkdir(path=b"e", ino=260),
    Rmdir(path=b"e"),
    Truncate(path=b"g", size=100),
    Rename(path=b"o256", path_to=b"d"),
    Chmod(path=b"g", mode=0o640),
    Utimes(path=b"g", atime=1, mtime=2_000_000_000, ctime=3),
    Utimes(path=b"o257", atime=1, mtime=2_000_000_001, ctime=3),
    Utimes(path=b"s", atime=1, mtime=2_000_000_002, ctime=3),
    Utimes(path=b"d", atime=1, mtime=2_000_000_003, ctime=3),
    Utimes(path=b"", atime=1, mtime=1_000_000_000, ctime=3),
    End(),
]


class _Cut:
    """The events in batches of two until ``count`` records were given, then a cut (as
    replication's reader raises when its connection is cut)."""

    def __init__(self, evs: list[Event], count: int) -> None:
        self.evs, self.count = evs, count

    def batches(self) -> Iterator[list[Event]]:
        given, batch = 0, []
        for ev in self.evs:
            if given == self.count:
                break
            batch.append(ev)
            if not isinstance(ev, StreamHeader):
                given += 1
            if len(batch) == 2:
                yield batch
                batch = []
        if batch:
            yield batch
        raise TransportError("cut by the test")

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch


@pytest.mark.parametrize("lost", [False, True], ids=["counted", "count-lost"])
def test_resume_after_every_record(tmp_path: Path, applier_impl: str, lost: bool) -> None:
    evs = events(RECORDS, 2)
    (tmp_path / "whole").mkdir()
    receive(iter(evs), tmp_path / "whole")
    expected = snapshot_tree(tmp_path / "whole" / "sv")
    first = 3  # the resumed events start there (a segment boundary), after a header
    for cut in range(first + 1, len(RECORDS)):
        dest = tmp_path / f"cut{cut}"
        dest.mkdir()
        counter = mmap.mmap(-1, 8)
        with pytest.raises(TransportError):
            receive(_Cut(evs, cut), dest, progress=counter, temp_name=TMP,
                    detach_on=(TransportError,))
        assert struct.unpack("=Q", counter[:8])[0] == cut
        assert (dest / os.fsdecode(TMP)).is_dir()  # left for the resume
        # a receiver killed after the last record's system call, before its count
        applied = cut - 1 if lost else cut
        with Subvolumes(dest) as subvols:
            pending = subvols.reopen(b"sv", TMP, UUID_A, 7)
        records = [ev for ev in evs if not isinstance(ev, StreamHeader)]
        rest = [StreamHeader(2), *records[first:]]
        got = receive(iter(rest), dest, progress=counter,
                      resume=ResumePoint(pending, first, applied))
        assert [g.name for g in got] == ["sv"], cut
        assert snapshot_tree(dest / "sv") == expected, cut
        assert struct.unpack("=Q", counter[:8])[0] == len(RECORDS)
        assert not (dest / os.fsdecode(TMP)).exists()
