"""btrfs and Linux file ioctls, with ``fcntl.ioctl`` and ``struct``.

Owns: creating, snapshotting, deleting and finishing subvolumes
(``BTRFS_IOC_SUBVOL_CREATE``, ``SNAP_CREATE_V2``, ``SNAP_DESTROY``, ``SET_RECEIVED_SUBVOL``,
``SUBVOL_GETFLAGS``/``SETFLAGS``), the default subvolume (``BTRFS_IOC_DEFAULT_SUBVOL``; read
back from the root tree as ``btrfs subvolume get-default`` does), reading a subvolume's
identity (``GET_SUBVOL_INFO``), finding a subvolume by (received) UUID through the UUID tree
(``TREE_SEARCH`` + ``INO_LOOKUP``), the inodes changed since a transaction (``TREE_SEARCH``
with ``min_transid``), the data ioctls (``BTRFS_IOC_ENCODED_WRITE``,
``FICLONERANGE``, ``FS_IOC_ENABLE_VERITY``), waiting for deleted subvolumes to be cleaned
(``BTRFS_IOC_SYNC``, ``FS_INFO``), and the inode
flags: ``FS_IOC_GETFLAGS``/``SETFLAGS`` and the one table between btrfs's inode-item flags
(what a send stream's FILEATTR carries) and the ``FS_*_FL`` bits of those ioctls, used
both ways (:data:`FILEATTR_FLAGS`).

Struct layouts and request numbers were checked against ``<linux/btrfs.h>`` and
``<linux/fs.h>`` (the request number encodes the struct size, so a wrong layout fails with
``ENOTTY``, never silently); the C accelerators take the numbers they use from here through
the generated ``_constants.h``. Nothing here knows about streams; errors are plain
:class:`OSError`. The libc calls Python lacks (``fstatfs``'s type, ``syncfs``,
``fallocate``, ``renameat2``) are in :mod:`.libc` (imported here too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import struct
from collections.abc import Callable, Iterator
from uuid import UUID

from .. import TYPE_CHECKING, _native
from .._value import Value, named_tuple
from .libc import fallocate, fs_type, rename_exchange, rename_noreplace, syncfs

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Final, NamedTuple

__all__ = [
    "BTRFS_SUPER_MAGIC",
    "EXTENT",
    "EXTENT_SEARCH",
    "FILEATTR_FLAGS",
    "FS_FLAGS_KNOWN",
    "FS_TREE",
    "IOCTLS",
    "FileattrFlag",
    "SubvolInfo",
    "changed_inodes",
    "extent_item",
    "file_extent_batches",
    "file_extents",
    "largest_item",
    "dir_path",
    "clone_range",
    "create_snapshot",
    "create_subvolume",
    "default_subvolume",
    "deleted_subvolumes",
    "delete_subvolume",
    "encoded_write",
    "enable_verity",
    "fallocate",
    "fileattr_to_fsflags",
    "find_subvolumes_by_uuid",
    "fs_type",
    "fs_uuid",
    "fsflags_to_fileattr",
    "get_fileattr",
    "get_fsflags",
    "is_btrfs",
    "rename_exchange",
    "rename_noreplace",
    "set_default_subvolume",
    "set_fsflags",
    "set_readonly",
    "set_received",
    "subvol_info",
    "subvol_path",
    "syncfs",
    "wait_subvolumes_gone",
]

BTRFS_SUPER_MAGIC = 0x9123683E

#: ioctl request numbers (``_IOW``/``_IOR``/``_IOWR`` of the structs used below), by the
#: kernel's name without ``BTRFS_IOC_``/``FS_IOC_`` (the generated C header's ``IOC_<name>``)
IOCTLS: Final = {
    "SUBVOL_CREATE": 0x5000940E,
    "SNAP_CREATE_V2": 0x50009417,
    "SNAP_DESTROY": 0x5000940F,
    "DEFAULT_SUBVOL": 0x40089413,
    "SET_RECEIVED_SUBVOL": 0xC0C89425,
    "SUBVOL_GETFLAGS": 0x80089419,
    "SUBVOL_SETFLAGS": 0x4008941A,
    "TREE_SEARCH": 0xD0009411,
    "TREE_SEARCH_V2": 0xC0709411,  # _IOWR(0x94, 17, struct btrfs_ioctl_search_args_v2)
    "INO_LOOKUP": 0xD0009412,
    "ENCODED_WRITE": 0x40809440,
    "GET_SUBVOL_INFO": 0x81F8943C,
    "FICLONERANGE": 0x4020940D,
    "FS_ENABLE_VERITY": 0x40806685,
    "FS_GETFLAGS": 0x80086601,
    "FS_SETFLAGS": 0x40086602,
    "SYNC": 0x9408,  # _IO(0x94, 8)
    "FS_INFO": 0x8400941F,  # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args): 1024 bytes
}
_SUBVOL_CREATE = IOCTLS["SUBVOL_CREATE"]
_SNAP_CREATE_V2 = IOCTLS["SNAP_CREATE_V2"]
_SNAP_DESTROY = IOCTLS["SNAP_DESTROY"]
_DEFAULT_SUBVOL = IOCTLS["DEFAULT_SUBVOL"]
_SET_RECEIVED_SUBVOL = IOCTLS["SET_RECEIVED_SUBVOL"]
_SUBVOL_GETFLAGS = IOCTLS["SUBVOL_GETFLAGS"]
_SUBVOL_SETFLAGS = IOCTLS["SUBVOL_SETFLAGS"]
_TREE_SEARCH = IOCTLS["TREE_SEARCH"]
_TREE_SEARCH_V2 = IOCTLS["TREE_SEARCH_V2"]
_INO_LOOKUP = IOCTLS["INO_LOOKUP"]
_ENCODED_WRITE = IOCTLS["ENCODED_WRITE"]
_GET_SUBVOL_INFO = IOCTLS["GET_SUBVOL_INFO"]
_FICLONERANGE = IOCTLS["FICLONERANGE"]
_FS_IOC_ENABLE_VERITY = IOCTLS["FS_ENABLE_VERITY"]
_FS_IOC_GETFLAGS = IOCTLS["FS_GETFLAGS"]
_FS_IOC_SETFLAGS = IOCTLS["FS_SETFLAGS"]
_IOC_SYNC = IOCTLS["SYNC"]
_FS_INFO = IOCTLS["FS_INFO"]


#: One btrfs inode-item flag that has a ``chattr`` equivalent: ``BTRFS_INODE_<name>`` and
#: its ``bit`` in the inode item (and in a stream's FILEATTR), the ``FS_IOC_GETFLAGS`` /
#: ``SETFLAGS`` flag ``fs_name`` and its ``fs_bit`` (``<linux/fs.h>``). (The call form: this
#: module's annotations are strings, and the class form would compile each at import.)
if TYPE_CHECKING:
    FileattrFlag = NamedTuple(  # noqa: UP014 (see above)
        "FileattrFlag", [("name", str), ("bit", int), ("fs_name", str), ("fs_bit", int)])
else:  # (typing is not imported at start-up)
    FileattrFlag = named_tuple("FileattrFlag", lambda _cls, name, bit, fs_name, fs_bit:
                               tuple.__new__(_cls, (name, bit, fs_name, fs_bit)), __name__)
FileattrFlag.__doc__ = "One btrfs inode-item flag that has a ``chattr`` equivalent."


#: btrfs inode-item flags <-> ``FS_*_FL`` bits, the one table read both ways
FILEATTR_FLAGS: Final = (
    FileattrFlag("NODATACOW", 0x2, "FS_NOCOW_FL", 0x00800000),
    FileattrFlag("NOCOMPRESS", 0x8, "FS_NOCOMP_FL", 0x00000400),
    FileattrFlag("SYNC", 0x20, "FS_SYNC_FL", 0x00000008),
    FileattrFlag("IMMUTABLE", 0x40, "FS_IMMUTABLE_FL", 0x00000010),
    FileattrFlag("APPEND", 0x80, "FS_APPEND_FL", 0x00000020),
    FileattrFlag("NODUMP", 0x100, "FS_NODUMP_FL", 0x00000040),
    FileattrFlag("NOATIME", 0x200, "FS_NOATIME_FL", 0x00000080),
    FileattrFlag("DIRSYNC", 0x400, "FS_DIRSYNC_FL", 0x00010000),
    FileattrFlag("COMPRESS", 0x800, "FS_COMPR_FL", 0x00000004),
)
#: every ``FS_*_FL`` bit of :data:`FILEATTR_FLAGS`
FS_FLAGS_KNOWN: Final = sum(f.fs_bit for f in FILEATTR_FLAGS)
#: errors of ``FS_IOC_GETFLAGS`` that mean "no flags here" (filesystem, file type, rights)
_NO_FLAGS = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM,
             errno.EACCES)

_SUBVOL_RDONLY = 1 << 1
_VOL_NAME_MAX = 4087  # BTRFS_PATH_NAME_MAX
_ROOT_TREE = 1
#: id of the top-level subvolume (``BTRFS_FS_TREE_OBJECTID``)
FS_TREE: Final = 5
_ROOT_TREE_DIR = 6  # BTRFS_ROOT_TREE_DIR_OBJECTID: holds the "default" dir item
_UUID_TREE = 9
_DIR_ITEM_KEY = 84
_ROOT_BACKREF_KEY = 144
_ROOT_ITEM_KEY = 132
_ORPHAN_OBJECTID = (1 << 64) - 5  # BTRFS_ORPHAN_OBJECTID: deleted subvolumes wait here
_ORPHAN_ITEM_KEY = 48
_UUID_KEY_SUBVOL = 251
_UUID_KEY_RECEIVED_SUBVOL = 252

_SEARCH_KEY = struct.Struct("<7Q4I4Q")  # 104 bytes
_SEARCH_HDR = struct.Struct("<3Q2I")  # 32 bytes
_ROOT_REF = struct.Struct("<QQH")
_U64_MAX = (1 << 64) - 1



def _ioctl(fd: int, request: int, buf: bytearray) -> None:
    """``fcntl.ioctl(fd, request, buf)`` without the GIL (the ``sweep`` accelerator's call):
    Python 3.11's keeps it for the whole call when ``buf`` is over 1 KiB (vol args, searches,
    INO_LOOKUP), stopping every other thread (a snapshot: 6-15 ms; its deletion: 15-90 ms)."""
    native = _native.live("sweep")
    (fcntl.ioctl if native is None else native.search)(fd, request, buf)


def _vol_args(name: bytes, fd: int = 0) -> bytearray:
    if len(name) > _VOL_NAME_MAX:
        raise OSError(36, "subvolume name too long")  # ENAMETOOLONG
    buf = bytearray(4096)
    struct.pack_into(f"<q{len(name)}s", buf, 0, fd, name)
    return buf


def is_btrfs(fd: int) -> bool:
    """True when ``fd`` lives on a btrfs filesystem."""
    return fs_type(fd) == BTRFS_SUPER_MAGIC


def create_subvolume(dir_fd: int, name: bytes) -> None:
    """Create an empty subvolume ``name`` in directory ``dir_fd``."""
    _ioctl(dir_fd, _SUBVOL_CREATE, _vol_args(name))


def create_snapshot(dir_fd: int, name: bytes, source_fd: int, *, readonly: bool = False) -> None:
    """Snapshot the subvolume open as ``source_fd`` to ``name`` in ``dir_fd`` (writable)."""
    buf = bytearray(4096)
    struct.pack_into("<qQQ", buf, 0, source_fd, 0, _SUBVOL_RDONLY if readonly else 0)
    if len(name) > 4039:
        raise OSError(36, "subvolume name too long")
    buf[56 : 56 + len(name)] = name
    _ioctl(dir_fd, _SNAP_CREATE_V2, buf)


def delete_subvolume(dir_fd: int, name: bytes) -> None:
    """Delete subvolume ``name`` of directory ``dir_fd`` (its content too)."""
    _ioctl(dir_fd, _SNAP_DESTROY, _vol_args(name))


def set_received(fd: int, received_uuid: UUID, stransid: int) -> None:
    """Store the received UUID and sent transid on the subvolume open as ``fd``."""
    buf = bytearray(200)
    buf[0:16] = received_uuid.bytes
    struct.pack_into("<Q", buf, 16, stransid)
    fcntl.ioctl(fd, _SET_RECEIVED_SUBVOL, buf)


def set_default_subvolume(fd: int, subvol_id: int | None = None) -> None:
    """Make subvolume ``subvol_id`` (default: the one containing ``fd``) the one a mount
    without ``subvol=``/``subvolid=`` shows, on the filesystem holding ``fd``
    (``btrfs subvolume set-default``)."""
    if subvol_id is None:
        subvol_id = subvol_info(fd).id
    fcntl.ioctl(fd, _DEFAULT_SUBVOL, struct.pack("<Q", subvol_id))


#: struct btrfs_dir_item: location key, transid, data_len, name_len, type; the name follows
_DIR_ITEM = struct.Struct("<QBQQHHB")


def default_subvolume(fd: int) -> int:
    """Id of the default subvolume of the filesystem holding ``fd`` (``btrfs subvolume
    get-default``): the ``default`` entry of the root tree's directory, else the top level."""
    for _off, data in _tree_search(fd, _ROOT_TREE, _ROOT_TREE_DIR, _DIR_ITEM_KEY):
        pos = 0
        while pos + _DIR_ITEM.size <= len(data):  # one hash bucket may hold several items
            objectid, _t, _o, _tr, data_len, name_len, _ty = _DIR_ITEM.unpack_from(data, pos)
            start = pos + _DIR_ITEM.size
            if data[start : start + name_len] == b"default":
                return int(objectid)
            pos = start + name_len + data_len
    return FS_TREE


