"""Numbers of the btrfs send-stream format: commands, attributes, versions, limits.

The values are those of the kernel's ``fs/btrfs/send.h`` (and btrfs-progs
``common/send-stream.h``). The per-command attribute table (which attributes, in which order
the kernel emits them, of which type) lives in :data:`COMMAND_SPECS`; records, codec and the
docs are all driven by it. This module owns no behaviour.

:class:`Field` and :class:`CommandSpec` are named tuples made by ``_value.named_tuple``
(type checkers see them as ``typing.NamedTuple`` classes): a small ``send`` imports no
``typing``, which is ~12 M instructions, ~3 % of it (a ``typing.NamedTuple`` class would also
compile each of its string annotations at import).
"""

from __future__ import annotations

import enum
import struct

from .. import TYPE_CHECKING
from .._value import named_tuple

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final, NamedTuple, TypeVar

    _C = TypeVar("_C")
    #: the base type checkers see (at run time the class is made by simple_enum)
    _IntEnum = enum.IntEnum
    _Enum = enum.Enum
else:
    _IntEnum = _Enum = object


def simple_enum(etype: type[enum.Enum]) -> Callable[[_C], _C]:
    """Make the decorated plain class an enum of ``etype``, as its ``class X(etype)``
    statement would, without ``EnumType``'s per-member work: the standard library's own
    ``enum._simple_enum`` (``http.HTTPStatus``, ``re.RegexFlag`` are made so; the stream
    package's 78 members took 6.7 M instructions, 3.2 M so). Members, values, names,
    ``repr``, hashing, pickling and iteration are the same (a test checks with
    ``enum._test_simple_enum``). Where ``enum`` has no ``_simple_enum``, the functional
    API makes the same enum.
    """
    make = getattr(enum, "_simple_enum", None)
    if make is not None:
        return make(etype)  # type: ignore[no-any-return]

    def functional(cls: Any) -> Any:
        members = [(k, v) for k, v in vars(cls).items() if not k.startswith("_")]
        maker: Any = etype
        out = maker(cls.__name__, members, module=cls.__module__, qualname=cls.__qualname__)
        out.__doc__ = cls.__doc__
        return out

    return functional


MAGIC: Final = b"btrfs-stream\x00"
STREAM_HEADER: Final = struct.Struct("<13sI")  # magic, version
CMD_HEADER: Final = struct.Struct("<IHI")  # payload len, cmd, crc
TLV_HEADER: Final = struct.Struct("<HH")  # attr type, value len
STREAM_HEADER_SIZE: Final = STREAM_HEADER.size  # 17
CMD_HEADER_SIZE: Final = CMD_HEADER.size  # 10

SUPPORTED_VERSIONS: Final = (1, 2, 3)

#: Largest payload each version can carry. v1: the kernel's 64 KiB command buffer (header
#: included). v2/v3: the kernel's buffer is ALIGN(16 KiB + 128 KiB, PAGE_SIZE), i.e. up to
#: 192 KiB with 64 KiB pages; we allow 256 KiB so that any kernel's stream fits and any length
#: field beyond it is rejected before a single byte is allocated.
MAX_PAYLOAD: Final = {1: 65536 - CMD_HEADER_SIZE, 2: 262144, 3: 262144}

#: Size of the plain WRITE chunks the kernel emits (send buffer minus 16 KiB of headroom).
KERNEL_WRITE_SIZE: Final = {1: 49152, 2: 131072, 3: 131072}


@simple_enum(enum.IntEnum)
class Cmd(_IntEnum):
    """Send-stream command numbers (``BTRFS_SEND_C_*``)."""

    UNSPEC = 0
    SUBVOL = 1
    SNAPSHOT = 2
    MKFILE = 3
    MKDIR = 4
    MKNOD = 5
    MKFIFO = 6
    MKSOCK = 7
    SYMLINK = 8
    RENAME = 9
    LINK = 10
    UNLINK = 11
    RMDIR = 12
    SET_XATTR = 13
    REMOVE_XATTR = 14
    WRITE = 15
    CLONE = 16
    TRUNCATE = 17
    CHMOD = 18
    CHOWN = 19
    UTIMES = 20
    END = 21
    UPDATE_EXTENT = 22
    # version 2
    FALLOCATE = 23
    FILEATTR = 24
    ENCODED_WRITE = 25
    # version 3
    ENABLE_VERITY = 26


