"""One typed record per send-stream command.

Records are small slotted value classes (:mod:`btrdelta._value`, like slotted dataclasses);
treat them as values (the codec never mutates one). Paths, names and xattr values are
``bytes`` (POSIX paths are bytes; decode only to show them). UUIDs are :class:`UUID`, times
are ``int`` nanoseconds since the epoch (signed), file data (``Write.data``,
``EncodedWrite.data``) is a ``memoryview`` into the buffer the command arrived in: it is
valid as long as the record is alive, and a sink that keeps data beyond that copies it.
Field order follows the kernel's attribute order, with attributes that may be absent
(``Utimes.otime`` in v1, ``EncodedWrite.encryption`` for inline extents) last and ``None``
when absent.
"""

from __future__ import annotations

from typing import ClassVar
from uuid import UUID

from .._value import value_class
from .constants import Cmd

__all__ = [
    "RECORD_TYPES",
    "Chmod",
    "Chown",
    "Clone",
    "EnableVerity",
    "EncodedWrite",
    "End",
    "Event",
    "Fallocate",
    "Fileattr",
    "Link",
    "Mkdir",
    "Mkfifo",
    "Mkfile",
    "Mknod",
    "Mksock",
    "Record",
    "RemoveXattr",
    "Rename",
    "Rmdir",
    "SetXattr",
    "Snapshot",
    "StreamHeader",
    "Subvol",
    "Symlink",
    "Truncate",
    "Unlink",
    "UpdateExtent",
    "Utimes",
    "Write",
]

Data = memoryview | bytes


@value_class
class Subvol:
    """Start of a full stream: a new subvolume ``path`` (its own name only)."""

    cmd: ClassVar[Cmd] = Cmd.SUBVOL
    path: bytes
    uuid: UUID
    ctransid: int


@value_class
class Snapshot:
    """Start of an incremental stream: snapshot of the parent ``clone_uuid`` named ``path``."""

    cmd: ClassVar[Cmd] = Cmd.SNAPSHOT
    path: bytes
    uuid: UUID
    ctransid: int
    clone_uuid: UUID
    clone_ctransid: int


@value_class
class Mkfile:
    """Create an empty regular file."""

    cmd: ClassVar[Cmd] = Cmd.MKFILE
    path: bytes
    ino: int


@value_class
class Mkdir:
    """Create a directory."""

    cmd: ClassVar[Cmd] = Cmd.MKDIR
    path: bytes
    ino: int


@value_class
class Mknod:
    """Create a device node; ``mode`` is the full ``st_mode``, ``rdev`` the Linux encoding."""

    cmd: ClassVar[Cmd] = Cmd.MKNOD
    path: bytes
    ino: int
    rdev: int
    mode: int


@value_class
class Mkfifo:
    """Create a FIFO."""

    cmd: ClassVar[Cmd] = Cmd.MKFIFO
    path: bytes
    ino: int
    rdev: int
    mode: int


@value_class
class Mksock:
    """Create a UNIX socket node."""

    cmd: ClassVar[Cmd] = Cmd.MKSOCK
    path: bytes
    ino: int
    rdev: int
    mode: int


@value_class
class Symlink:
    """Create symlink ``path`` pointing to ``target``."""

    cmd: ClassVar[Cmd] = Cmd.SYMLINK
    path: bytes
    ino: int
    target: bytes


@value_class
class Rename:
    """Rename ``path`` to ``path_to`` (atomic replace)."""

    cmd: ClassVar[Cmd] = Cmd.RENAME
    path: bytes
    path_to: bytes


@value_class
class Link:
    """Create hard link ``path`` (the new name) to the existing ``path_link``."""

    cmd: ClassVar[Cmd] = Cmd.LINK
    path: bytes
    path_link: bytes


@value_class
class Unlink:
    """Remove a non-directory name."""

    cmd: ClassVar[Cmd] = Cmd.UNLINK
    path: bytes


@value_class
class Rmdir:
    """Remove an empty directory."""

    cmd: ClassVar[Cmd] = Cmd.RMDIR
    path: bytes


@value_class
class SetXattr:
    """Set extended attribute ``name`` to ``data`` (without following symlinks)."""

    cmd: ClassVar[Cmd] = Cmd.SET_XATTR
    path: bytes
    name: bytes
    data: bytes


@value_class
class RemoveXattr:
    """Remove extended attribute ``name``."""

    cmd: ClassVar[Cmd] = Cmd.REMOVE_XATTR
    path: bytes
    name: bytes


