"""A sendshot record read, inflated and hashed by a thread before it is asked for.

``btrdelta send --from-sendshot`` spends its first ~15-20 ms importing modules (Python byte
code: one core, the GIL held), then reads its base record whole: the file, zstd of its
body (1.4 MB for the sendshot benchmark's in-place tree, 10.2 MB for the large one), BLAKE3
of header and body (its digest, the record's name). zstd and BLAKE3 release the GIL, so
:func:`start` (called by ``__main__`` as soon as the words say such a send) gives that part
to a thread on the other core while the imports run; :func:`take` hands the inflated body
and its digest to :class:`~.sendshot.RecordReader` when it reads the same file.

Which record: the send resolves its base (``latest``: the newest of its source's
lineage; a patch record's chain down to the record with every row) only once the source
is frozen and the store listed. The thread guesses the record every such chain ends in:
the newest one (by modification time) that is not a patch record (:data:`PATCH`), if it is
large enough to be worth it (:data:`LEAST`). A guess
that is not the record read costs the other core its work, and this one a wait of at most
what the thread had left; nothing else: the reader reads the file as before.

Integrity is the reader's as before: the body is the file's bytes after the header the
reader read (:func:`take` compares the header, and the file's identity: device, inode,
size, modification time; records are written once, under a new name), inflated with the
same limits (a frame that declares its size, at most :data:`MAX_RATIO` times the
compressed bytes, nothing after it), and the digest is of that header and body, which the
reader checks against the record's name once it decoded the whole body with nothing left
over (its CRC32C of every frame and its checks of the columns are done as before). Any
error in the thread (a file removed, damaged, unreadable) leaves nothing to take: the
reader reads the file itself and reports what is wrong with it.

The thread is a bare ``_thread`` one, not a :class:`threading.Thread`: it imports nothing
(zstd and BLAKE3 are imported before it starts) and is not counted by
``threading.active_count()``, which ``cli._lean`` asks before it imports ``uuid`` and
``argparse`` with their stand-ins (another thread could import them meanwhile: ~5 ms more
for a send) and ``cli.entry`` before its quick exit.
"""

from __future__ import annotations

import _thread
import os
from stat import S_ISREG

from .. import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, BinaryIO, Final

__all__ = ["ALIGNED", "LEAST", "MAGIC", "MAX_RATIO", "PATCH", "PATCHES", "RECORDS", "SUFFIX",
           "inflate", "start", "take"]

MAGIC: Final = b"btrdelta-sendshot\0"
#: the version of a *patch record*: a record that names its base record (HEAD's BASE)
#: and holds only the rows dropped from it and the rows replaced or added (its digests are
#: version 4's kind); :mod:`.chain` reads a base with its patches
PATCH: Final = 5
#: the versions whose columns (and a patch's DROP and SLOTS) are each one record of the
#: column's bytes, 8-aligned in the body: read where they lie (version 6: a whole record,
#: version 4's kind; 7: a patch record, version 5's; 8 and 9: the same with SEQUENCE)
ALIGNED: Final = (6, 7, 8, 9)
#: the versions of patch records
PATCHES: Final = (PATCH, 7, 9)
#: a record whose zstd frame declares more than this many times its compressed size is
#: decoded as a stream (a size that cannot be true is not allocated up front)
MAX_RATIO: Final = 1024
#: a store's directory of records, and how their file names end (``send.store``)
RECORDS: Final = "records"
SUFFIX: Final = ".sendshot"
#: the newest records whose headers are read to find one that is not a patch record
_LOOK = 16
#: a store of more records than this is not looked at (each one's ``stat``, under the
#: GIL, is time taken from the imports: ~5 µs)
_MANY = 256
#: a record whose body is smaller than this (inflated: what inflating and hashing cost, as
#: its zstd frame declares it; a record that does not declare it is decoded as a stream) is
#: left to the reader: inflated and hashed in under a millisecond (the in-place tree's 1.48 MB
#: body: ~0.5 ms), less than the other core's time is worth to a live send, whose
#: snapshot's commit waits for the kernel's threads (its live rounds took 3-5 ms more wall
#: time with it read ahead; the large tree's 10.5 MB body, ~7.5 ms of its reader's, is read
#: ahead). Until session 31 this was 2 MiB of the file, which a record written with a wide
#: window (``sendshot._WIDE_LOG``: the large tree's in 1.72 MB) no longer says
LEAST: Final = 4 << 20

