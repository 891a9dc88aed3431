"""Patched files during expansion: a PATCH's old file checked and patched, then its new
content handed out, in order, by the PWRITE and PENC records that follow.

For a ``PATCH`` (inline patch bytes, or the PDATA records after it) :class:`Patcher` reads
the old file below the old root (safely: no symlink followed), checks its size and digest
**before** anything of it is produced, applies the codec and checks the new content's size
and digest. A ``PWRITE`` then gives WRITE records of the new content; a ``PENC`` (an
ENCODED_WRITE of a ``--compressed-data`` stream) recompresses the next bytes of it, in a
pool of threads when the extent is large (zstd and zlib release the GIL), and
:meth:`Patcher.regenerated` gives the record once its command's CRC32C matched the
original's. For ``btrdelta receive`` on btrfs (``clone_same``), the records of a file whose
content is its old file's carry the CLONE from the parent snapshot that ``receive`` applies
instead (:class:`SameWrite`, :class:`SameEncodedWrite`). Once no digest of the expanded
stream is computed (``receive``'s, from its first extent left to a CLONE on), such a file
is not read at all: its old file is checked in worker threads
(:class:`~.oldfiles.OldFileChecks`), and :meth:`Patcher.settle` waits for those checks
before a stream's END (which commits the subvolume) goes out. ``receive`` also writes a
patched file's extents as plain data when its new content's digest was checked, instead
of recompressing them (:meth:`Patcher._written_plain`), and clones from the parent the
ranges of it equal to the old file's at the same offsets (:meth:`Patcher._cloned_runs`).

Errors are :class:`~btrdelta.errors.BtrdeltaError` with the path where one is known; the
expansion (:mod:`.expand`) adds the source and the record index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from .. import TYPE_CHECKING, _native
from .._pool import Pool, Task
from .._value import Value
from ..errors import BtrdeltaError, ChecksumError, MissingBaseError, StreamFormatError
from ..fs.content import data_segments
from ..fs.sandbox import DirCache, open_regular, open_regular_sized
from ..stream import records as R
from ..stream.codec import encode_record
from ..stream.constants import CMD_HEADER, MAX_PAYLOAD
from .carrier import CarrierState
from .codecs import get_codec
from .format import (
    NO_DIGEST,
    OLD_SIZE_UNKNOWN,
    SAME_CODEC,
    Patch,
    PatchData,
    PEncoded,
    PWrite,
    patch_refusal,
)
from .oldfiles import OldFileChecks, digest, map_old_file, read_old_file, read_old_files
from .recompress import compress_extent

if TYPE_CHECKING:
    import mmap
    from typing import Any

    from ._hpatch import Output

__all__ = ["Applied", "Patcher", "Pending", "SameEncodedWrite", "SameWrite"]

#: what ``receive`` applies instead of a regenerated record: a CLONE, a WRITE, or several
Applied = R.Clone | R.Write | tuple[R.Clone | R.Write, ...]

#: threads recompressing extents (one per CPU this process may use; none if only one);
#: extents below _INLINE bytes are recompressed at once
_WORKERS = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
_INLINE = 8192


class Pending(Value):
    """A PENC record whose extent is being recompressed (``packed``, in a worker thread)."""

    #: bytes: recompressed at once (a small extent); None: not regenerated (its CLONE is
    #: applied instead, see ``hash_clones``)
    packed: Task[bytes] | bytes | None
    penc: PEncoded
    path: bytes
    version: int
    index: int  # of the delta record, for errors
    #: receive: what is applied instead (not regenerated): the CLONE from the parent of
    #: unchanged content, or a WRITE of a patched file's verified content (:meth:`pencoded`),
    #: or WRITEs and CLONEs of it (:meth:`Patcher._cloned_runs`)
    clone: Applied | None = None


class _Active(Value):
    patch: Patch
    #: a read-only mapping for a same patch's old file in a parent snapshot
    #: (:func:`~.oldfiles.map_old_file`); None: an unchanged file whose content is cloned,
    #: not read (its old file is being checked in the background: :attr:`Patcher.checks`)
    content: bytes | mmap.mmap | Output | None
    size: int
    pos: int = 0
    #: the old file's data ranges (start, end) when it has holes (``clone_same`` only):
    #: a CLONE of a range with a hole would put a hole where the stream writes data
    old_data: list[tuple[int, int]] | None = None
    #: a patched file's ranges (offset, length) equal to its old file's at the same
    #: offsets, cloned instead of written (``receive`` on btrfs, :meth:`Patcher._cloned_runs`),
    #: and the first of them not used up yet
    same: list[tuple[int, int]] | None = None
    next_same: int = 0


_ZEROS = bytearray(1 << 16)
#: a patched file's ranges equal to its old file's are compared in blocks of this size
#: (btrfs's clone granularity) and cloned in runs of at least _SAME_MIN bytes
_SAME_BLOCK = 4096
_SAME_MIN = 64 << 10


def _equal_runs(new: Any, old: Any, start: int, end: int, block: int,
                min_len: int) -> list[tuple[int, int]]:
    """The runs (offset, length) of ``new[start:end]`` equal to ``old`` at the same
    offsets: whole blocks from ``start`` (a multiple of ``block``), and the last, shorter
    block where it ends both contents; only runs of ``min_len`` bytes or more (the
    reference of ``_hpatch.equal_runs``)."""
    runs: list[tuple[int, int]] = []
    if block <= 0 or start < 0 or end > len(new) or start % block:
        return runs
    tail = len(new) if len(new) == len(old) else -1
    run = -1
    for x in range(start, max(start, end), block):
        y = min(x + block, end)
        if (y - x == block or y == tail) and y <= len(old) and old[x:y] == new[x:y]:
            run = x if run < 0 else run
        elif run >= 0:
            if x - run >= min_len:
                runs.append((run, x - run))
            run = -1
    if run >= 0 and end - run >= min_len:
        runs.append((run, end - run))
    return runs


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes: the data of a WRITE left to its CLONE, which only counts its size
    (no digest of the expanded stream is computed then); shared up to 1 MiB."""
    global _ZEROS
    if n > len(_ZEROS):
        if n > 1 << 20:
            return memoryview(bytearray(n))
        _ZEROS = bytearray(1 << 20)
    return memoryview(_ZEROS)[:n]