@value_class
class Write:
    """Write ``data`` at ``offset``."""

    cmd: ClassVar[Cmd] = Cmd.WRITE
    path: bytes
    offset: int
    data: Data


@value_class
class Clone:
    """Copy ``length`` bytes from ``clone_path``@``clone_offset`` of subvolume ``clone_uuid``."""

    cmd: ClassVar[Cmd] = Cmd.CLONE
    offset: int
    length: int
    path: bytes
    clone_uuid: UUID
    clone_ctransid: int
    clone_path: bytes
    clone_offset: int


@value_class
class Truncate:
    """Set the file size."""

    cmd: ClassVar[Cmd] = Cmd.TRUNCATE
    path: bytes
    size: int


@value_class
class Chmod:
    """Set permission bits (``mode & 0o7777``)."""

    cmd: ClassVar[Cmd] = Cmd.CHMOD
    path: bytes
    mode: int


@value_class
class Chown:
    """Set numeric owner and group (without following symlinks)."""

    cmd: ClassVar[Cmd] = Cmd.CHOWN
    path: bytes
    uid: int
    gid: int


@value_class
class Utimes:
    """Set atime and mtime; ctime and otime (v2+) are carried but cannot be applied."""

    cmd: ClassVar[Cmd] = Cmd.UTIMES
    path: bytes
    atime: int
    mtime: int
    ctime: int
    otime: int | None = None


@value_class
class End:
    """End of one logical stream."""

    cmd: ClassVar[Cmd] = Cmd.END


@value_class
class UpdateExtent:
    """``--no-data`` marker: the byte range changed (receivers ignore it)."""

    cmd: ClassVar[Cmd] = Cmd.UPDATE_EXTENT
    path: bytes
    offset: int
    size: int


@value_class
class Fallocate:
    """``fallocate(2)`` with ``mode`` (FALLOC_FL_* bits) over ``offset``..``offset+size``."""

    cmd: ClassVar[Cmd] = Cmd.FALLOCATE
    path: bytes
    mode: int
    offset: int
    size: int


@value_class
class Fileattr:
    """btrfs inode flags (the inode item's ``flags``, not FS_IOC_SETFLAGS bits)."""

    cmd: ClassVar[Cmd] = Cmd.FILEATTR
    path: bytes
    fileattr: int


@value_class
class EncodedWrite:
    """Compressed extent data in btrfs's on-disk layout (see docs/formats/send-stream.md)."""

    cmd: ClassVar[Cmd] = Cmd.ENCODED_WRITE
    path: bytes
    offset: int
    unencoded_file_len: int
    unencoded_len: int
    unencoded_offset: int
    compression: int
    data: Data
    encryption: int | None = None


@value_class
class EnableVerity:
    """Enable fs-verity with these parameters."""

    cmd: ClassVar[Cmd] = Cmd.ENABLE_VERITY
    path: bytes
    algorithm: int
    block_size: int
    salt: bytes
    sig: bytes


Record = (
    Subvol
    | Snapshot
    | Mkfile
    | Mkdir
    | Mknod
    | Mkfifo
    | Mksock
    | Symlink
    | Rename
    | Link
    | Unlink
    | Rmdir
    | SetXattr
    | RemoveXattr
    | Write
    | Clone
    | Truncate
    | Chmod
    | Chown
    | Utimes
    | End
    | UpdateExtent
    | Fallocate
    | Fileattr
    | EncodedWrite
    | EnableVerity
)


@value_class
class StreamHeader:
    """Start of one (possibly concatenated) stream: its protocol version and byte offset
    (what a reader yields before the stream's records, and a writer writes)."""

    version: int
    offset: int = 0


#: what a stream reader yields
Event = StreamHeader | Record

#: Command number -> record class.
RECORD_TYPES: dict[Cmd, type[Record]] = {
    cls.cmd: cls
    for cls in (
        Subvol,
        Snapshot,
        Mkfile,
        Mkdir,
        Mknod,
        Mkfifo,
        Mksock,
        Symlink,
        Rename,
        Link,
        Unlink,
        Rmdir,
        SetXattr,
        RemoveXattr,
        Write,
        Clone,
        Truncate,
        Chmod,
        Chown,
        Utimes,
        End,
        UpdateExtent,
        Fallocate,
        Fileattr,
        EncodedWrite,
        EnableVerity,
    )
}
