/*
 * Numbers the C accelerators share with the Python code, generated from the Python
 * tables by scripts/gen_constants.py: do not edit (tests/test_constants_header.py
 * checks that this file is current).
 */
#ifndef BTRDELTA_CONSTANTS_H
#define BTRDELTA_CONSTANTS_H

/* send-stream commands (btrdelta.stream.constants.Cmd) */
enum {
    C_UNSPEC = 0,
    C_SUBVOL = 1,
    C_SNAPSHOT = 2,
    C_MKFILE = 3,
    C_MKDIR = 4,
    C_MKNOD = 5,
    C_MKFIFO = 6,
    C_MKSOCK = 7,
    C_SYMLINK = 8,
    C_RENAME = 9,
    C_LINK = 10,
    C_UNLINK = 11,
    C_RMDIR = 12,
    C_SET_XATTR = 13,
    C_REMOVE_XATTR = 14,
    C_WRITE = 15,
    C_CLONE = 16,
    C_TRUNCATE = 17,
    C_CHMOD = 18,
    C_CHOWN = 19,
    C_UTIMES = 20,
    C_END = 21,
    C_UPDATE_EXTENT = 22,
    C_FALLOCATE = 23,
    C_FILEATTR = 24,
    C_ENCODED_WRITE = 25,
    C_ENABLE_VERITY = 26,
    C_LAST = 27, /* one past the highest */
};

/* send-stream attributes (btrdelta.stream.constants.Attr) */
enum {
    A_UNSPEC = 0,
    A_UUID = 1,
    A_CTRANSID = 2,
    A_INO = 3,
    A_SIZE = 4,
    A_MODE = 5,
    A_UID = 6,
    A_GID = 7,
    A_RDEV = 8,
    A_CTIME = 9,
    A_MTIME = 10,
    A_ATIME = 11,
    A_OTIME = 12,
    A_XATTR_NAME = 13,
    A_XATTR_DATA = 14,
    A_PATH = 15,
    A_PATH_TO = 16,
    A_PATH_LINK = 17,
    A_FILE_OFFSET = 18,
    A_DATA = 19,
    A_CLONE_UUID = 20,
    A_CLONE_CTRANSID = 21,
    A_CLONE_PATH = 22,
    A_CLONE_OFFSET = 23,
    A_CLONE_LEN = 24,
    A_FALLOCATE_MODE = 25,
    A_FILEATTR = 26,
    A_UNENCODED_FILE_LEN = 27,
    A_UNENCODED_LEN = 28,
    A_UNENCODED_OFFSET = 29,
    A_COMPRESSION = 30,
    A_ENCRYPTION = 31,
    A_VERITY_ALGORITHM = 32,
    A_VERITY_BLOCK_SIZE = 33,
    A_VERITY_SALT_DATA = 34,
    A_VERITY_SIG_DATA = 35,
    A_LAST = 36, /* one past the highest */
};

/* framing and versions (btrdelta.stream.constants) */
#define CMD_HEADER_SIZE 10 /* u32 length, u16 command, u32 crc */
#define NVERSIONS 4 /* tables indexed by stream version */
#define COMPRESSION_MAX 7 /* highest ENCODED_WRITE compression */

/* largest decompressed ENCODED_WRITE extent (btrdelta.receive.encoded) */
#define MAX_UNENCODED 8388608u

/* ioctl request numbers (btrdelta.fs.btrfs.IOCTLS) */
#define IOC_SUBVOL_CREATE 0x5000940Eu
#define IOC_SNAP_CREATE_V2 0x50009417u
#define IOC_SNAP_DESTROY 0x5000940Fu
#define IOC_DEFAULT_SUBVOL 0x40089413u
#define IOC_SET_RECEIVED_SUBVOL 0xC0C89425u
#define IOC_SUBVOL_GETFLAGS 0x80089419u
#define IOC_SUBVOL_SETFLAGS 0x4008941Au
#define IOC_TREE_SEARCH 0xD0009411u
#define IOC_INO_LOOKUP 0xD0009412u
#define IOC_ENCODED_WRITE 0x40809440u
#define IOC_GET_SUBVOL_INFO 0x81F8943Cu
#define IOC_FICLONERANGE 0x4020940Du
#define IOC_FS_ENABLE_VERITY 0x40806685u
#define IOC_FS_GETFLAGS 0x80086601u
#define IOC_FS_SETFLAGS 0x40086602u
#define IOC_SYNC 0x00009408u
#define IOC_FS_INFO 0x8400941Fu

/* the safe path walk (btrdelta.fs.sandbox); the flags need <fcntl.h> */
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define PATH_FLAGS (O_PATH | O_NOFOLLOW | O_CLOEXEC)
#define DIRS_TRIM 256 /* cached directories before starting over */

/* TLV markers of carried commands in delta streams (btrdelta.delta.carrier) */
enum { SAME_PATH = 0xFFFF, ORPHAN = 0xFFFE, TIMES = 0xFFFD };

#endif