def set_readonly(fd: int, readonly: bool = True) -> None:
    """Set or clear the read-only flag of the subvolume open as ``fd``."""
    got = bytearray(8)
    fcntl.ioctl(fd, _SUBVOL_GETFLAGS, got)
    flags = struct.unpack("<Q", got)[0]
    flags = flags | _SUBVOL_RDONLY if readonly else flags & ~_SUBVOL_RDONLY
    fcntl.ioctl(fd, _SUBVOL_SETFLAGS, struct.pack("<Q", flags))


class SubvolInfo(Value):
    """Identity of a subvolume (from ``BTRFS_IOC_GET_SUBVOL_INFO``)."""

    id: int
    uuid: UUID
    parent_uuid: UUID | None
    received_uuid: UUID | None
    ctransid: int
    stransid: int
    readonly: bool
    #: the transid the subvolume was created in
    otransid: int = 0


def _opt_uuid(raw: bytes) -> UUID | None:
    return UUID(bytes=raw) if any(raw) else None


def subvol_info(fd: int) -> SubvolInfo:
    """Identity of the subvolume containing ``fd``."""
    buf = bytearray(504)
    fcntl.ioctl(fd, _GET_SUBVOL_INFO, buf)
    (treeid,) = struct.unpack_from("<Q", buf, 0)
    (flags,) = struct.unpack_from("<Q", buf, 288)
    ctransid, otransid, stransid = struct.unpack_from("<3Q", buf, 344)
    return SubvolInfo(
        id=treeid, uuid=UUID(bytes=bytes(buf[296:312])),
        parent_uuid=_opt_uuid(bytes(buf[312:328])), received_uuid=_opt_uuid(bytes(buf[328:344])),
        ctransid=ctransid, stransid=stransid, otransid=otransid,
        readonly=bool(flags & 1),  # BTRFS_ROOT_SUBVOL_RDONLY in the root item
    )