@simple_enum(enum.IntEnum)
class Attr(_IntEnum):
    """Send-stream attribute (TLV type) numbers (``BTRFS_SEND_A_*``)."""

    UNSPEC = 0
    UUID = 1
    CTRANSID = 2
    INO = 3
    SIZE = 4
    MODE = 5
    UID = 6
    GID = 7
    RDEV = 8
    CTIME = 9
    MTIME = 10
    ATIME = 11
    OTIME = 12
    XATTR_NAME = 13
    XATTR_DATA = 14
    PATH = 15
    PATH_TO = 16
    PATH_LINK = 17
    FILE_OFFSET = 18
    DATA = 19
    CLONE_UUID = 20
    CLONE_CTRANSID = 21
    CLONE_PATH = 22
    CLONE_OFFSET = 23
    CLONE_LEN = 24
    # version 2
    FALLOCATE_MODE = 25
    FILEATTR = 26
    UNENCODED_FILE_LEN = 27
    UNENCODED_LEN = 28
    UNENCODED_OFFSET = 29
    COMPRESSION = 30
    ENCRYPTION = 31
    # version 3
    VERITY_ALGORITHM = 32
    VERITY_BLOCK_SIZE = 33
    VERITY_SALT_DATA = 34
    VERITY_SIG_DATA = 35


@simple_enum(enum.IntEnum)
class Compression(_IntEnum):
    """``BTRFS_ENCODED_IO_COMPRESSION_*``: how ENCODED_WRITE data is compressed."""

    NONE = 0
    ZLIB = 1
    ZSTD = 2
    LZO_4K = 3
    LZO_8K = 4
    LZO_16K = 5
    LZO_32K = 6
    LZO_64K = 7


#: Highest attribute number each version defines (which command is legal in which
#: version: the ``version`` of COMMAND_SPECS, in ``framing.RECORDS``).
MAX_ATTR: Final = {1: Attr.CLONE_LEN, 2: Attr.ENCRYPTION, 3: Attr.VERITY_SIG_DATA}


@simple_enum(enum.Enum)
class Kind(_Enum):
    """How an attribute value is encoded."""

    U8 = "u8"
    U32 = "u32"
    U64 = "u64"
    UUID = "uuid"
    TIMESPEC = "timespec"
    BYTES = "bytes"  # path, name, small blob: decoded to ``bytes``
    DATA = "data"  # file data: decoded to a ``memoryview`` (no copy)


ATTR_KIND: Final[dict[Attr, Kind]] = {
    Attr.UUID: Kind.UUID,
    Attr.CTRANSID: Kind.U64,
    Attr.INO: Kind.U64,
    Attr.SIZE: Kind.U64,
    Attr.MODE: Kind.U64,
    Attr.UID: Kind.U64,
    Attr.GID: Kind.U64,
    Attr.RDEV: Kind.U64,
    Attr.CTIME: Kind.TIMESPEC,
    Attr.MTIME: Kind.TIMESPEC,
    Attr.ATIME: Kind.TIMESPEC,
    Attr.OTIME: Kind.TIMESPEC,
    Attr.XATTR_NAME: Kind.BYTES,
    Attr.XATTR_DATA: Kind.BYTES,
    Attr.PATH: Kind.BYTES,
    Attr.PATH_TO: Kind.BYTES,
    Attr.PATH_LINK: Kind.BYTES,
    Attr.FILE_OFFSET: Kind.U64,
    Attr.DATA: Kind.DATA,
    Attr.CLONE_UUID: Kind.UUID,
    Attr.CLONE_CTRANSID: Kind.U64,
    Attr.CLONE_PATH: Kind.BYTES,
    Attr.CLONE_OFFSET: Kind.U64,
    Attr.CLONE_LEN: Kind.U64,
    Attr.FALLOCATE_MODE: Kind.U32,
    Attr.FILEATTR: Kind.U64,
    Attr.UNENCODED_FILE_LEN: Kind.U64,
    Attr.UNENCODED_LEN: Kind.U64,
    Attr.UNENCODED_OFFSET: Kind.U64,
    Attr.COMPRESSION: Kind.U32,
    Attr.ENCRYPTION: Kind.U32,
    Attr.VERITY_ALGORITHM: Kind.U8,
    Attr.VERITY_BLOCK_SIZE: Kind.U32,
    Attr.VERITY_SALT_DATA: Kind.BYTES,
    Attr.VERITY_SIG_DATA: Kind.BYTES,
}

