"""Text and JSON renderings of records.

:class:`TextDumper` reproduces ``btrfs receive --dump`` byte for byte: ``%-16s`` title, the
escaped full path, padding to column 32 (at least one space), then the command's arguments,
as the btrfs-progs version asked for prints them (the CLI asks the installed one's). Two
formats:
btrfs-progs up to 6.9 (Debian 12 ships 6.2) prints xattr names and values raw (``data=``,
up to a NUL), clone sources unescaped and commas in ``encoded_write``; from 6.9.1 (June
2024; Debian 13 ships 6.14) it escapes them as paths, drops ``data=`` and the commas. See
``docs/formats/send-stream.md`` for the quirks kept on purpose (``fileattr=0x<decimal>``,
local-time timestamps). Lines are ``bytes``; non-UTF-8 names pass through unchanged.

:func:`record_to_json` gives one JSON-serialisable dict per record for ``--json``: paths as
``path`` when they are UTF-8, else ``path_b64``.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import _native
from .._value import field_names
from ..errors import StreamFormatError
from .reader import StreamHeader
from .records import (
    RECORD_TYPES,
    Chmod,
    Chown,
    Clone,
    EnableVerity,
    EncodedWrite,
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

__all__ = ["ESCAPING", "JsonDumpSink", "TextDumpSink", "TextDumper", "escape_path",
           "parse_progs_version", "record_to_json"]

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


def _escaped(value: bytes) -> str:
    """Every byte escaped as progs' ``string_print_escape_special_len`` (NULs too)."""
    return value.decode("latin-1").translate(_TABLE)


#: the first btrfs-progs whose dump escapes xattr names and values and clone sources and
#: prints encoded writes without commas (its commits 31286d3b and d88acfba)
ESCAPING = (6, 9, 1)