def _tree_search(
    fd: int, tree: int, objectid: int, key_type: int, offset_min: int = 0,
    offset_max: int = _U64_MAX,
) -> Iterator[tuple[int, bytes]]:
    """Items ``(key offset, data)`` of ``(objectid, key_type, offset_min..offset_max)``."""
    while True:
        buf = bytearray(4096)
        _SEARCH_KEY.pack_into(buf, 0, tree, objectid, objectid, offset_min, offset_max, 0,
                              _U64_MAX, key_type, key_type, 4096, 0, 0, 0, 0, 0)
        _ioctl(fd, _TREE_SEARCH, buf)
        nr_items = struct.unpack_from("<I", buf, 64)[0]
        if not nr_items:
            return
        pos = _SEARCH_KEY.size
        last_offset = 0
        for _ in range(nr_items):
            _transid, obj, off, typ, length = _SEARCH_HDR.unpack_from(buf, pos)
            pos += _SEARCH_HDR.size
            if obj == objectid and typ == key_type:
                yield off, bytes(buf[pos : pos + length])
            last_offset = off
            pos += length
        if last_offset >= offset_max:
            return
        offset_min = last_offset + 1


_INODE_ITEM_KEY = 1

#: the result buffer of a change sweep (TREE_SEARCH_V2): a few thousand changed inodes in a
#: handful of calls (TREE_SEARCH's 4 KiB took hundreds); not 1 MiB: the kernel faults the
#: whole buffer in (256 page faults), docs/performance.md "Session 18"
_SWEEP_BUFFER = 128 << 10