#: the thread's work: the identity of the file read -> (its header, the inflated body,
#: the digest in hex); and the lock it holds until it is done (None: not started)
_got: dict[tuple[int, int, int, int], tuple[bytes, bytes, str]] = {}
_busy: Any = None


def start(records: str) -> None:
    """Read, inflate and hash the newest record in the directory ``records`` that is not a
    patch record, in a thread (once a process; nothing when the directory cannot be
    listed: the send reports what it finds)."""
    global _busy
    if _busy is not None:
        return
    import blake3

    from .._zstd import zstd

    busy = _thread.allocate_lock()
    busy.acquire()
    _busy = busy
    try:
        _thread.start_new_thread(_run, (records, busy, zstd, blake3))
    except RuntimeError:  # (no thread can be started: read when asked for)
        busy.release()


def _run(records: str, busy: Any, zstd: Any, blake3: Any) -> None:
    try:
        names = [n for n in os.listdir(records) if n.endswith(SUFFIX)]
        if len(names) > _MANY:
            return
        # (regular files only: a FIFO's open would wait forever)
        newest = sorted(((st.st_mtime_ns, p) for n in names
                         if S_ISREG((st := os.stat(p := os.path.join(records, n))).st_mode)),
                        reverse=True)
        for _mtime, path in newest[:_LOOK]:
            with open(path, "rb", buffering=0) as f:
                header = f.read(len(MAGIC) + 4)
                if not header.startswith(MAGIC) or \
                        int.from_bytes(header[len(MAGIC):], "little") in PATCHES:
                    continue
                st = os.fstat(f.fileno())
                if _declared(zstd, os.pread(f.fileno(), 18, len(header))) < LEAST:
                    return
                data = f.read()
            if (body := inflate(zstd, data)) is not None:
                digest = blake3.blake3(header)
                digest.update(body)
                _got[st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns] = \
                    (header, body, digest.hexdigest())
            return
    except Exception:
        pass  # (the reader reads the file itself, and says what is wrong with it)
    finally:
        busy.release()


def _declared(zstd: Any, frame: bytes) -> int:
    """The content size the zstd frame starting ``frame`` (its first 18 bytes: a frame
    header at most) declares; -1 if none (a record that does not is decoded as a stream by
    its reader: :func:`inflate` would not inflate it)."""
    try:
        size: int = zstd.frame_content_size(frame)
    except zstd.ZstdError:
        return -1
    return size


def inflate(zstd: Any, data: bytes) -> bytes | None:
    """A record's body inflated in one piece, if its one frame declares a size it can hold
    (at most :data:`MAX_RATIO` times the compressed bytes: a size that cannot be true is
    not allocated); None: to be decoded as a stream (which says where it is damaged).

    Raises:
        zstd.ZstdError: a damaged frame, or bytes after it.
    """
    size = zstd.frame_content_size(data)
    if 0 <= size <= MAX_RATIO * len(data):
        body: bytes = zstd.ZstdDecompressor().decompress(data, allow_extra_data=False)
        return body
    return None


def take(file: BinaryIO, header: bytes) -> tuple[bytes, str] | None:
    """The inflated body after ``header`` of the record open in ``file`` and the digest of
    both, if the thread of :func:`start` read that file (waiting for it to be done); None
    otherwise. Given once: what the thread read is then dropped."""
    busy = _busy
    if busy is None:
        return None
    with busy:  # (the thread is done)
        pass
    try:
        st = os.fstat(file.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    got = _got.pop((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), None)
    _got.clear()
    if got is None or got[0] != header:
        return None
    return got[1], got[2]