def parse_progs_version(text: str) -> tuple[int, ...]:
    """``6.2``, ``v6.9.1`` or ``btrfs-progs v6.14`` as a tuple of integers.

    Raises:
        ValueError: no version in ``text``.
    """
    m = re.search(r"(?:^|[\sv])(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        raise ValueError(f"not a btrfs-progs version: {text!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


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
    """Renders records as ``btrfs receive --dump`` lines (latin-1 ``str``: bytes 1:1).

    State carried between records: the current subvolume prefix (``./<subvol>``), exactly
    as progs keeps ``full_subvol_path``. ``progs``: the btrfs-progs version whose format to
    print (default: the newest; the CLI passes the installed one's).
    """

    def __init__(self, progs: tuple[int, ...] | None = None) -> None:
        self._set_prefix(b".")  # progs: full_subvol_path starts as "."
        if progs is None:
            progs = ESCAPING
        #: btrfs-progs >= 6.9.1's format (the C renderer leaves those commands to Python)
        self._escaping = progs >= ESCAPING
        # the C renderer (``_speedups.render_dump``) when it is live (btrdelta._native)
        self._c = _native.live("speedups")
        if self._c is not None and self._escaping and not getattr(self._c, "DUMP_ESCAPING", 0):
            self._c = None  # (an accelerator built before it knew the format)
        self._times: dict[int, str] = {}
        steps: dict[type[Any], tuple[str, Callable[[Any], str | None] | None]] = {
            Subvol: ("subvol", self._subvol),
            Snapshot: ("snapshot", self._snapshot),
            Mkfile: ("mkfile", None),
            Mkdir: ("mkdir", None),
            Mknod: ("mknod", _mknod),
            Mkfifo: ("mkfifo", None),
            Mksock: ("mksock", None),
            Symlink: ("symlink", _symlink),
            Rename: ("rename", self._rename),
            Link: ("link", _link),
            Unlink: ("unlink", None),
            Rmdir: ("rmdir", None),
            SetXattr: ("set_xattr", _set_xattr),
            RemoveXattr: ("remove_xattr", _remove_xattr),
            Write: ("write", _write),
            Clone: ("clone", self._clone),
            Truncate: ("truncate", _truncate),
            Chmod: ("chmod", _chmod),
            Chown: ("chown", _chown),
            Utimes: ("utimes", self._utimes),
            UpdateExtent: ("update_extent", _update_extent),
            Fallocate: ("fallocate", _fallocate),
            Fileattr: ("fileattr", _fileattr),
            EncodedWrite: ("encoded_write", _encoded_write),
            EnableVerity: ("enable_verity", _enable_verity),
        }
        if self._escaping:
            steps.update({SetXattr: ("set_xattr", _set_xattr_escaped),
                          RemoveXattr: ("remove_xattr", _remove_xattr_escaped),
                          Clone: ("clone", self._clone_escaped),
                          EncodedWrite: ("encoded_write", _encoded_write_spaced)})
        self._plan = {cls: (f"{title:<16}", fn) for cls, (title, fn) in steps.items()}

    def _set_prefix(self, prefix: bytes) -> None:
        self.prefix = prefix
        self._pre = (prefix[:-1] if prefix.endswith(b"/") else prefix) + b"/"

    def _full(self, path: bytes) -> bytes:
        """progs ``path_cat_out(prefix, path)``."""
        nul = path.find(b"\0")
        if nul >= 0:
            path = path[:nul]
        if len(self.prefix) + len(path) + 2 >= PATH_MAX:
            raise StreamFormatError(f"path invalid: {path[:64]!r}... is too long")
        if path.endswith(b"/"):
            path = path[:-1]
        return self._pre + path

    def line(self, rec: Record) -> str | None:
        """The dump line for ``rec`` (with trailing newline), or ``None`` for END."""
        text = self.render((rec,))
        return text or None

    def render(self, recs: Iterable[Record]) -> str:
        """The dump lines of ``recs`` joined (END renders as nothing)."""
        if self._c is not None:
            return self._c.render_dump(recs, self)  # type: ignore[no-any-return]
        return self._render_py(recs)

    def _render_py(self, recs: Iterable[Record]) -> str:
        """:meth:`render` in Python: the reference (the C renderer hands it what it does not
        render itself, one record at a time)."""
        plan = self._plan
        out: list[str] = []
        append = out.append
        plain = _PLAIN.search
        for rec in recs:
            step = plan.get(rec.__class__)
            if step is None:
                continue  # END
            title, argf = step
            args = argf(rec) if argf is not None else None  # may change the prefix
            if rec.__class__ is Subvol or rec.__class__ is Snapshot:
                full = self.prefix
            else:
                path = rec.path  # type: ignore[union-attr]
                if path.endswith(b"/") or b"\0" in path or len(path) > 2000:
                    full = self._full(path)
                else:
                    full = self._pre + path
            shown = full.decode("latin-1") if plain(full) is None else escape_path(full)
            if args is None:
                append(f"{title}{shown}\n")
            else:
                pad = 32 - len(shown)
                append(f"{title}{shown}{_SPACES[pad] if pad > 1 else ' '}{args}\n")
        return "".join(out)

    # commands that use the dumper's state

    def _subvol(self, r: Subvol) -> str:
        self._set_prefix(_join(".", r.path.decode("latin-1")).encode("latin-1"))
        return f"uuid={r.uuid} transid={r.ctransid}"

    def _snapshot(self, r: Snapshot) -> str:
        self._set_prefix(_join(".", r.path.decode("latin-1")).encode("latin-1"))
        return (
            f"uuid={r.uuid} transid={r.ctransid} parent_uuid={r.clone_uuid}"
            f" parent_transid={r.clone_ctransid}"
        )

    def _rename(self, r: Rename) -> str:
        return f"dest={escape_path(self._full(r.path_to))}"

    def _clone(self, r: Clone) -> str:
        src = self._full(r.clone_path).decode("latin-1")
        return f"offset={r.offset} len={r.length} from={src} clone_offset={r.clone_offset}"

    def _clone_escaped(self, r: Clone) -> str:
        src = escape_path(self._full(r.clone_path))
        return f"offset={r.offset} len={r.length} from={src} clone_offset={r.clone_offset}"

    def _utimes(self, r: Utimes) -> str:
        times = self._times
        a = times.get(r.atime // _NS) or self._time(r.atime)
        m = times.get(r.mtime // _NS) or self._time(r.mtime)
        c = times.get(r.ctime // _NS) or self._time(r.ctime)
        return f"atime={a} mtime={m} ctime={c}"

    def _time(self, ns: int) -> str:
        sec = ns // _NS
        try:
            text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(sec))
        except (OverflowError, OSError, ValueError) as exc:
            # progs fails the same way: "failed to convert time ... to local time"
            raise StreamFormatError(f"failed to convert time {sec} to local time") from exc
        self._times[sec] = text
        return text


_SPACES = [" " * n for n in range(33)]


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


def _set_xattr_escaped(r: SetXattr) -> str:
    return f"name={escape_path(r.name)} {_escaped(r.data)} len={len(r.data)}"


def _remove_xattr_escaped(r: RemoveXattr) -> str:
    return f"name={escape_path(r.name)}"


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


def _encoded_write_spaced(r: EncodedWrite) -> str:
    return (
        f"offset={r.offset} len={len(r.data)} unencoded_file_len={r.unencoded_file_len}"
        f" unencoded_len={r.unencoded_len} unencoded_offset={r.unencoded_offset}"
        f" compression={r.compression} encryption={r.encryption or 0}"
    )


def _enable_verity(r: EnableVerity) -> str:
    return (
        f"algorithm={r.algorithm} block_size={r.block_size} salt_len={len(r.salt)}"
        f" sig_len={len(r.sig)}"
    )


class TextDumpSink:
    """A :class:`~btrdelta.stream.sink.RecordSink` writing ``btrfs receive --dump`` text to
    ``write`` (latin-1 bytes), rendering ``batch`` records at a time; :meth:`close` writes
    what is left (after an error too: progs prints what it read before it)."""

    def __init__(self, write: Callable[[bytes], object], batch: int = 4096,
                 progs: tuple[int, ...] | None = None) -> None:
        self._write = write
        self._dumper = TextDumper(progs)
        self._recs: list[Record] = []
        self._batch = batch
        #: the number of the first record held
        self._first = 0

    def start(self, header: StreamHeader) -> None:
        pass

    def apply(self, rec: Record, index: int) -> None:
        if not self._recs:
            self._first = index
        self._recs.append(rec)
        if len(self._recs) >= self._batch:
            self.flush()

    def apply_batch(self, recs: list[Record], index: int) -> None:
        """Records ``index``, ``index + 1``, ... at once (see :func:`.sink.feed`)."""
        if not self._recs:
            self._first = index
        self._recs += recs
        if len(self._recs) >= self._batch:
            self.flush()

    def flush(self) -> None:
        """Render and write the records held.

        Raises:
            StreamFormatError: a path progs cannot print (too long), after the lines of
                the records before it (as progs prints them), naming its record.
        """
        if not self._recs:
            return
        dumper, recs = self._dumper, self._recs
        prefix = dumper.prefix
        try:
            text = dumper.render(recs)
        except StreamFormatError:
            dumper._set_prefix(prefix)  # (again from the first: one record at a time)
            for i, rec in enumerate(recs):
                try:
                    text = dumper.render((rec,))
                except StreamFormatError as exc:
                    recs.clear()
                    raise exc.located(index=self._first + i,
                                      command=rec.cmd.name.lower()) from None
                self._write(text.encode("latin-1"))
            raise  # pragma: no cover - (a record refused once is refused again)
        self._write(text.encode("latin-1"))
        recs.clear()

    def close(self) -> None:
        self.flush()


class JsonDumpSink:
    """A :class:`~btrdelta.stream.sink.RecordSink` writing JSON lines to ``write``: one
    object per stream header (``{"stream": version, "offset": ...}``) and per record
    (:func:`record_to_json`)."""

    def __init__(self, write: Callable[[bytes], object], batch: int = 4096) -> None:
        import json

        self._dumps = json.dumps
        self._write = write
        self._lines: list[str] = []
        self._batch = batch

    def start(self, header: StreamHeader) -> None:
        self._lines.append(self._dumps({"stream": header.version, "offset": header.offset}))

    def apply(self, rec: Record, index: int) -> None:
        self._lines.append(self._dumps(record_to_json(rec, index)))
        if len(self._lines) >= self._batch:
            self.flush()

    def flush(self) -> None:
        """Write the lines held."""
        if self._lines:
            self._write(("\n".join(self._lines) + "\n").encode())
            self._lines.clear()

    def close(self) -> None:
        self.flush()


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
    cls: field_names(cls) for cls in RECORD_TYPES.values()
}