def changed_inodes(fd: int, since: int, extents: dict[int, list[bytes | None]] | None = None,
                   written: set[int] | None = None) -> dict[int, tuple[int, int, int]]:
    """Inodes of the subvolume holding ``fd`` whose inode item changed after transaction
    ``since``: ``{ino: (generation, transid, sequence)}`` (needs ``CAP_SYS_ADMIN``).

    One ``TREE_SEARCH_V2`` sweep (``TREE_SEARCH`` on kernels without it) with
    ``min_transid = since + 1``: the kernel skips every tree block not written since (as
    ``btrfs subvolume find-new`` does), so the cost follows the changes, not the size of the
    subvolume. An inode item's transid is the transaction that last wrote it: any change of
    data, metadata or names (ctime) rewrites it, an atime too (not its sequence: ``rescan``).

    ``extents``: also collect the file extent items the sweep returns (every one of the
    subvolume when ``since`` is 0), ``{ino: [item packed as EXTENT, or None (cannot be
    compared: extent_item), ...]}`` in file order: a whole tree's items without a search
    per file. ``written``: also collect the inodes with file extent items written since.
    """
    out: dict[int, tuple[int, int, int]] = {}
    min_obj, min_type, min_off = 0, 0, 0

    def key(buf: bytearray) -> None:
        _SEARCH_KEY.pack_into(buf, 0, 0, min_obj, _U64_MAX, min_off, _U64_MAX, since + 1,
                              _U64_MAX, min_type, 255, 0xFFFFFFFF, 0, 0, 0, 0, 0)

    native = _native.live("sweep")
    if native is None:
        from . import sweepref
    items = native.inodes if native is not None else sweepref.inodes
    for buf, pos, nr_items in _searches(fd, _SWEEP_BUFFER, key):
        obj, typ, off = items(buf, pos, nr_items, _INODE_ITEM_KEY, since, out, written)
        if extents is not None:
            _extent_items(buf, pos, nr_items, extents)
        # the next key after the last one returned
        if off < _U64_MAX:
            min_obj, min_type, min_off = obj, typ, off + 1
        elif typ < 255:
            min_obj, min_type, min_off = obj, typ + 1, 0
        elif obj < _U64_MAX:
            min_obj, min_type, min_off = obj + 1, 0, 0
        else:
            break
    return out


