"""The lock of a replication destination: one conversation at a time on DEST.

Each receiver holds an exclusive ``flock`` on ``DEST/.btrdelta-replica.lock`` for its
conversation (two would share DEST's partial transfer) and writes its pid there, which only
names the holder to a refused receiver. A holder whose conversation is over (a sender cut
off: its partial transfer is being written out) writes ``PID closing`` and lets go of an
OFD lock of the file's first byte that it held from the start; another receiver waits for
such a holder (up to :data:`CLOSING_WAIT` seconds) instead of refusing a sender re-run at
once, but only while that byte is free. A lock needs no disk space and the mark does: on a
full disk the next conversation of the same process could not write its pid over its
earlier ``closing``, and another receiver waited the whole 60 s before it said ``busy``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from pathlib import Path

__all__ = ["CLOSING_WAIT", "LOCK_FILE", "lock_dest", "say_closing"]

#: flock(2)-ed by the process in a conversation on DEST (its pid in it, for the message)
LOCK_FILE = ".btrdelta-replica.lock"
#: seconds a receiver waits for a holder that says it is closing (then: ``busy``)
CLOSING_WAIT = 60.0
#: ``struct flock`` of the OFD lock of the lock file's first byte
_FLOCK = struct.Struct("@hhqqi4x")


def lock_dest(dest: Path) -> tuple[int | None, str]:
    """Lock DEST for one conversation: the lock file's descriptor, or None and the pid
    written in it when another process holds it."""
    fd = os.open(dest / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    deadline = time.monotonic() + CLOSING_WAIT
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder, _, closing = os.pread(fd, 32, 0).decode("ascii", "replace") \
                    .strip().partition(" ")
                if closing != "closing" or _conversing(fd) or time.monotonic() > deadline:
                    os.close(fd)
                    return None, holder if holder.isdigit() else ""
                time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise
    # (its pid only names the holder to a refused receiver: not written on a full disk,
    # where raising kept the lock held, by a descriptor no one closed: every later
    # conversation of a --listen was refused 'busy' until it ended)
    _converse(fd, True)
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, ""


def say_closing(fd: int) -> None:
    """The conversation holding lock file ``fd`` is over (what it received is being
    written out): a receiver may wait for it."""
    with contextlib.suppress(OSError):
        os.pwrite(fd, f"{os.getpid()} closing\n".encode(), 0)
    _converse(fd, False)


def _converse(fd: int, on: bool) -> None:
    """Hold (``on``) or let go of the OFD lock of lock file ``fd``'s first byte that says a
    conversation goes on (where the filesystem takes no OFD locks, nothing is said: a
    receiver reads the ``closing`` mark alone)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    _FLOCK.pack(fcntl.F_WRLCK if on else fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0))


def _conversing(fd: int) -> bool:
    """Whether another open of the lock file holds its first byte: the holder of DEST is in
    a conversation, whatever the file says."""
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
    except OSError:
        return False
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)
