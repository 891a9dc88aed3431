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

from uuid import UUID

from .. import TYPE_CHECKING
from .._value import Value, value_class
from .constants import Cmd

if TYPE_CHECKING:
    from typing import ClassVar

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


class Subvol(Value):
    """Start of a full stream: a new subvolume ``path`` (its own name only)."""

    cmd: ClassVar[Cmd] = Cmd.SUBVOL
    path: bytes
    uuid: UUID
    ctransid: int


class Snapshot(Value):
    """Start of an incremental stream: snapshot of the parent ``clone_uuid`` named ``path``."""

    cmd: ClassVar[Cmd] = Cmd.SNAPSHOT
    path: bytes
    uuid: UUID
    ctransid: int
    clone_uuid: UUID
    clone_ctransid: int


class Mkfile(Value):
    """Create an empty regular file."""

    cmd: ClassVar[Cmd] = Cmd.MKFILE
    path: bytes
    ino: int


class Mkdir(Value):
    """Create a directory."""

    cmd: ClassVar[Cmd] = Cmd.MKDIR
    path: bytes
    ino: int


class Mknod(Value):
    """Create a device node; ``mode`` is the full ``st_mode``, ``rdev`` the Linux encoding."""

    cmd: ClassVar[Cmd] = Cmd.MKNOD
    path: bytes
    ino: int
    rdev: int
    mode: int


class Mkfifo(Value):
    """Create a FIFO."""

    cmd: ClassVar[Cmd] = Cmd.MKFIFO
    path: bytes
    ino: int
    rdev: int
    mode: int


class Mksock(Value):
    """Create a UNIX socket node."""

    cmd: ClassVar[Cmd] = Cmd.MKSOCK
    path: bytes
    ino: int
    rdev: int
    mode: int


class Symlink(Value):
    """Create symlink ``path`` pointing to ``target``."""

    cmd: ClassVar[Cmd] = Cmd.SYMLINK
    path: bytes
    ino: int
    target: bytes


class Rename(Value):
    """Rename ``path`` to ``path_to`` (atomic replace)."""

    cmd: ClassVar[Cmd] = Cmd.RENAME
    path: bytes
    path_to: bytes


class Link(Value):
    """Create hard link ``path`` (the new name) to the existing ``path_link``."""

    cmd: ClassVar[Cmd] = Cmd.LINK
    path: bytes
    path_link: bytes


class Unlink(Value):
    """Remove a non-directory name."""

    cmd: ClassVar[Cmd] = Cmd.UNLINK
    path: bytes


class Rmdir(Value):
    """Remove an empty directory."""

    cmd: ClassVar[Cmd] = Cmd.RMDIR
    path: bytes


class SetXattr(Value):
    """Set extended attribute ``name`` to ``data`` (without following symlinks)."""

    cmd: ClassVar[Cmd] = Cmd.SET_XATTR
    path: bytes
    name: bytes
    data: bytes


class RemoveXattr(Value):
    """Remove extended attribute ``name``."""

    cmd: ClassVar[Cmd] = Cmd.REMOVE_XATTR
    path: bytes
    name: bytes


# (made by the decorator, not as a Value: delta.patching subclasses it with one more slot,
# which a type checker would take for a field of a Value's subclass)
@value_class
class Write:
    """Write ``data`` at ``offset``."""

    cmd: ClassVar[Cmd] = Cmd.WRITE
    path: bytes
    offset: int
    data: Data


class Clone(Value):
    """Copy ``length`` bytes from ``clone_path``@``clone_offset`` of subvolume ``clone_uuid``."""

    cmd: ClassVar[Cmd] = Cmd.CLONE
    offset: int
    length: int
    path: bytes
    clone_uuid: UUID
    clone_ctransid: int
    clone_path: bytes
    clone_offset: int


class Truncate(Value):
    """Set the file size."""

    cmd: ClassVar[Cmd] = Cmd.TRUNCATE
    path: bytes
    size: int


class Chmod(Value):
    """Set permission bits (``mode & 0o7777``)."""

    cmd: ClassVar[Cmd] = Cmd.CHMOD
    path: bytes
    mode: int


class Chown(Value):
    """Set numeric owner and group (without following symlinks)."""

    cmd: ClassVar[Cmd] = Cmd.CHOWN
    path: bytes
    uid: int
    gid: int


class Utimes(Value):
    """Set atime and mtime; ctime and otime (v2+) are carried but cannot be applied."""

    cmd: ClassVar[Cmd] = Cmd.UTIMES
    path: bytes
    atime: int
    mtime: int
    ctime: int
    otime: int | None = None


class End(Value):
    """End of one logical stream."""

    cmd: ClassVar[Cmd] = Cmd.END


class UpdateExtent(Value):
    """``--no-data`` marker: the byte range changed (receivers ignore it)."""

    cmd: ClassVar[Cmd] = Cmd.UPDATE_EXTENT
    path: bytes
    offset: int
    size: int


class Fallocate(Value):
    """``fallocate(2)`` with ``mode`` (FALLOC_FL_* bits) over ``offset``..``offset+size``."""

    cmd: ClassVar[Cmd] = Cmd.FALLOCATE
    path: bytes
    mode: int
    offset: int
    size: int


class Fileattr(Value):
    """btrfs inode flags (the inode item's ``flags``, not FS_IOC_SETFLAGS bits)."""

    cmd: ClassVar[Cmd] = Cmd.FILEATTR
    path: bytes
    fileattr: int


# (made by the decorator, not as a Value: delta.patching subclasses it with one more slot,
# which a type checker would take for a field of a Value's subclass)
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


class EnableVerity(Value):
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


class StreamHeader(Value):
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