def _extent_items(buf: bytearray, pos: int, nr_items: int,
                  out: dict[int, list[bytes | None]]) -> None:
    """Append the file extent items among the ``nr_items`` search results in ``buf`` from
    ``pos`` to ``out[objectid]`` (:func:`changed_inodes`' ``extents``)."""
    for obj, off, typ, at, length in _results(buf, pos, nr_items):
        if typ == _EXTENT_DATA_KEY:
            out.setdefault(obj, []).append(extent_item(buf, at, length, off))


def _results(buf: bytearray, pos: int, nr_items: int
             ) -> Iterator[tuple[int, int, int, int, int]]:
    """(objectid, offset, type, where its item starts, its length) of each of the
    ``nr_items`` search results in ``buf`` from ``pos``; a ValueError past the buffer."""
    header, size = _SEARCH_HDR.unpack_from, len(buf)
    for _ in range(nr_items):
        if pos + 32 > size:
            raise ValueError("a search result runs past the buffer")
        _transid, obj, off, typ, length = header(buf, pos)
        if pos + 32 + length > size:
            raise ValueError("a search result runs past the buffer")
        yield obj, off, typ, pos + 32, length
        pos += 32 + length





def _searches(fd: int, size: int, key: Callable[[bytearray], None],
              buf: bytearray | None = None) -> Iterator[tuple[bytearray, int, int]]:
    """The results of ``TREE_SEARCH_V2`` calls with a ``size``-byte result buffer
    (``TREE_SEARCH`` and its 4 KiB on kernels without it), one ``(buffer, offset of its first
    item, number of items)`` per call, until a call finds none. ``key(buffer)`` packs the
    search key before each call: the caller moves it past the last item it was given.
    ``buf``: the buffer to use, if it has the size (the header's and ``size``)."""
    request, start = _TREE_SEARCH_V2, _SEARCH_KEY.size + 8
    if buf is None or len(buf) != start + size:
        buf = bytearray(start + size)
    while True:
        key(buf)
        if request == _TREE_SEARCH_V2:
            struct.pack_into("<Q", buf, _SEARCH_KEY.size, size)
        try:
            _ioctl(fd, request, buf)
        except OSError as exc:
            if request != _TREE_SEARCH_V2 or exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            request, start, buf = _TREE_SEARCH, _SEARCH_KEY.size, bytearray(4096)
            continue
        nr_items = struct.unpack_from("<I", buf, 64)[0]
        if not nr_items:
            return
        yield buf, start, nr_items


_EXTENT_DATA_KEY = 108
#: ``btrfs_file_extent_item`` up to its type (generation, ram_bytes, compression,
#: encryption, other_encoding, type), then a regular or prealloc extent's disk_bytenr,
#: disk_num_bytes, offset, num_bytes
_FE_HEAD = struct.Struct("<QQBBHB")
_FE_BODY = struct.Struct("<QQQQ")
#: one extent as :func:`file_extent_batches` gives it: file offset, num_bytes, disk_bytenr,
#: disk_num_bytes, offset in the extent, generation, type, compression (50 bytes)
EXTENT = struct.Struct("<QQQQQQBB")
#: ``BTRFS_FILE_EXTENT_INLINE``, ``_REG``, ``_PREALLOC``
EXTENT_INLINE, EXTENT_REG, EXTENT_PREALLOC = 0, 1, 2
_EXTENT_BUFFER = 1 << 16
_V2_START = _SEARCH_KEY.size + 8  # (a TREE_SEARCH_V2 result's first item)
EXTENT_SEARCH = _V2_START + _EXTENT_BUFFER  # (a buffer for file_extent_batches' searches)
_LEAF_OVERHEAD = 101 + 25  # (BTRFS_MAX_ITEM_SIZE: the node size less a leaf's, an item's header)


