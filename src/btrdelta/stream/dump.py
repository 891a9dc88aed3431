"""Text and JSON renderings of records.

:class:`TextDumper` reproduces ``btrfs receive --dump`` of btrfs-progs 6.2 byte for byte
(the version Debian bookworm ships): ``%-16s`` title, the escaped full path, padding to
column 32 (at least one space), then the command's arguments; see
``docs/formats/send-stream.md`` for the quirks kept on purpose (raw xattr names and values,
unescaped clone sources, ``fileattr=0x<decimal>``, commas in ``encoded_write``, local-time
timestamps). Lines are ``bytes``; non-UTF-8 names pass through unchanged.

:func:`record_to_json` gives one JSON-serialisable dict per record for ``--json``: paths as
``path`` when they are UTF-8, else ``path_b64``.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

from ..errors import StreamFormatError
from .records import (
    RECORD_TYPES,
    Chmod,
    Chown,
    Clone,
    EnableVerity,
    EncodedWrite,
    End,
    Fallocate,
    Fileattr,
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
    SetXattr,
    Snapshot,
    Subvol,
    Symlink,
    Truncate,
    Unlink,
    UpdateExtent,
    Utimes,
    Write,
)

__all__ = ["TextDumper", "escape_path", "record_to_json"]

PATH_MAX = 4096
_NS = 1_000_000_000

# Bytes printed as they are: printable ASCII except space and backslash.
_PLAIN = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_ESCAPES = {7: "\\a", 8: "\\b", 27: "\\e", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t",
            11: "\\v", 32: "\\ ", 92: "\\\\"}
_TABLE = {
    b: _ESCAPES.get(b, chr(b) if 0x20 <= b <= 0x7E else f"\\{b:03o}") for b in range(256)
}


def escape_path(path: bytes) -> str:
    """Escape like progs' ``print_path_escaped``; returns a latin-1 ``str`` (bytes 1:1)."""
    if _PLAIN.search(path) is None:
        return path.decode("latin-1")
    nul = path.find(b"\0")  # C strings end at NUL
    if nul >= 0:
        path = path[:nul]
    return path.decode("latin-1").translate(_TABLE)


def _cstr(value: bytes) -> str:
    """A raw C string as printf ``%s`` prints it: up to the first NUL, bytes unchanged."""
    nul = value.find(b"\0")
    return (value if nul < 0 else value[:nul]).decode("latin-1")


def _join(a: str, b: str) -> str:
    """progs ``path_cat_out``: drop one trailing '/' of each part, join with '/'."""
    if len(a) + len(b) + 2 >= PATH_MAX:
        raise StreamFormatError(f"path invalid: {b!r} is too long")
    if a.endswith("/"):
        a = a[:-1]
    if b.endswith("/"):
        b = b[:-1]
    return f"{a}/{b}"


class TextDumper:
    """Renders records as ``btrfs receive --dump`` lines (latin-1 ``str``, encode to bytes).

    Args:
        tz_cache: reuse formatted timestamps (they depend on ``TZ`` like progs' output).
    """

    def __init__(self) -> None:
        self.prefix = "."  # progs: full_subvol_path starts as "."
        self._times: dict[int, str] = {}
        self._fmt: dict[type[Any], Callable[[Any], str | None]] = {
            Subvol: self._subvol,
            Snapshot: self._snapshot,
            Mkfile: _none,
            Mkdir: _none,
            Mknod: _mknod,
            Mkfifo: _none,
            Mksock: _none,
            Symlink: _symlink,
            Rename: self._rename,
            Link: _link,
            Unlink: _none,
            Rmdir: _none,
            SetXattr: _set_xattr,
            RemoveXattr: _remove_xattr,
            Write: _write,
            Clone: self._clone,
            Truncate: _truncate,
            Chmod: _chmod,
            Chown: _chown,
            Utimes: self._utimes,
            UpdateExtent: _update_extent,
            Fallocate: _fallocate,
            Fileattr: _fileattr,
            EncodedWrite: _encoded_write,
            EnableVerity: _enable_verity,
        }

    _TITLES: dict[type[Any], str] = {  # noqa: RUF012
        Subvol: "subvol", Snapshot: "snapshot", Mkfile: "mkfile", Mkdir: "mkdir",
        Mknod: "mknod", Mkfifo: "mkfifo", Mksock: "mksock", Symlink: "symlink",
        Rename: "rename", Link: "link", Unlink: "unlink", Rmdir: "rmdir",
        SetXattr: "set_xattr", RemoveXattr: "remove_xattr", Write: "write", Clone: "clone",
        Truncate: "truncate", Chmod: "chmod", Chown: "chown", Utimes: "utimes",
        UpdateExtent: "update_extent", Fallocate: "fallocate", Fileattr: "fileattr",
        EncodedWrite: "encoded_write", EnableVerity: "enable_verity",
    }

    def line(self, rec: Record) -> str | None:
        """The dump line for ``rec`` (with trailing newline), or ``None`` for END."""
        cls = type(rec)
        if cls is End:
            return None
        args = self._fmt[cls](rec)
        if cls is Subvol or cls is Snapshot:
            full = self.prefix
        else:
            full = _join(self.prefix, rec.path.decode("latin-1"))  # type: ignore[union-attr]
        shown = escape_path(full.encode("latin-1"))
        title = self._TITLES[cls]
        if args is None:
            return f"{title:<16}{shown}\n"
        pad = 32 - len(shown)
        return f"{title:<16}{shown}{' ' * (pad if pad > 1 else 1)}{args}\n"

    # commands that use the dumper's state

    def _subvol(self, r: Subvol) -> str:
        self.prefix = _join(".", r.path.decode("latin-1"))
        return f"uuid={r.uuid} transid={r.ctransid}"

    def _snapshot(self, r: Snapshot) -> str:
        self.prefix = _join(".", r.path.decode("latin-1"))
        return (
            f"uuid={r.uuid} transid={r.ctransid} parent_uuid={r.clone_uuid}"
            f" parent_transid={r.clone_ctransid}"
        )

    def _rename(self, r: Rename) -> str:
        to = _join(self.prefix, r.path_to.decode("latin-1"))
        return f"dest={escape_path(to.encode('latin-1'))}"

    def _clone(self, r: Clone) -> str:
        src = _join(self.prefix, _cstr(r.clone_path))
        return f"offset={r.offset} len={r.length} from={src} clone_offset={r.clone_offset}"

    def _time(self, ns: int) -> str:
        sec = ns // _NS
        text = self._times.get(sec)
        if text is None:
            text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(sec))
            self._times[sec] = text
        return text

    def _utimes(self, r: Utimes) -> str:
        t = self._time
        return f"atime={t(r.atime)} mtime={t(r.mtime)} ctime={t(r.ctime)}"


