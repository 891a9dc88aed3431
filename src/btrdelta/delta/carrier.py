"""How btrfs commands are written inside the zstd carrier, and back.

A carried command's CRC field is zero (the expander recomputes it) and a PATH equal to the
*previous path* is the marker TLV ``(0xffff, 0)``. Three transforms take away what a
re-created file (``MKFILE o<ino>-<gen>-<idx>``, ``RENAME`` into place, ``CHOWN``,
``CHMOD``, ``UTIMES``) repeats in every command, and are exact by construction (the writer
folds only what :func:`unfold` rebuilds byte for byte; the ZCMDS CRC32C, the recomputed
command CRC and the DEND BLAKE3 digest guard the result):

* **orphan names**: a creation (MKFILE..SYMLINK) whose PATH is ``o<INO>-<rest>`` and whose
  second TLV is INO is written with the first TLV ``(0xfffe, len(rest))`` + ``rest``: the
  path follows from the inode number (``rest`` is the same ``<gen>-<idx>`` every time, so
  it compresses to nothing); format 8: when INO is the last such creation's + 1, the first
  TLV is ``(0xfffa, len(rest))`` + ``rest`` and the INO TLV is left out (implied);
* **times as differences**: the timespec TLVs (ATIME/MTIME/CTIME/OTIME, 12 bytes each)
  after the path of a UTIMES become one TLV ``(0xfffd, n)`` holding, per timespec, its u16
  type, a width byte ``w`` (1..13) and the ``w``-byte signed little-endian difference, in
  nanoseconds, to the last folded timespec of the same type (0 at the start);
* **RENAME sets the previous path to its PATH_TO**, so the commands and PATCH on a file
  renamed into place name it by the marker.

And **name references**: the base names of carried UNLINKs are listed in order; a RENAME
whose PATH_TO lies in the same directory as the previous RENAME's PATH_TO and whose name
was unlinked before (a rebuilt file put back where the old one was) writes its PATH_TO as
``(0xfffc, n)`` + the zigzag LEB128 difference between the list index and the last
referenced index + 1; an UNLINK in the directory of the previous one writes its PATH as
``(0xfffb, n)`` + a reference into the sorted listing of that directory in the old
snapshot. Format 9: any carried command whose PATH is neither the previous path nor an
orphan name (nor an UNLINK reference) may write it as ``(0xfff9, n)`` + LEB128 ``up`` +
zigzag LEB128 ``d`` [+ LEB128 indexes]: from the directory ``D`` that holds ``A`` (the
previous path with ``up`` trailing components taken off), the name at index ``b + 1 + d``
of ``D``'s old listing (``b``: where ``A``'s base name sorts in it), then the name at each
further index in the old listing of the directory named so far (a file kept in place,
whose UTIMES or CHOWN names its next neighbour, costs a byte or two before compression
instead of its name). The read side (inflating, splitting, the C path) is :mod:`.unpack`.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Callable
from operator import attrgetter

from .._value import Value, field
from ..errors import MissingBaseError, StreamFormatError
from ..stream.constants import CMD_HEADER, CMD_HEADER_SIZE, Attr, Cmd
from ..tree.pathmap import PathMap
from .encoding import read_uvarint, unzigzag, zigzag
from .encoding import uvarint as _uvarint
from .format import DELTA_VERSION_OLDNAMES, DELTA_VERSION_PACKED, DELTA_VERSION_WRITTEN

__all__ = ["NAME_CMDS", "CarrierState", "fold", "unfold", "SAME_PATH_TLV"]

_TLV = struct.Struct("<HH")
_U64 = struct.Struct("<Q")
_TIMESPEC = struct.Struct("<QI")
_HDR6 = struct.Struct("<IH")
_ZERO_CRC = bytes(4)

#: TLV type of the marker "PATH is the previous path", with length 0
SAME_PATH_MARK = 0xFFFF
#: first TLV of a carried command whose PATH is the previous path
SAME_PATH_TLV = _TLV.pack(SAME_PATH_MARK, 0)
ORPHAN_TLV = 0xFFFE
TIMES_TLV = 0xFFFD
NAMEREF_TLV = 0xFFFC
OLDREF_TLV = 0xFFFB
#: format 8: an orphan name whose inode number is the previous one's + 1 (no INO TLV)
NEXT_INO_TLV = 0xFFFA
#: format 9: a PATH named by its place in an old directory listing near the previous path
OLDNAME_TLV = 0xFFF9
#: trailing components of the previous path an OLDNAME reference may take off
_OLDNAME_UP = 2
#: components of a path an OLDNAME reference names, at most
_OLDNAME_DOWN = 8

_CREATES = frozenset(
    {int(Cmd.MKFILE), int(Cmd.MKDIR), int(Cmd.MKNOD), int(Cmd.MKFIFO), int(Cmd.MKSOCK),
     int(Cmd.SYMLINK)}
)
_TIME_ATTRS = frozenset({int(Attr.ATIME), int(Attr.MTIME), int(Attr.CTIME), int(Attr.OTIME)})
_PATH = int(Attr.PATH)
_UNLINK = int(Cmd.UNLINK)
_UTIMES = int(Cmd.UTIMES)
_RENAME = int(Cmd.RENAME)
_PATH_TO = int(Attr.PATH_TO)
_INO = int(Attr.INO)
_NS = 1_000_000_000
_U64_MAX = (1 << 64) - 1
_INO_TLV = _TLV.pack(_INO, 8)
#: largest timespec as nanoseconds (u64 seconds, nanoseconds below 10**9)
_MAX_NS = (1 << 64) * _NS - 1
_MAX_WIDTH = 13


def _not_the_base(what: str) -> MissingBaseError:
    """A name reference the old tree cannot resolve. The record passed its CRC, so the old
    tree given is nearly always not the delta's old snapshot (exit 6, as a wrong parent),
    rarely a forged delta; either way nothing is applied from it."""
    return MissingBaseError(f"the old tree is not the delta's old snapshot: {what}")


class CarrierState(Value):
    """What both sides remember between carried commands."""

    #: the previous path (last PATH carried, PATH_TO of a RENAME, PATCH path)
    last_path: bytes | None = None
    #: the inode number of the last creation carried with an orphan name (0 at the start)
    last_ino: int = 0
    #: the delta's format version (format 8: creations may imply their inode number)
    format: int = DELTA_VERSION_WRITTEN
    #: last folded timespec, as nanoseconds, by TLV type
    times: dict[int, int] = field(default_factory=dict)
    #: base names of carried UNLINKs in order, and where each name occurs in that list
    names: list[bytes] = field(default_factory=list)
    name_at: dict[bytes, list[int]] = field(default_factory=dict)
    #: last referenced index of ``names``
    name_pos: int = -1
    #: directory (with its trailing ``/``, ``b""`` at the top) of the last RENAME's PATH_TO
    rename_dir: bytes | None = None
    #: sorted entry names of a directory of the old snapshot (``None``: none)
    lister: Callable[[bytes], list[bytes] | None] | None = None
    #: names of the stream's current paths in the old snapshot (fed by the caller)
    pathmap: PathMap = field(default_factory=PathMap)
    #: directory of the last UNLINK and the index of its name in the old listing
    unlink_dir: bytes | None = None
    unlink_pos: int = -1
    #: references to old listings that cannot be resolved give ``?`` names (``stat``)
    lenient: bool = False
    _listings: dict[bytes, tuple[list[bytes], dict[bytes, int]] | None] = field(
        default_factory=dict
    )
    #: directory commands followed so far (:func:`_follow`), and the last listing asked
    #: for: (directory, ``moves`` then, listing); consecutive UNLINKs of one directory
    #: skip the origin lookup while no directory command came in between
    moves: int = 0
    _last: tuple[bytes, int, tuple[list[bytes], dict[bytes, int]] | None] | None = None

    def _listing(self, d: bytes) -> tuple[list[bytes], dict[bytes, int]] | None:
        last = self._last
        if last is not None and last[1] == self.moves and last[0] == d:
            return last[2]
        origin = self.pathmap.origin(d)
        got: tuple[list[bytes], dict[bytes, int]] | None = None
        if origin is not None and self.lister is not None:
            if origin not in self._listings:
                names = self.lister(origin)
                self._listings[origin] = (
                    None if names is None else (names, {n: i for i, n in enumerate(names)})
                )
            got = self._listings[origin]
        self._last = (d, self.moves, got)
        return got

    def unlink_ref(self, path: bytes) -> bytes | None:
        """The OLDREF TLV standing for the PATH of an UNLINK of ``path``, or ``None``;
        updates the state."""
        cut = path.rfind(b"/")
        d, name = (path[:cut], path[cut + 1 :]) if cut >= 0 else (b"", path)
        if d != self.unlink_dir:
            self.unlink_dir, self.unlink_pos = d, -1
            return None
        listing = self._listing(d)
        if listing is None or name not in listing[1]:
            return None
        k = listing[1][name]
        delta = k - (self.unlink_pos + 1)
        self.unlink_pos = k
        value = _uvarint(zigzag(delta))
        return _TLV.pack(OLDREF_TLV, len(value)) + value

    def old_name_ref(self, path: bytes) -> bytes | None:
        """The OLDNAME TLV (format 9) standing for ``path``, or ``None``: its components
        found in the old listings from the directory that holds the previous path (or one
        of its first :data:`_OLDNAME_UP` ancestors) down. Reads the state only."""
        a = self.last_path
        if a is None or self.lister is None:
            return None
        for up in range(_OLDNAME_UP + 1):
            c = a.rfind(b"/")
            d, aname = (a[:c], a[c + 1 :]) if c >= 0 else (b"", a)
            if not d or path.startswith(d + b"/"):
                comps = (path[len(d) + 1 :] if d else path).split(b"/")
                if len(comps) > _OLDNAME_DOWN:
                    return None
                value = _uvarint(up)
                for i, name in enumerate(comps):
                    listing = self._listing(d)
                    k = None if listing is None else listing[1].get(name)
                    if k is None or listing is None:
                        return None
                    if i == 0:
                        k -= bisect_left(listing[0], aname) + 1
                        k = zigzag(k)
                    value += _uvarint(k)
                    d = d + b"/" + name if d else name
                return _TLV.pack(OLDNAME_TLV, len(value)) + value
            if c < 0:
                return None
            a = d
        return None

    def resolve_old_name(self, value: memoryview | bytes) -> bytes:
        """The PATH a carried command wrote as an OLDNAME TLV of ``value`` (format 9; also
        called by ``_unfold.c``, with bytes);
        ``lenient`` (no old tree: ``stat``): ``?`` where it cannot be resolved (the previous
        paths are then ``?`` names too, so the references after one are not resolved)."""
        try:
            return self._old_name(value)
        except (StreamFormatError, MissingBaseError):
            if self.lenient:
                return b"?"
            raise

    def _old_name(self, value: memoryview | bytes) -> bytes:
        up, pos = read_uvarint(value, 0, len(value))
        a = self.last_path
        if a is None or up > _OLDNAME_UP or pos == len(value):
            raise StreamFormatError("invalid old-name reference")
        for _ in range(up):
            c = a.rfind(b"/")
            if c < 0:
                raise StreamFormatError("old-name reference above the top directory")
            a = a[:c]
        c = a.rfind(b"/")
        d, aname = (a[:c], a[c + 1 :]) if c >= 0 else (b"", a)
        first = True
        for _ in range(_OLDNAME_DOWN):
            if pos == len(value):
                break
            k, pos = read_uvarint(value, pos, len(value))
            listing = self._listing(d)
            if listing is None:
                raise _not_the_base(f"an old-name reference lists directory "
                                    f"{d.decode(errors='replace')!r}, which it has not")
            if first:
                k = bisect_left(listing[0], aname) + 1 + unzigzag(k)
                first = False
            if not 0 <= k < len(listing[0]):
                raise _not_the_base(f"an old-name reference is out of range of directory "
                                    f"{d.decode(errors='replace')!r}")
            d = d + b"/" + listing[0][k] if d else listing[0][k]
        if pos != len(value):
            raise StreamFormatError(f"old-name reference of more than {_OLDNAME_DOWN} names")
        return d

    def resolve_unlink(self, value: memoryview) -> bytes:
        """The PATH of an UNLINK written with an OLDREF TLV of ``value``."""
        z, end = read_uvarint(value, 0, len(value))
        d = self.unlink_dir
        listing = None if d is None else self._listing(d)
        if self.lenient and end == len(value) and d is not None and listing is None:
            return d + b"/?" if d else b"?"
        if end != len(value) or d is None:
            raise StreamFormatError("invalid UNLINK name reference")
        if listing is None:
            raise _not_the_base(f"an UNLINK lists directory {d.decode(errors='replace')!r}, "
                                "which it has not")
        k = self.unlink_pos + 1 + unzigzag(z)
        if not 0 <= k < len(listing[0]):
            raise _not_the_base(f"an UNLINK name reference is out of range of directory "
                                f"{d.decode(errors='replace')!r}")
        self.unlink_pos = k
        return d + b"/" + listing[0][k] if d else listing[0][k]

    def unlinked(self, path: bytes) -> None:
        """Remember the base name of a carried UNLINK."""
        name = path[path.rfind(b"/") + 1 :]
        self.name_at.setdefault(name, []).append(len(self.names))
        self.names.append(name)

    def name_ref(self, to: bytes) -> bytes | None:
        """The NAMEREF TLV for a RENAME to ``to``, or ``None``; updates the state."""
        cut = to.rfind(b"/") + 1
        d, name = to[:cut], to[cut:]
        same_dir = d == self.rename_dir
        self.rename_dir = d
        at = self.name_at.get(name) if same_dir else None
        if not at:
            return None
        want = self.name_pos + 1
        k = min(at, key=lambda i: abs(i - want)) if len(at) > 1 else at[0]
        delta = k - want
        self.name_pos = k
        value = _uvarint(zigzag(delta))
        return _TLV.pack(NAMEREF_TLV, len(value)) + value

    def resolve_ref(self, value: memoryview) -> bytes:
        """PATH_TO of a RENAME written with a NAMEREF TLV of ``value``."""
        z, end = read_uvarint(value, 0, len(value))
        if end != len(value) or self.rename_dir is None:
            raise StreamFormatError("invalid RENAME name reference")
        k = self.name_pos + 1 + unzigzag(z)
        if not 0 <= k < len(self.names):
            raise StreamFormatError("RENAME name reference out of range")
        self.name_pos = k
        return self.rename_dir + self.names[k]


#: what two states are compared by (what both sides remember); not the caches and the
#: helpers (``lister``, ``pathmap``, ``_listings``, ``moves``, ``_last``)
_STATE = attrgetter("last_path", "last_ino", "format", "times", "names", "name_at",
                    "name_pos", "rename_dir", "unlink_dir", "unlink_pos", "lenient")


def _same_state(self: CarrierState, other: object) -> bool:
    if other.__class__ is not CarrierState:
        return NotImplemented  # type: ignore[no-any-return]
    return bool(_STATE(self) == _STATE(other))


CarrierState.__eq__ = _same_state  # type: ignore[assignment,method-assign]


def _path_tlv(tag: int, path: bytes, cmd: int) -> bytearray:
    """The TLV of ``path`` (a path a name reference or an unfolded command made)."""
    if len(path) > 0xFFFF:
        raise StreamFormatError(f"carried command {cmd} makes a path of {len(path)} bytes "
                                "(a TLV holds at most 65535)")
    out = bytearray(_TLV.pack(tag, len(path)))
    out += path
    return out


def _rename_to(mv: memoryview, pos: int, end: int) -> bytes | None:
    """PATH_TO of a RENAME payload whose TLVs start at ``pos`` (after its PATH)."""
    if end - pos < 4:
        return None
    t, n = _TLV.unpack_from(mv, pos)
    if t != _PATH_TO or pos + 4 + n > end:
        return None
    return bytes(mv[pos + 4 : pos + 4 + n])


def _fold_times(mv: memoryview, pos: int, end: int, state: CarrierState) -> bytes | None:
    """The TIMES TLV standing for the timespec TLVs in ``mv[pos:end]``, or ``None``."""
    if (end - pos) % 16 or end == pos:
        return None
    entries: list[tuple[int, int]] = []
    for p in range(pos, end, 16):
        t, n = _TLV.unpack_from(mv, p)
        sec, nsec = _TIMESPEC.unpack_from(mv, p + 4)
        if t not in _TIME_ATTRS or n != 12 or nsec >= _NS:
            return None
        entries.append((t, sec * _NS + nsec))
    parts = []
    times = dict(state.times)
    for t, ns in entries:
        d = ns - times.get(t, 0)
        w = (d.bit_length() + 8) // 8
        parts.append(struct.pack("<HB", t, w) + d.to_bytes(w, "little", signed=True))
        times[t] = ns
    value = b"".join(parts)
    if 4 + len(value) > end - pos:  # huge jumps: the differences are not smaller
        return None
    state.times = times
    return _TLV.pack(TIMES_TLV, len(value)) + value


def fold(cmd: int, raw: memoryview, state: CarrierState) -> list[bytes | memoryview]:
    """The carrier form of the btrfs command ``raw`` (header included)."""
    length = len(raw) - CMD_HEADER_SIZE
    end = len(raw)
    if length < 4 or _TLV.unpack_from(raw, CMD_HEADER_SIZE)[0] != _PATH:
        return [raw[:6], _ZERO_CRC, raw[CMD_HEADER_SIZE:]]
    n = _TLV.unpack_from(raw, CMD_HEADER_SIZE)[1]
    rest = CMD_HEADER_SIZE + 4 + n
    path = bytes(raw[CMD_HEADER_SIZE + 4 : rest])
    first: bytes | memoryview
    after = rest  # where the payload goes on after the first TLV (and an implied INO)
    ref = state.unlink_ref(path) if cmd == _UNLINK else None
    if ref is not None:
        first = ref
        state.last_path = path
    elif path == state.last_path:
        first = SAME_PATH_TLV
    else:
        first = raw[CMD_HEADER_SIZE:rest]
        if cmd in _CREATES and end - rest >= 12:
            t, m = _TLV.unpack_from(raw, rest)
            if t == _INO and m == 8:
                ino = _U64.unpack_from(raw, rest + 4)[0]
                prefix = b"o%d-" % ino
                if path.startswith(prefix) and len(path) - len(prefix) < 0x10000:
                    tail = path[len(prefix) :]
                    mark = ORPHAN_TLV
                    if ino == state.last_ino + 1 and state.format >= DELTA_VERSION_PACKED:
                        mark, after = NEXT_INO_TLV, rest + 12
                    first = _TLV.pack(mark, len(tail)) + tail
                    state.last_ino = ino
        if type(first) is memoryview and state.format >= DELTA_VERSION_OLDNAMES:
            first = state.old_name_ref(path) or first
        state.last_path = path
    tail_parts: list[bytes | memoryview] = [raw[after:]]
    to: bytes | None = None
    if cmd == _UTIMES:
        times = _fold_times(raw, rest, end, state)
        if times is not None:
            tail_parts = [times]
    elif cmd == _RENAME:
        to = _rename_to(raw, rest, end)
        if to is not None:
            state.last_path = to
            ref = state.name_ref(to)
            if ref is not None:
                tail_parts = [ref, raw[rest + 4 + len(to) :]]
    if cmd == _UNLINK:
        state.unlinked(path)
    if cmd in NAME_CMDS:
        _follow(state, cmd, path, to if cmd == _RENAME else None)
    new_len = len(first) + sum(len(p) for p in tail_parts)
    return [_HDR6.pack(new_len, cmd), _ZERO_CRC, first, *tail_parts]


def _unfold_times(value: memoryview, state: CarrierState) -> bytearray:
    out = bytearray()
    pos = 0
    while pos < len(value):
        if len(value) - pos < 3:
            raise StreamFormatError("carried UTIMES times are truncated")
        t, w = struct.unpack_from("<HB", value, pos)
        pos += 3
        if t not in _TIME_ATTRS or not 1 <= w <= _MAX_WIDTH or pos + w > len(value):
            raise StreamFormatError("carried UTIMES times are invalid")
        ns = state.times.get(t, 0) + int.from_bytes(value[pos : pos + w], "little", signed=True)
        pos += w
        if not 0 <= ns <= _MAX_NS:
            raise StreamFormatError("carried UTIMES time is out of range")
        state.times[t] = ns
        out += _TLV.pack(t, 12) + _TIMESPEC.pack(*divmod(ns, _NS))
    return out


def _orphan(
    cmd: int, implied: bool, mv: memoryview, p: int, rest: int, end: int,
    state: CarrierState,
) -> tuple[bytes, bytes]:
    """The orphan name of a carried creation whose first TLV (at ``p``, ending at ``rest``)
    is an orphan-name marker, and the INO TLV to insert after it (``implied``: format 8's
    marker, the INO TLV left out; else none to insert); the last inode advanced."""
    ino_tlv = b""
    if not implied:
        if cmd not in _CREATES or rest + 12 > end or _TLV.unpack_from(mv, rest) != (_INO, 8):
            raise StreamFormatError("orphan-name marker on a command without an inode number")
        state.last_ino = _U64.unpack_from(mv, rest + 4)[0]
    else:
        if state.format < DELTA_VERSION_PACKED:
            raise StreamFormatError(f"implied inode number in a format-{state.format} delta")
        if cmd not in _CREATES or rest > end or state.last_ino >= _U64_MAX:
            raise StreamFormatError("implied inode number on a command that has none")
        state.last_ino += 1
        ino_tlv = _INO_TLV + _U64.pack(state.last_ino)
    return b"o%d-" % state.last_ino + bytes(mv[p + 4 : rest]), ino_tlv


def unfold(
    cmd: int, mv: memoryview, pos: int, end: int, state: CarrierState, limit: int
) -> bytearray | None:
    """The btrfs command (header with a zero CRC field, payload) a carried
    command ``mv[pos:end]`` stands for; ``None`` if it is stored as it is (only its CRC
    and the previous path need updating by the caller).

    Raises:
        StreamFormatError: a marker is malformed or refers to nothing.
    """
    p = pos + CMD_HEADER_SIZE
    if end - p < 4:
        return None
    t, n = _TLV.unpack_from(mv, p)
    ino_tlv = b""
    if t == SAME_PATH_MARK and n == 0:
        if state.last_path is None:
            raise StreamFormatError("carried command refers to a previous path: none")
        path = state.last_path
        rest = p + 4
    elif t in (ORPHAN_TLV, NEXT_INO_TLV):
        rest = p + 4 + n
        path, ino_tlv = _orphan(cmd, t == NEXT_INO_TLV, mv, p, rest, end, state)
    elif t == _PATH:
        rest = p + 4 + n
        if rest > end:
            raise StreamFormatError("carried command's PATH overruns it")
        path = bytes(mv[p + 4 : rest])
    elif t == OLDREF_TLV and cmd == _UNLINK:
        rest = p + 4 + n
        if rest > end:
            raise StreamFormatError("UNLINK name reference overruns the command")
        path = state.resolve_unlink(mv[p + 4 : rest])
    elif t == OLDNAME_TLV and state.format >= DELTA_VERSION_OLDNAMES:
        rest = p + 4 + n
        if rest > end:
            raise StreamFormatError("old-name reference overruns the command")
        path = state.resolve_old_name(mv[p + 4 : rest])
    else:
        return None
    if cmd == _UNLINK and t != OLDREF_TLV:
        state.unlink_ref(path)
    state.last_path = path
    to: bytes | None = None
    tail: bytes | memoryview | bytearray = mv[rest:end]
    if cmd == _UTIMES and end - rest >= 4 and _TLV.unpack_from(mv, rest)[0] == TIMES_TLV:
        k = _TLV.unpack_from(mv, rest)[1]
        if rest + 4 + k != end:
            raise StreamFormatError("carried UTIMES times do not end the command")
        tail = _unfold_times(mv[rest + 4 : end], state)
    elif cmd == _RENAME:
        if end - rest >= 4 and _TLV.unpack_from(mv, rest)[0] == NAMEREF_TLV:
            k = _TLV.unpack_from(mv, rest)[1]
            if rest + 4 + k > end:
                raise StreamFormatError("RENAME name reference overruns the command")
            to = state.resolve_ref(mv[rest + 4 : rest + 4 + k])
            tail = _path_tlv(_PATH_TO, to, cmd)
            tail += mv[rest + 4 + k : end]
            state.last_path = to
        else:
            to = _rename_to(mv, rest, end)
            if to is not None:
                state.last_path = to
                state.name_ref(to)
    elif cmd == _UNLINK:
        state.unlinked(path)
    if cmd in NAME_CMDS:
        _follow(state, cmd, path, to)
    if t == _PATH and tail is not None and type(tail) is memoryview:
        return None
    length = 4 + len(path) + len(ino_tlv) + len(tail)
    if length > limit:
        raise StreamFormatError(f"carried command {cmd} of length {length} is invalid")
    buf = bytearray(CMD_HEADER.pack(length, cmd, 0))
    buf += _path_tlv(_PATH, path, cmd)
    buf += ino_tlv
    buf += tail
    return buf



#: commands that move directories (what the directory-origin model follows): only the
#: origin of a directory that holds unlinked names is ever asked for, and a wrong answer
#: costs size, never exactness (both sides compute the same listing index), so files'
#: creations, links and unlinks are left out (two thirds of the name commands)
NAME_CMDS: frozenset[int] = frozenset(
    {int(Cmd.MKDIR), int(Cmd.RENAME), int(Cmd.RMDIR), int(Cmd.SNAPSHOT), int(Cmd.SUBVOL)}
)
_MKDIR, _RMDIR, _SUBVOL = int(Cmd.MKDIR), int(Cmd.RMDIR), int(Cmd.SUBVOL)


def _follow(state: CarrierState, cmd: int, path: bytes, to: bytes | None) -> None:
    """Follow a carried directory command in ``state.pathmap`` (both sides, with
    the fields fold/unfold already have: no second decode)."""
    pm = state.pathmap
    state.moves += 1
    try:
        if cmd == _RENAME:
            if to is not None:
                pm.rename(path, to)
        elif cmd == _MKDIR:
            pm.create(path)
        elif cmd == _RMDIR:
            pm.remove(path)
        else:  # SNAPSHOT, SUBVOL: a new stream
            state.pathmap = PathMap()
            state.pathmap.full = cmd == _SUBVOL
            state._listings.clear()
    except ValueError:  # the subvolume root as a name: nothing to follow
        pass