def largest_item(fd: int) -> int:
    """The largest item the filesystem holding ``fd`` can hold (``BTRFS_MAX_ITEM_SIZE``, of
    its node size from ``BTRFS_IOC_FS_INFO``; of 64 KiB, the most, where it does not say)."""
    buf = bytearray(1024)
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, _FS_INFO, buf)
    nodesize = int.from_bytes(buf[32:36], "little")  # (0: not said)
    return (nodesize if 0 < nodesize <= 1 << 16 else 1 << 16) - _LEAF_OVERHEAD


def file_extents(fd: int, ino: int, item_max: int = 0, into: bytearray | None = None
                 ) -> bytes | None:
    """All of :func:`file_extent_batches` joined, or None (a send takes them a batch at a
    time: a file's items may be millions)."""
    out = bytearray()  # (50 bytes an item: a list of them took ~140 while joined)
    for batch in file_extent_batches(fd, ino, item_max, into):
        if batch is None:
            return None
        out += batch
    return bytes(out)


def file_extent_batches(fd: int, ino: int, item_max: int = 0, into: bytearray | None = None
                        ) -> Iterator[bytes | None]:
    """The file extent items (``EXTENT_DATA``) of inode ``ino`` of the subvolume holding
    ``fd``, in file order, each packed as :data:`EXTENT`, one search's at a time (up to
    ~1,300: a file's items may be millions); a None ends them when one cannot be compared
    by its fields (inline data, encryption or another encoding, an unknown type). Needs
    ``CAP_SYS_ADMIN`` (``TREE_SEARCH_V2``, ``TREE_SEARCH`` on kernels without it).

    Most files take one search, not a second that finds nothing: the kernel
    (``search_ioctl``/``copy_to_sk``, ``fs/btrfs/ioctl.c``) ends a ``TREE_SEARCH_V2`` before
    the last item in the key range only when the next one does not fit in what is left of
    the buffer (its 32-byte header and the item; or when 2^32 - 1 items were found), so a
    result that leaves room for a header and the largest item the filesystem can hold
    (:func:`largest_item`; ``item_max``: it, asked already) is every item there is.
    ``TREE_SEARCH`` (4 KiB, older kernels) is searched until it finds none. ``into``: a
    buffer of :data:`EXTENT_SEARCH` bytes to search with, else one is made (and zeroed).
    A buffer's items are read in C (the ``sweep`` accelerator) or by :func:`.sweepref.extents`.
    """
    min_off = 0
    room = 0  # (what a complete result leaves: asked when needed)

    def key(buf: bytearray) -> None:
        _SEARCH_KEY.pack_into(buf, 0, 0, ino, ino, min_off, _U64_MAX, 0, _U64_MAX,
                              _EXTENT_DATA_KEY, _EXTENT_DATA_KEY, 0xFFFFFFFF, 0, 0, 0, 0, 0)

    native = _native.live("sweep")
    if native is None:
        from . import sweepref
    parse = sweepref.extents if native is None else native.extents
    for buf, first, nr_items in _searches(fd, _EXTENT_BUFFER, key, into):
        items, off, pos = parse(buf, first, nr_items, ino)
        yield items
        if items is None or off >= _U64_MAX:
            return
        if first == _V2_START:
            room = room or _SEARCH_HDR.size + (item_max or largest_item(fd))
            if pos - first + room <= _EXTENT_BUFFER:
                return  # every item fitted with room to spare: there is no other
        min_off = off + 1





def extent_item(buf: bytearray, pos: int, length: int, off: int) -> bytes | None:
    """The file extent item of ``length`` bytes at ``pos`` of ``buf`` (a search result;
    its key's offset ``off``), packed as :data:`EXTENT`; None when it cannot be compared
    by its fields (inline data, encryption or another encoding, an unknown type)."""
    if length < _FE_HEAD.size:
        return None
    gen, _ram, comp, enc, other, kind = _FE_HEAD.unpack_from(buf, pos)
    if enc or other or kind not in (EXTENT_REG, EXTENT_PREALLOC) or \
            length < _FE_HEAD.size + _FE_BODY.size:
        return None  # inline data, or an item this code does not know
    bytenr, disk_bytes, ext_off, num = _FE_BODY.unpack_from(buf, pos + _FE_HEAD.size)
    return EXTENT.pack(off, num, bytenr, disk_bytes, ext_off, gen, kind, comp)


