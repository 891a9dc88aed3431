"""Receiving a stream in several goes (what replication does after a cut connection or a
killed receiver).

A resumable receive names its temporary subvolume (``temp_name``), counts the records it
applied in a buffer that survives it (``progress``: a shared mapping of a file, stored
after each record's system calls, by the C fast path too) and, when its input fails with
one of ``detach_on``, leaves the subvolume there (:meth:`.applier.Applier.detach`). The
next receive of the same stream reopens it (:meth:`.subvolumes.Subvolumes.reopen`), gets
the stream from a record boundary on (:class:`ResumePoint`), skips the records counted and
looks at the next one (:func:`already_applied`): the receiver may have been killed between
its system call and storing its count. The loop itself is :func:`.receiver.receive`'s.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable

from .. import TYPE_CHECKING
from .._value import Value
from ..errors import BtrdeltaError
from ..stream.reader import Event, StreamHeader
from ..stream.records import (
    Link,
    Mkdir,
    Mkfifo,
    Mkfile,
    Mknod,
    Mksock,
    Record,
    RemoveXattr,
    Rename,
    Rmdir,
    Symlink,
    Unlink,
)
from .subvolumes import PendingSubvol

if TYPE_CHECKING:
    from typing import Any

    from .applier import Applier

__all__ = ["ResumePoint", "already_applied", "resumed"]

#: records that cannot be applied twice: those that make a name, and those that remove one
_CREATES = frozenset({Mkfile, Mkdir, Mknod, Mkfifo, Mksock, Symlink, Link})
_ONCE = _CREATES | {Rename, Unlink, Rmdir, RemoveXattr}


class ResumePoint(Value):
    """Where a receive goes on with a subvolume an earlier receive left unfinished: the
    events start with the record of index ``first`` of that stream (after their stream
    header), and the first ``applied`` records of it were applied (the count the earlier
    receive stored)."""

    pending: PendingSubvol
    first: int
    applied: int


class _Applied:
    """Stands for a record found applied already (no handler: applying it does nothing)."""

    cmd = None


def resumed(batches: Iterable[list[Event]], point: ResumePoint,
            applier: Applier) -> Generator[list[Event], None, None]:
    """Go on with ``point.pending`` in ``applier``: ``batches`` without the records
    ``point`` says were applied; the one after them is looked at (:func:`already_applied`)."""
    applier.resume(point.pending)
    return _skip(batches, point.applied - point.first, applier)


def _skip(batches: Iterable[list[Event]], skip: int,
          applier: Applier) -> Generator[list[Event], None, None]:
    check = True
    for batch in batches:
        if not (skip or check):
            yield batch
            continue
        out: list[Event] = []
        for ev in batch:
            if ev.__class__ is StreamHeader:
                out.append(ev)
            elif skip:
                skip -= 1
            elif check:
                check = False
                out.append(_Applied() if already_applied(applier, ev) else ev)  # type: ignore[arg-type]
            else:
                out.append(ev)
        if out:
            yield out


def already_applied(applier: Applier, rec: Record) -> bool:
    """Whether ``rec``, the record after the last one known to be applied, was applied too.

    Only records whose second application differs from the first are looked at, by the
    state they leave (the state before them is known: every record before was applied): a
    new name exists, a removed one does not, an xattr removed is gone. The others (data,
    attributes, times) are applied again, which changes nothing."""
    r: Any = rec
    kind = r.__class__
    cur = applier.current
    if cur is None or cur.sandbox is None or kind not in _ONCE:
        return False
    sb = cur.sandbox
    if kind is RemoveXattr:
        try:
            names = os.listxattr(sb.proc_path(r.path) if r.path else sb.root_fd,
                                 follow_symlinks=False)
        except (OSError, BtrdeltaError):
            return False
        return os.fsdecode(r.name) not in names
    path: bytes = r.path
    if kind is Rename and path == r.path_to:
        return False
    try:
        fd, name = sb.parent(path)
        os.lstat(name, dir_fd=fd)
        exists = True
    except FileNotFoundError:
        exists = False
    except (OSError, BtrdeltaError):
        return False  # (a parent gone: the record's own error says what)
    return exists if kind in _CREATES else not exists