ATTR_VERSION: Final[dict[Attr, int]] = {
    a: (1 if a <= Attr.CLONE_LEN else 2 if a <= Attr.ENCRYPTION else 3) for a in ATTR_KIND
}


if TYPE_CHECKING:
    class Field(NamedTuple):
        """One attribute of a command: its record field name, and whether it may be absent.

        ``min_version`` > 1 marks attributes the kernel only sends from that version on
        (UTIMES OTIME); they are optional in the record and only written when present.
        """

        attr: Attr
        name: str
        optional: bool = False

    class CommandSpec(NamedTuple):
        """A command's attributes in the order the kernel emits them."""

        cmd: Cmd
        fields: tuple[Field, ...]
        version: int
else:
    def _field(_cls, attr, name, optional=False):
        return tuple.__new__(_cls, (attr, name, optional))

    def _command_spec(_cls, cmd, fields, version):
        return tuple.__new__(_cls, (cmd, fields, version))

    Field = named_tuple("Field", _field, __name__)
    Field.__doc__ = "One attribute of a command: its record field name, and whether it may " \
        "be absent."
    CommandSpec = named_tuple("CommandSpec", _command_spec, __name__)
    CommandSpec.__doc__ = "A command's attributes in the order the kernel emits them."


F = Field

#: The whole format in one table (kernel order of attributes).
COMMAND_SPECS: Final[dict[Cmd, CommandSpec]] = {
    spec.cmd: spec
    for spec in (
        CommandSpec(
            Cmd.SUBVOL,
            (F(Attr.PATH, "path"), F(Attr.UUID, "uuid"), F(Attr.CTRANSID, "ctransid")),
            1,
        ),
        CommandSpec(
            Cmd.SNAPSHOT,
            (
                F(Attr.PATH, "path"),
                F(Attr.UUID, "uuid"),
                F(Attr.CTRANSID, "ctransid"),
                F(Attr.CLONE_UUID, "clone_uuid"),
                F(Attr.CLONE_CTRANSID, "clone_ctransid"),
            ),
            1,
        ),
        CommandSpec(Cmd.MKFILE, (F(Attr.PATH, "path"), F(Attr.INO, "ino")), 1),
        CommandSpec(Cmd.MKDIR, (F(Attr.PATH, "path"), F(Attr.INO, "ino")), 1),
        *(
            CommandSpec(
                c,
                (
                    F(Attr.PATH, "path"),
                    F(Attr.INO, "ino"),
                    F(Attr.RDEV, "rdev"),
                    F(Attr.MODE, "mode"),
                ),
                1,
            )
            for c in (Cmd.MKNOD, Cmd.MKFIFO, Cmd.MKSOCK)
        ),
        CommandSpec(
            Cmd.SYMLINK,
            (F(Attr.PATH, "path"), F(Attr.INO, "ino"), F(Attr.PATH_LINK, "target")),
            1,
        ),
        CommandSpec(Cmd.RENAME, (F(Attr.PATH, "path"), F(Attr.PATH_TO, "path_to")), 1),
        CommandSpec(Cmd.LINK, (F(Attr.PATH, "path"), F(Attr.PATH_LINK, "path_link")), 1),
        CommandSpec(Cmd.UNLINK, (F(Attr.PATH, "path"),), 1),
        CommandSpec(Cmd.RMDIR, (F(Attr.PATH, "path"),), 1),
        CommandSpec(
            Cmd.SET_XATTR,
            (F(Attr.PATH, "path"), F(Attr.XATTR_NAME, "name"), F(Attr.XATTR_DATA, "data")),
            1,
        ),
        CommandSpec(
            Cmd.REMOVE_XATTR, (F(Attr.PATH, "path"), F(Attr.XATTR_NAME, "name")), 1
        ),
        CommandSpec(
            Cmd.WRITE,
            (F(Attr.PATH, "path"), F(Attr.FILE_OFFSET, "offset"), F(Attr.DATA, "data")),
            1,
        ),
        CommandSpec(
            Cmd.CLONE,
            (
                F(Attr.FILE_OFFSET, "offset"),
                F(Attr.CLONE_LEN, "length"),
                F(Attr.PATH, "path"),
                F(Attr.CLONE_UUID, "clone_uuid"),
                F(Attr.CLONE_CTRANSID, "clone_ctransid"),
                F(Attr.CLONE_PATH, "clone_path"),
                F(Attr.CLONE_OFFSET, "clone_offset"),
            ),
            1,
        ),
        CommandSpec(Cmd.TRUNCATE, (F(Attr.PATH, "path"), F(Attr.SIZE, "size")), 1),
        CommandSpec(Cmd.CHMOD, (F(Attr.PATH, "path"), F(Attr.MODE, "mode")), 1),
        CommandSpec(
            Cmd.CHOWN, (F(Attr.PATH, "path"), F(Attr.UID, "uid"), F(Attr.GID, "gid")), 1
        ),
        CommandSpec(
            Cmd.UTIMES,
            (
                F(Attr.PATH, "path"),
                F(Attr.ATIME, "atime"),
                F(Attr.MTIME, "mtime"),
                F(Attr.CTIME, "ctime"),
                F(Attr.OTIME, "otime", optional=True),
            ),
            1,
        ),
        CommandSpec(Cmd.END, (), 1),
        CommandSpec(
            Cmd.UPDATE_EXTENT,
            (F(Attr.PATH, "path"), F(Attr.FILE_OFFSET, "offset"), F(Attr.SIZE, "size")),
            1,
        ),
        CommandSpec(
            Cmd.FALLOCATE,
            (
                F(Attr.PATH, "path"),
                F(Attr.FALLOCATE_MODE, "mode"),
                F(Attr.FILE_OFFSET, "offset"),
                F(Attr.SIZE, "size"),
            ),
            2,
        ),
        CommandSpec(Cmd.FILEATTR, (F(Attr.PATH, "path"), F(Attr.FILEATTR, "fileattr")), 2),
        CommandSpec(
            Cmd.ENCODED_WRITE,
            (
                F(Attr.PATH, "path"),
                F(Attr.FILE_OFFSET, "offset"),
                F(Attr.UNENCODED_FILE_LEN, "unencoded_file_len"),
                F(Attr.UNENCODED_LEN, "unencoded_len"),
                F(Attr.UNENCODED_OFFSET, "unencoded_offset"),
                F(Attr.COMPRESSION, "compression"),
                F(Attr.ENCRYPTION, "encryption", optional=True),
                F(Attr.DATA, "data"),
            ),
            2,
        ),
        CommandSpec(
            Cmd.ENABLE_VERITY,
            (
                F(Attr.PATH, "path"),
                F(Attr.VERITY_ALGORITHM, "algorithm"),
                F(Attr.VERITY_BLOCK_SIZE, "block_size"),
                F(Attr.VERITY_SALT_DATA, "salt"),
                F(Attr.VERITY_SIG_DATA, "sig"),
            ),
            3,
        ),
    )
}
del F