def dir_path(fd: int, ino: int) -> bytes | None:
    """The path of directory ``ino`` relative to the subvolume holding ``fd`` (``b""``: its
    root), from its back reference (``BTRFS_IOC_INO_LOOKUP``, needs ``CAP_SYS_ADMIN``); None
    when no entry leads to it any more."""
    try:
        path = _ino_lookup(fd, 0, ino)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return path.rstrip(b"/")


def _ino_lookup(fd: int, tree: int, objectid: int) -> bytes:
    buf = bytearray(4096)
    struct.pack_into("<QQ", buf, 0, tree, objectid)
    _ioctl(fd, _INO_LOOKUP, buf)
    return bytes(buf[16:]).split(b"\0", 1)[0]


def _subvol_path(fd: int, subvol_id: int) -> bytes | None:
    """Path of subvolume ``subvol_id`` relative to the top-level subvolume (``None``: gone)."""
    parts: list[bytes] = []
    cur = subvol_id
    for _ in range(4096):
        if cur == FS_TREE:
            return b"".join(reversed(parts))
        refs = list(_tree_search(fd, _ROOT_TREE, cur, _ROOT_BACKREF_KEY))
        if not refs:
            return None
        parent_id, data = refs[0]
        dirid, _seq, name_len = _ROOT_REF.unpack_from(data, 0)
        name = data[_ROOT_REF.size : _ROOT_REF.size + name_len]
        dir_path = _ino_lookup(fd, parent_id, dirid)
        parts.append(dir_path + name + (b"/" if parts else b""))
        cur = parent_id
    return None


def subvol_path(fd: int, subvol_id: int) -> bytes | None:
    """Path of subvolume ``subvol_id`` below the top-level subvolume of the filesystem
    holding ``fd`` (``b""`` for the top level itself, ``None`` when it is gone)."""
    return _subvol_path(fd, subvol_id)


def fs_uuid(fd: int) -> UUID:
    """The filesystem's UUID (``BTRFS_IOC_FS_INFO``), the same from every subvolume."""
    buf = bytearray(1024)
    fcntl.ioctl(fd, _FS_INFO, buf)
    return UUID(bytes=bytes(buf[16:32]))


def deleted_subvolumes(fd: int) -> list[int]:
    """Ids of subvolumes deleted but not yet cleaned up (ORPHAN items of the root tree)."""
    return [off for off, _ in _tree_search(fd, _ROOT_TREE, _ORPHAN_OBJECTID, _ORPHAN_ITEM_KEY)]