class SameWrite(R.Write):
    """A regenerated WRITE of content equal to the (verified) old file's. ``apply`` is what
    ``receive`` applies instead: a CLONE of the PWRITE's whole range from the parent
    snapshot on its first chunk, ``None`` on the others (see ``clone_same``)."""

    __slots__ = ("apply",)
    apply: Applied | None


class SameEncodedWrite(R.EncodedWrite):
    """A regenerated ENCODED_WRITE that ``receive`` does not apply: ``apply`` is what it
    applies instead, the CLONE of its file range from the parent (content equal to the old
    file's) or a WRITE of that range of a patched file's verified content."""

    __slots__ = ("apply",)
    apply: Applied | None


class Patcher:
    """The patch being applied and the new content being handed out.

    Args:
        root_of: the old snapshot's directory (``root_of(what)``; ``what`` names the record
            that needs it, for the error when there is none).
        state: the carrier's state, whose previous path a PATCH may refer to.
        max_file_size: largest old file / new content a patch may involve.
        source: input name for errors located later (:meth:`regenerated`).
        clone_same: give unchanged content's records a CLONE from the parent snapshot.
        hash_clones: with ``clone_same``, still recompress the unchanged extents a CLONE
            stands for (their bytes are only hashed); ``False``: they are not regenerated
            (:meth:`cloned_size`, :meth:`unread_clone`).
    """

    def __init__(
        self, root_of: Callable[[str], str | os.PathLike[str]], state: CarrierState,
        max_file_size: int, source: str | None, clone_same: bool, hash_clones: bool = True,
    ) -> None:
        self.root_of = root_of
        self.state = state
        self.max_file_size = max_file_size
        self.source = source
        self.clone_same = clone_same
        self.hash_clones = hash_clones
        #: size of an ENCODED_WRITE without its data, by (path length, no encryption
        #: attribute, version): see :meth:`_clone_head`
        self.clone_heads: dict[tuple[int, bool, int], int] = {}
        #: version of the embedded btrfs stream, and its SNAPSHOT/SUBVOL (set by the caller)
        self.version = 0
        self.head: Any = None
        self.active: _Active | None = None
        self.pending: Patch | None = None
        self.pdata: list[bytes] = []
        self.pdata_len = 0
        #: directory fd of the last old file read
        self.dirs = DirCache()
        #: recompression threads (PENC), started at the first large PENC; see :meth:`close`
        self.pool: Pool | None = None
        #: True once the expanded stream's digest is not computed (set by the caller): an
        #: unchanged file's content is then not needed at all when it is cloned, and its
        #: old file is checked in the background (:meth:`settle` waits for that)
        self.digest_off = False
        #: True when the caller checks the content of what is received against a digest
        #: of its own (``update``: the received tree's content identity, which reads every
        #: file a patch wrote or a CLONE filled from the tree itself): the old files and the
        #: patched contents are then not hashed here (set by the caller, with
        #: ``check_digest=False``); a wrong old file shows as a tree that does not check
        self.content_checked = False
        self.checks = OldFileChecks(_WORKERS)
        fast = _native.live("hpatch")
        self.equal_runs = _equal_runs if fast is None else fast.equal_runs
        #: index of the record being expanded (set by the caller), for deferred errors
        self.index = 0

    def check_idle(self, what: str) -> None:
        """``what`` may only come when no patch is being used."""
        if self.active is not None or self.pending is not None:
            raise StreamFormatError(f"{what} while a patch is not used up")

    def settle(self) -> None:
        """Wait for the old files being checked in the background; raise the first that
        failed (before a stream's END, held back until then, commits what was cloned)."""
        self.checks.wait()

    def start(self, p: Patch) -> None:
        """A PATCH: checked, and applied at once when it needs no PDATA."""
        if self.active is not None or self.pending is not None:
            raise StreamFormatError("PATCH while another patch is not used up")
        if p.path is None:
            if self.state.last_path is None:
                raise StreamFormatError("PATCH refers to a previous path: there is none")
            p.path = self.state.last_path
        if p.base_path is None:
            p.base_path = p.path
        self.state.last_path = p.path
        if p.new_size > self.max_file_size or p.old_size > self.max_file_size:
            raise StreamFormatError(
                f"patch sizes {p.old_size}/{p.new_size} exceed the limit {self.max_file_size}"
            )
        refusal = patch_refusal(p.codec, p.patch_len, p.old_size, p.new_size)
        if refusal is not None:
            raise StreamFormatError(refusal)
        self.root_of("PATCH")
        self.pending = p
        self.pdata = []
        self.pdata_len = 0
        if p.data is not None or p.codec == SAME_CODEC:
            self._finish(p, bytes(p.data) if p.data is not None else b"")

    def add_pdata(self, d: PatchData) -> None:
        """A PDATA: the next patch bytes (the patch is applied with its last piece)."""
        p = self.pending
        if p is None:
            raise StreamFormatError("PDATA without a PATCH")
        self.pdata_len += len(d.data)
        if self.pdata_len > p.patch_len:
            raise StreamFormatError("PDATA longer than the patch length")
        self.pdata.append(bytes(d.data))
        if self.pdata_len == p.patch_len:
            self._finish(p, b"".join(self.pdata))

    def _cloned_unread(self, p: Patch) -> bool:
        """Whether the content of ``p`` (a ``same`` patch) is cloned and needed for nothing
        else: every record of it becomes a CLONE from the parent (``receive`` on btrfs),
        no ENCODED_WRITE of it is recompressed (``hash_clones``) and no digest of the
        expanded stream is computed. Then only its old file's digest is checked, in the
        background, as the expansion goes on."""
        return (
            self.digest_off and self.clone_same and not self.hash_clones
            and p.codec == SAME_CODEC and not p.bases and p.old_size != OLD_SIZE_UNKNOWN
            and type(self.head) is R.Snapshot and _WORKERS > 1
        )

    def _open_same(self, root: str | os.PathLike[str],
                   p: Patch) -> tuple[int, int, list[tuple[int, int]] | None] | None:
        """For a ``same`` patch cloned from the parent (``clone_same``): its old file open,
        its size and its data ranges when it has holes (SEEK_DATA/SEEK_HOLE, else
        ``None``); ``None`` when it is not such a patch or there is no such regular file
        (reported by the read below). The stream's WRITEs of zeros where the old file has
        a hole (a hole filled with zeros since the parent) must stay data: ``btrfs
        receive`` of the stream writes them."""
        if not self.clone_same or p.codec != SAME_CODEC or type(self.head) is not R.Snapshot:
            return None
        try:
            got = open_regular_sized(root, p.base_path, self.dirs)
        except (OSError, BtrdeltaError):
            return None  # (reported by the read or the CLONE, as before)
        if got is None:
            return None
        fd, size = got
        try:
            segs = data_segments(fd, size)
        except OSError:
            os.close(fd)
            return None
        if not size or segs == [(0, size)]:
            return fd, size, None
        return fd, size, [(off, off + n) for off, n in segs]

    def _unread(self, root: str | os.PathLike[str], p: Patch) -> bool:
        """:meth:`_finish` of a ``same`` patch whose content is cloned and not read
        (:meth:`_cloned_unread`), where its old file is a regular file of the size the
        patch says without holes: the file opened and handed to the background check,
        ``True``; else ``False`` (nothing done: :meth:`_finish` goes the general way)."""
        try:
            got = open_regular_sized(root, p.base_path, self.dirs)
        except (OSError, BtrdeltaError):
            return False
        if got is None:
            return False
        fd, size = got
        try:
            whole = size == p.old_size and (not size or data_segments(fd, size) == [(0, size)])
        except OSError:
            whole = False
        if not whole:
            os.close(fd)
            return False
        if self.content_checked:
            os.close(fd)
        else:  # checked in the background, from the fd open here (taken over)
            self.checks.add(root, p.base_path, size, p.hash_algo, p.old_digest, self.index,
                            fd)
        self.active = _Active(p, None, size)
        return True

    def _finish(self, p: Patch, patch: bytes) -> None:
        self.pending = None
        self.pdata = []
        root = self.root_of("PATCH")  # known since the PATCH came
        if p.codec == SAME_CODEC and self._cloned_unread(p) and self._unread(root, p):
            return
        # (its size looked up first: a missing or resized old file fails here, as below,
        # not in the CLONE of a range it does not have)
        same = self._open_same(root, p)
        old_data = None
        if same is not None:
            fd, size, old_data = same
            if old_data is None and size == p.old_size and self._cloned_unread(p):
                if self.content_checked:
                    os.close(fd)
                else:  # checked in the background, from the fd open here (taken over)
                    self.checks.add(root, p.base_path, p.old_size, p.hash_algo,
                                    p.old_digest, self.index, fd)
                self.active = _Active(p, None, p.old_size)
                return
            os.close(fd)
        try:
            old: bytes | mmap.mmap | None
            if p.bases:
                old = read_old_files(
                    root, (p.base_path, *p.bases), expected_size=p.old_size,
                    algo=p.hash_algo, expected_digest=p.old_digest, cache=self.dirs,
                )
            else:
                # a patch's old file is hashed only when the patch fails (to name the
                # cause) where the new content has a digest: it, checked before any of its
                # WRITEs goes out, and DEND's cover a wrong old file; the old digest is
                # the only per-file check of a SAME patch and of one without a new digest
                lazy = (p.codec != SAME_CODEC and p.new_algo != NO_DIGEST) \
                    or self.content_checked
                known = p.old_size != OLD_SIZE_UNKNOWN
                # mapped where the codec takes a buffer (a parent snapshot's large file)
                mapped = p.codec == SAME_CODEC or get_codec(p.codec).takes_buffers
                old = (map_old_file if mapped else read_old_file)(
                    root, p.base_path, expected_size=p.old_size if known else None,
                    max_size=self.max_file_size, algo=None if lazy else p.hash_algo,
                    expected_digest=p.old_digest, cache=self.dirs,
                )
                if old is None:  # the short CPATCH of formats 7 and 8: the old file as it is
                    raise MissingBaseError(
                        "old file of a patch is missing or above --max-file-size")
            assert old is not None
            if p.codec == SAME_CODEC:
                self.active = _Active(p, old, len(old), old_data=old_data)
                return
            try:
                new = self._apply(root, p, old, patch)
            except BtrdeltaError:
                _check_old(p, old)
                raise
        except BtrdeltaError as exc:
            raise exc.located(path=p.base_path) from None
        runs = self.equal_runs(new, old, 0, len(new), _SAME_BLOCK, _SAME_MIN) \
            if self._cloneable(p, old) else None
        if p.new_algo == NO_DIGEST or self.content_checked:
            # ``edits`` / ``edits2``: the DEND digest covers it; or the caller's check
            self.active = _Active(p, new, len(new), same=runs)
            return
        actual = digest(p.new_algo if p.new_algo is not None else p.hash_algo, new)
        if actual != p.new_digest:
            _check_old(p, old)
            raise ChecksumError(
                "patched content differs from the new content (wrong old file or bad patch)",
                expected=p.new_digest.hex(), actual=actual.hex(), path=p.path,
            )
        self.active = _Active(p, new, len(new), same=runs)

    def _apply(self, root: str | os.PathLike[str], p: Patch, old: bytes | mmap.mmap,
               patch: bytes) -> bytes | Output:
        """The new content of ``p``: a mapped old file (a read-only snapshot's, of
        ``MAP_MIN`` bytes or more) is opened again for the codec to map the result over
        (:meth:`~.codecs.base.Codec.apply_over`); a mapping only where the codec takes
        any buffer (``takes_buffers``)."""
        codec = get_codec(p.codec)
        fd = None if isinstance(old, bytes) else open_regular(root, p.base_path, self.dirs)
        if fd is None:
            return codec.apply(old, patch, new_size=p.new_size)  # type: ignore[arg-type]
        try:
            return codec.apply_over(old, patch,  # type: ignore[arg-type]
                                    new_size=p.new_size, old_fd=fd)
        finally:
            os.close(fd)

    def pwrite(self, w: PWrite) -> Iterator[R.Write]:
        """The WRITE records of a PWRITE, data taken in order from the new content."""
        a = self.active
        if a is None:
            raise StreamFormatError("PWRITE without a patched content")
        if a.pos + w.length > a.size or w.length == 0:
            raise StreamFormatError("PWRITE runs past the patched content")
        if self.version == 1 and w.chunk > 0xFFFF:
            raise StreamFormatError(f"PWRITE chunk {w.chunk} does not fit a v1 WRITE")
        if w.offset + w.length >= 1 << 64:
            raise StreamFormatError("PWRITE offset overflows")
        path = a.patch.path
        off, pos, end = w.offset, a.pos, a.pos + w.length
        clone = self._same_clone(a, off, w.length, pos)
        if a.content is None:  # cloned, not read: the records only count their size
            assert clone is not None
            while pos < end:
                n = min(w.chunk, end - pos)
                rec = SameWrite(path, off, _zeros(n))
                rec.apply, clone = clone, None
                yield rec
                pos += n
                off += n
        content = memoryview(a.content if a.content is not None else b"")
        if clone is not None:
            while pos < end:
                n = min(w.chunk, end - pos)
                rec = SameWrite(path, off, content[pos : pos + n])
                rec.apply, clone = clone, None
                yield rec
                pos += n
                off += n
        while pos < end:
            n = min(w.chunk, end - pos)
            cloned = self._cloned_runs(a, off, pos, n) if a.same else None
            if cloned is None:
                yield R.Write(path, off, content[pos : pos + n])
            else:  # CLONEs where the old file has the same bytes
                rec = SameWrite(path, off, content[pos : pos + n])
                rec.apply = cloned
                yield rec
            pos += n
            off += n
        a.pos = end
        if end == a.size:
            self.active = None

    def _same_clone(self, a: _Active, offset: int, length: int,
                    old_offset: int) -> R.Clone | None:
        """With ``clone_same``, for content equal to the verified old file: the CLONE from
        the parent snapshot that puts ``length`` bytes of it at ``old_offset`` into the new
        file at ``offset`` (what ``receive`` applies instead of the regenerated write)."""
        head = self.head
        if not self.clone_same or a.patch.codec != SAME_CODEC or type(head) is not R.Snapshot:
            return None
        if a.old_data is not None and not any(
                s <= old_offset and old_offset + length <= e for s, e in a.old_data):
            return None  # a hole there in the old file: the data is written
        assert a.patch.base_path is not None
        return R.Clone(offset, length, a.patch.path, head.clone_uuid, head.clone_ctransid,
                       a.patch.base_path, old_offset)

    def _check_penc(self, a: _Active, e: PEncoded) -> None:
        """A PENC record's bounds against the patched content ``a`` and the stream."""
        if a.pos + e.length > a.size or e.length == 0:
            raise StreamFormatError("PENC runs past the patched content")
        if self.version < 2:
            raise StreamFormatError("PENC in a v1 stream (ENCODED_WRITE needs v2)")
        if e.disk_len > MAX_PAYLOAD[self.version]:
            raise StreamFormatError(f"PENC disk length {e.disk_len} exceeds a command's payload")

    def unread_clone(self, e: PEncoded) -> tuple[R.Clone, int] | None:
        """:meth:`pencoded` and :meth:`cloned_size` in one for an extent of a file whose content
        is cloned, not read (:meth:`_cloned_unread`: the usual record of an unchanged
        file in a ``receive`` on btrfs): the CLONE applied instead and the size the command
        has in the expanded stream, with :meth:`pencoded`'s checks; ``None`` for any other
        PENC (then :meth:`pencoded`)."""
        a = self.active
        head = self.head
        if a is None or a.content is not None or a.old_data is not None \
                or type(head) is not R.Snapshot:
            return None
        self._check_penc(a, e)
        version = self.version
        p = a.patch
        path, base = p.path, p.base_path
        assert path is not None
        assert base is not None
        clone = R.Clone(e.offset, e.file_len, path, head.clone_uuid, head.clone_ctransid, base,
                        a.pos + e.unencoded_offset)
        a.pos += e.length
        if a.pos == a.size:
            self.active = None
        size = self.clone_heads.get((len(path), e.encryption is None, version))
        if size is None:
            size = self._clone_head(path, e, version, self.index)
        return clone, size + e.disk_len

    def pencoded(self, e: PEncoded, index: int) -> Pending:
        """Start regenerating the ENCODED_WRITE a PENC record (number ``index``) stands for:
        its extent is recompressed in a worker thread (a small one at once, which costs
        less than handing it over); :meth:`regenerated` gives the record."""
        a = self.active
        if a is None:
            raise StreamFormatError("PENC without a patched content")
        self._check_penc(a, e)
        clone: Applied | None = self._same_clone(
            a, e.offset, e.file_len, a.pos + e.unencoded_offset)
        if clone is None and self._written_plain(a, e):
            start = a.pos + e.unencoded_offset
            clone = self._cloned_runs(a, e.offset, start, e.file_len)
            if clone is None:
                assert a.content is not None
                clone = R.Write(a.patch.path, e.offset,
                                memoryview(a.content)[start : start + e.file_len])
        packed: Task[bytes] | bytes | None
        if clone is not None and not self.hash_clones:
            packed = None  # the CLONE is applied; nothing to recompress
        else:
            assert a.content is not None  # (only a cloned file's content goes unread)
            raw = memoryview(a.content)[a.pos : a.pos + e.length]
            if e.length < _INLINE or _WORKERS < 2:
                packed = compress_extent(raw, e.compression, e.level)
            else:
                if self.pool is None:
                    self.pool = Pool(_WORKERS, "btrdelta-penc")
                packed = self.pool.submit(compress_extent, raw, e.compression, e.level)
        a.pos += e.length
        if a.pos == a.size:
            self.active = None
        return Pending(packed, e, a.patch.path, self.version, index, clone)

    def _cloneable(self, p: Patch, old: Any) -> bool:
        """Whether the ranges of the new content of ``p`` that equal its old file's at the
        same offsets may be cloned from the parent instead of written (:meth:`_cloned_runs`):
        ``receive`` on btrfs writing the patched file's extents as data (as in
        :meth:`_written_plain`), one old file, mapped (:func:`~.oldfiles.map_old_file`
        maps only a file without holes in a read-only subvolume: what was compared is what
        is cloned, and no hole is cloned where the stream writes data)."""
        return (
            self.clone_same and not self.hash_clones and p.new_algo != NO_DIGEST
            and not p.bases and type(self.head) is R.Snapshot
            and not isinstance(old, bytes)  # (a mapping: map_old_file gives bytes otherwise)
        )

    def _cloned_runs(self, a: _Active, offset: int, start: int,
                     length: int) -> tuple[R.Write | R.Clone, ...] | None:
        """What ``receive`` applies for ``length`` bytes of a patched file's verified
        content from ``start``, written at file ``offset``, where some of them are in a
        range equal to the old file's (:attr:`_Active.same`): CLONEs of those from the
        parent between WRITEs of the rest (consecutive CLONEs are joined into one by the
        caller: a range over several extents is one FICLONERANGE); ``None`` where none
        is (a WRITE of them all)."""
        same, end = a.same, start + length
        if not same or (offset - start) % _SAME_BLOCK:
            return None
        i = a.next_same
        while i < len(same) and same[i][0] + same[i][1] <= start:
            i += 1
        a.next_same = i
        if i == len(same) or same[i][0] >= end:
            return None
        content = memoryview(a.content)  # type: ignore[arg-type]
        path, head = a.patch.path, self.head
        pieces: list[R.Write | R.Clone] = []
        pos = start
        for run, n in same[i:]:
            if run >= end:
                break
            lo, hi = max(run, pos), min(run + n, end)
            if lo > pos:
                pieces.append(R.Write(path, offset + pos - start, content[pos:lo]))
            assert a.patch.base_path is not None
            pieces.append(R.Clone(offset + lo - start, hi - lo, path, head.clone_uuid,
                                  head.clone_ctransid, a.patch.base_path, lo))
            pos = hi
        if pos < end:
            pieces.append(R.Write(path, offset + pos - start, content[pos:end]))
        return tuple(pieces)

    def _written_plain(self, a: _Active, e: PEncoded) -> bool:
        """Whether ``receive`` writes this extent of a patched file as plain data instead
        of recompressing it: on btrfs (``clone_same``, without ``hash_clones``), when the new
        content's digest was checked (the recompression's CRC check is then no check the
        content needs; ``edits`` patches have no digest and keep it). The file system
        stores the data as it stores any written data (``docs/formats/delta-stream.md``
        §6)."""
        return (
            self.clone_same and not self.hash_clones and a.patch.new_algo != NO_DIGEST
            and e.unencoded_offset + e.file_len <= e.length
        )

    def cloned_size(self, p: Pending) -> int:
        """The size the command of a :meth:`pencoded` extent left to what ``p.clone`` is
        (``packed`` is ``None``) has in the expanded stream: header and attributes, as
        encoded, and the extent's ``disk_len`` bytes."""
        e = p.penc
        head = self.clone_heads.get((len(p.path), e.encryption is None, p.version))
        if head is None:
            head = self._clone_head(p.path, e, p.version, p.index)
        return head + e.disk_len

    def _clone_head(self, path: bytes, e: PEncoded, version: int, index: int) -> int:
        """The size of the header and attributes of the ENCODED_WRITE of ``e`` on ``path``
        (as encoded: they depend only on the path's length, whether there is an encryption
        attribute and the version; cached in :attr:`clone_heads`)."""
        rec = R.EncodedWrite(path, e.offset, e.file_len, e.unencoded_len, e.unencoded_offset,
                             e.compression, b"", e.encryption)
        try:
            head = sum(map(len, encode_record(rec, version)))
        except BtrdeltaError as exc:
            raise exc.located(source=self.source, index=index) from None
        self.clone_heads[(len(path), e.encryption is None, version)] = head
        return head

    def regenerated(self, p: Pending) -> tuple[R.EncodedWrite, list[Any]]:
        """The ENCODED_WRITE of a :meth:`pencoded` record and its exact bytes, checked
        against the original command's CRC (waits for the recompression)."""
        e, path = p.penc, p.path
        try:
            assert p.packed is not None
            packed = p.packed if isinstance(p.packed, bytes) else p.packed.result()
            if len(packed) > e.disk_len:
                raise ChecksumError(
                    f"recompressed extent has {len(packed)} bytes, more than {e.disk_len}",
                    path=path,
                )
            data = packed + bytes(e.disk_len - len(packed))
            rec = (R.EncodedWrite if p.clone is None else SameEncodedWrite)(
                path, e.offset, e.file_len, e.unencoded_len, e.unencoded_offset,
                e.compression, memoryview(data), e.encryption,
            )
            if p.clone is not None:
                rec.apply = p.clone  # type: ignore[attr-defined]
            pieces = encode_record(rec, p.version)
            if CMD_HEADER.unpack_from(pieces[0])[2] != e.crc:
                raise ChecksumError(
                    "recompressed extent differs from the original (another zstd/zlib build?)",
                    path=path,
                )
        except BtrdeltaError as exc:
            raise exc.located(source=self.source, index=p.index) from None
        return rec, pieces

    def close(self) -> None:
        """Stop the recompression threads (queued work is cancelled, running work ends) and
        close the cached directory."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        self.checks.close()
        self.dirs.close()


def _check_old(p: Patch, old: bytes | mmap.mmap) -> None:
    """Raise the old-file error of a patch that failed if its old content is not the one
    the patch was made against (the old files of a patch with BASES were checked before;
    a format-10 short patch names no old digest, only its new content's)."""
    if p.bases or p.hash_algo == NO_DIGEST:
        return
    actual = digest(p.hash_algo, old)
    if actual != p.old_digest:
        raise ChecksumError(
            "old file differs from the one the patch was made against",
            expected=p.old_digest.hex(), actual=actual.hex(), path=p.base_path,
        )