def _none(r: Any) -> None:
    return None


def _mknod(r: Mknod) -> str:
    return f"mode={r.mode:o} dev=0x{r.rdev:x}"


def _symlink(r: Symlink) -> str:
    return f"dest={escape_path(r.target)}"


def _link(r: Link) -> str:
    return f"dest={escape_path(r.path_link)}"


def _set_xattr(r: SetXattr) -> str:
    return f"name={_cstr(r.name)} data={_cstr(r.data)} len={len(r.data)}"


def _remove_xattr(r: RemoveXattr) -> str:
    return f"name={_cstr(r.name)}"


def _write(r: Write) -> str:
    return f"offset={r.offset} len={len(r.data)}"


def _truncate(r: Truncate) -> str:
    return f"size={r.size}"


def _chmod(r: Chmod) -> str:
    return f"mode={r.mode:o}"


def _chown(r: Chown) -> str:
    return f"gid={r.gid} uid={r.uid}"


def _update_extent(r: UpdateExtent) -> str:
    return f"offset={r.offset} len={r.size}"


def _fallocate(r: Fallocate) -> str:
    return f"mode={r.mode} offset={r.offset} len={r.size}"


def _fileattr(r: Fileattr) -> str:
    return f"fileattr=0x{r.fileattr}"  # progs prints the decimal value after "0x"


def _encoded_write(r: EncodedWrite) -> str:
    return (
        f"offset={r.offset} len={len(r.data)}, unencoded_file_len={r.unencoded_file_len},"
        f" unencoded_len={r.unencoded_len}, unencoded_offset={r.unencoded_offset},"
        f" compression={r.compression}, encryption={r.encryption or 0}"
    )


def _enable_verity(r: EnableVerity) -> str:
    return (
        f"algorithm={r.algorithm} block_size={r.block_size} salt_len={len(r.salt)}"
        f" sig_len={len(r.sig)}"
    )


# --- JSON ---------------------------------------------------------------------------------


def _json_bytes(key: str, value: bytes, out: dict[str, Any]) -> None:
    try:
        out[key] = value.decode("utf-8")
    except UnicodeDecodeError:
        out[key + "_b64"] = base64.b64encode(value).decode("ascii")


_DATA_FIELDS = {"data"}


def record_to_json(rec: Record, index: int | None = None) -> dict[str, Any]:
    """A JSON-ready dict for ``rec``: ``{"cmd": "write", "path": ..., "offset": ..., ...}``.

    Byte strings become UTF-8 text (``name``) or base64 (``name_b64``); file data is given
    by its length only (``data_len``); UUIDs as strings; times as integer nanoseconds.
    """
    out: dict[str, Any] = {"cmd": rec.cmd.name.lower()}
    if index is not None:
        out["index"] = index
    for name in _FIELDS[type(rec)]:
        value = getattr(rec, name)
        if value is None:
            continue
        if name in _DATA_FIELDS and isinstance(rec, Write | EncodedWrite):
            out["data_len"] = len(value)
        elif isinstance(value, bytes):
            _json_bytes(name, value, out)
        elif isinstance(value, int):
            out[name] = value
        else:
            out[name] = str(value)
    return out


_FIELDS: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in RECORD_TYPES.values()
}