def wait_subvolumes_gone(fd: int, ids: list[int] | None = None,
                         timeout: float = 60.0) -> bool:
    """Wait until deleted subvolumes ``ids`` (default: all that wait) are cleaned up, their
    space given back, as ``btrfs subvolume sync`` does: their ROOT_ITEMs leave the root
    tree. False on timeout.
    """
    import time

    deadline = time.monotonic() + timeout
    left = deleted_subvolumes(fd) if ids is None else list(ids)
    while left:
        fcntl.ioctl(fd, _IOC_SYNC)  # commits, and wakes the cleaner that drops them
        left = [i for i in left if any(True for _ in _tree_search(
            fd, _ROOT_TREE, i, _ROOT_ITEM_KEY))]
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _mount_of(path: Path) -> tuple[Path, bytes]:
    """``(mount point, subvolume path mounted there)`` of the btrfs holding ``path``."""
    from pathlib import Path

    real = os.path.realpath(path)
    best: tuple[str, bytes] | None = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            if fields[sep + 1] != b"btrfs":
                continue
            root = _unescape(fields[3])
            mnt = _unescape(fields[4]).decode("utf-8", "surrogateescape")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (
                best is None or len(mnt) >= len(best[0])
            ):
                best = (mnt, root)
    if best is None:
        raise OSError(2, f"no btrfs mount holds {path}")
    return Path(best[0]), best[1].strip(b"/")


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def find_subvolumes_by_uuid(dest: Path, wanted: UUID) -> list[Path]:
    """Directories of subvolumes on ``dest``'s btrfs whose received UUID, else UUID, is
    ``wanted``, as ``btrfs receive`` looks them up; those below ``dest`` come first.

    Only subvolumes reachable through the mount that holds ``dest`` are returned.
    """
    from pathlib import Path

    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mnt, mounted = _mount_of(dest)
        lo = int.from_bytes(wanted.bytes[:8], "little")
        hi = int.from_bytes(wanted.bytes[8:], "little")
        found: list[Path] = []
        for key_type in (_UUID_KEY_RECEIVED_SUBVOL, _UUID_KEY_SUBVOL):
            for _off, data in _tree_search(fd, _UUID_TREE, lo, key_type, hi, hi):
                for (sid,) in struct.iter_unpack("<Q", data[: len(data) // 8 * 8]):
                    rel = _subvol_path(fd, sid)
                    if rel is None:
                        continue
                    if mounted:
                        if not rel.startswith(mounted + b"/"):
                            continue
                        rel = rel[len(mounted) + 1 :]
                    p = mnt / os.fsdecode(rel)
                    if p not in found and p.is_dir():
                        found.append(p)
            if found:
                break
    finally:
        os.close(fd)
    dest_real = Path(os.path.realpath(dest))
    found.sort(key=lambda p: not p.is_relative_to(dest_real))
    return found


# -- data ioctls -----------------------------------------------------------------------


@functools.cache
def _iovec() -> Any:
    import ctypes

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    return IoVec


_ENCODED_ARGS = struct.Struct("<QQqQQQQII64x")  # struct btrfs_ioctl_encoded_io_args


def encoded_write(
    fd: int, data: Any, offset: int, length: int, unencoded_len: int,
    unencoded_offset: int, compression: int, encryption: int = 0,
) -> None:
    """``BTRFS_IOC_ENCODED_WRITE``: store already-compressed ``data`` as one extent."""
    import ctypes

    mv = memoryview(data).cast("B")
    if mv.readonly or not len(mv):
        keep: Any = ctypes.create_string_buffer(bytes(mv), max(1, len(mv)))
        addr = ctypes.addressof(keep)
    else:
        keep = ctypes.c_char.from_buffer(mv)  # the first byte: its address is the buffer's
        addr = ctypes.addressof(keep)
    iov = _iovec()(addr, len(mv))
    args = _ENCODED_ARGS.pack(ctypes.addressof(iov), 1, offset, 0, length, unencoded_len,
                              unencoded_offset, compression, encryption)
    try:
        fcntl.ioctl(fd, _ENCODED_WRITE, args)
    finally:
        del keep


def clone_range(dst_fd: int, dst_offset: int, src_fd: int, src_offset: int, length: int) -> None:
    """``FICLONERANGE``: share ``length`` bytes (0 = to EOF) of ``src_fd`` into ``dst_fd``."""
    fcntl.ioctl(dst_fd, _FICLONERANGE, struct.pack("<qQQQ", src_fd, src_offset, length,
                                                   dst_offset))


def enable_verity(fd: int, algorithm: int, block_size: int, salt: bytes, sig: bytes) -> None:
    """``FS_IOC_ENABLE_VERITY`` on a file opened read-only."""
    import ctypes

    salt_buf = ctypes.create_string_buffer(salt, max(1, len(salt)))
    sig_buf = ctypes.create_string_buffer(sig, max(1, len(sig)))
    args = bytearray(128)
    struct.pack_into(
        "<IIIIQIIQ", args, 0, 1, algorithm, block_size, len(salt),
        ctypes.addressof(salt_buf) if salt else 0, len(sig),
        0, ctypes.addressof(sig_buf) if sig else 0,
    )
    fcntl.ioctl(fd, _FS_IOC_ENABLE_VERITY, args)


def get_fsflags(fd: int) -> int:
    """``FS_IOC_GETFLAGS`` (chattr flags)."""
    buf = bytearray(8)
    fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
    return int(struct.unpack("<l", buf[:4])[0]) & 0xFFFFFFFF


def set_fsflags(fd: int, flags: int) -> None:
    """``FS_IOC_SETFLAGS`` (chattr flags)."""
    fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("<q", flags))


def fileattr_to_fsflags(fileattr: int) -> int:
    """The ``FS_*_FL`` bits of btrfs inode flags ``fileattr`` (others are dropped)."""
    flags = 0
    for _name, bit, _fs_name, fs_bit in FILEATTR_FLAGS:
        if fileattr & bit:
            flags |= fs_bit
    return flags


def fsflags_to_fileattr(fsflags: int) -> int:
    """The btrfs inode flags of ``FS_*_FL`` bits ``fsflags`` (others are dropped)."""
    if not fsflags & FS_FLAGS_KNOWN:
        return 0
    out = 0
    for _name, bit, _fs_name, fs_bit in FILEATTR_FLAGS:
        if fsflags & fs_bit:
            out |= bit
    return out


def get_fileattr(fd: int) -> int:
    """The inode flags of open file ``fd`` in btrfs's FILEATTR encoding (0 where the
    filesystem or the file type has none)."""
    try:
        fsflags = get_fsflags(fd)
    except OSError as exc:
        if exc.errno in _NO_FLAGS:
            return 0
        raise
    return fsflags_to_fileattr(fsflags)
