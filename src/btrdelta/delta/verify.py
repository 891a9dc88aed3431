"""``delta make`` checks its own output before it reports success.

The bytes ``delta make`` writes are fed, as they are written, to one of two checks:

* :class:`OutputCheck` (the default, cheap): the delta stream is parsed (every record's
  CRC32C), the carrier inflated (its CRC32C) and its commands unfolded exactly as the
  expansion unfolds them, every PATCH held to the rule the expansion enforces
  (:func:`~.format.patch_refusal`), its PDATA and the PWRITE / PENC records after it held
  to its lengths, and the commands and bytes the expansion will produce counted: they must
  be what ``DEND`` says and what ``delta make`` read. Patches are not applied (``delta make``
  applied each one when it made it) and nothing is hashed, so it costs an inflation of the
  carrier.
* :class:`FullCheck` (``--verify``): the whole expansion, in a thread, against the old
  tree, ending with the check of the ``DEND`` count, size and BLAKE3 digest.

Either raises :class:`~btrdelta.errors.BtrdeltaError` at :meth:`finish` (or as soon as the
problem is seen), saying that the delta made does not expand: a bug, never a delta to
publish. Owns nothing of the format: the parser, the carrier reader and the expansion are
the ones the device runs.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

from ..errors import BtrdeltaError, StreamFormatError
from ..fs.sandbox import list_dir
from ..stream import records as R
from ..stream.codec import encode_record
from ..stream.constants import CMD_HEADER_SIZE, STREAM_HEADER_SIZE
from .format import (
    SAME_CODEC,
    BtrfsCommand,
    DeltaEnd,
    DeltaItem,
    Patch,
    PatchData,
    PEncoded,
    PWrite,
    StreamStart,
    ZCommands,
    patch_refusal,
)
from .parser import EOF, NEED_DATA, DeltaParser
from .unpack import CarrierReader

__all__ = ["FullCheck", "OutputCheck", "failed"]

_SOURCE = "delta make output"


def failed(exc: BtrdeltaError) -> BtrdeltaError:
    """The error ``delta make`` raises when its own output does not check out."""
    return BtrdeltaError(
        f"the delta stream made does not expand ({exc}): a bug in btrdelta delta make; "
        "do not use this output"
    )


def _write_size(path_len: int, n: int, version: int) -> int:
    """Bytes of a WRITE command of ``n`` data bytes (PATH, FILE_OFFSET, DATA)."""
    data = 4 + n if version < 2 else 2 + n
    return CMD_HEADER_SIZE + 4 + path_len + 4 + 8 + data


class OutputCheck:
    """The cheap check (see the module docstring): :meth:`feed` it every byte written,
    then :meth:`finish`."""

    def __init__(self, old_root: str | os.PathLike[str]) -> None:
        self.parser = DeltaParser(source=_SOURCE)
        root = old_root
        self.carrier = CarrierReader(lambda path: list_dir(root, path))
        self.version = 0
        #: commands and bytes the expansion will produce
        self.count = 0
        self.size = 0
        #: the patch being used: its path, PDATA bytes and new-content bytes still due
        self.path = b""
        self.pdata_left = 0
        self.content_left = 0
        self.end: DeltaEnd | None = None

    def feed(self, data: Any) -> None:
        """The next bytes written (copied: the writer may reuse its buffers)."""
        if not len(data):
            return
        self.parser.feed(bytes(data))
        self._pull()

    def _pull(self) -> None:
        while True:
            item = self.parser.next_item()
            if item is NEED_DATA or item is EOF:
                return
            try:
                self._item(item, False)
            except BtrdeltaError as exc:
                raise exc.located(source=_SOURCE, index=self.parser.index) from None

    def _item(self, item: DeltaItem, inner: bool) -> None:
        cls = type(item)
        if cls is BtrfsCommand:
            self.count += 1
            self.size += len(item.raw)  # type: ignore[union-attr]
        elif cls is ZCommands and not inner:
            carrier = self.carrier
            for sub in carrier.split(carrier.inflate(item), self.version,  # type: ignore[arg-type]
                                     grouped=True):
                self._group()
                if sub is not None:  # None: the group is full (taken above)
                    self._item(sub, True)
            self._group()
        elif cls is Patch:
            self._patch(item)  # type: ignore[arg-type]
        elif cls is PatchData:
            self.pdata_left -= len(item.data)  # type: ignore[union-attr,arg-type]
            if self.pdata_left < 0:
                raise StreamFormatError("PDATA longer than the patch length")
        elif cls is PWrite:
            self._pwrite(item.offset, item.length, item.chunk)  # type: ignore[union-attr]
        elif cls is PEncoded:
            self._penc(item)  # type: ignore[arg-type]
        elif cls is StreamStart and not inner:
            self._idle("STREAM")
            self.version = item.version  # type: ignore[union-attr]
            self.size += STREAM_HEADER_SIZE
        elif cls is DeltaEnd and not inner:
            self._idle("DEND")
            self.end = item  # type: ignore[assignment]
        else:
            raise StreamFormatError(f"unexpected {cls.__name__} record")

    def _group(self) -> None:
        n, raw = self.carrier.take_group()
        self.count += n
        self.size += len(raw)

    def _idle(self, what: str) -> None:
        if self.pdata_left or self.content_left:
            raise StreamFormatError(f"{what} while a patch is not used up")

    def _patch(self, p: Patch) -> None:
        self._idle("PATCH")
        state = self.carrier.state
        path = p.path if p.path is not None else state.last_path
        if path is None:
            raise StreamFormatError("PATCH refers to a previous path: there is none")
        state.last_path = self.path = path
        refusal = patch_refusal(p.codec, p.patch_len, p.old_size, p.new_size)
        if refusal is not None:
            raise StreamFormatError(refusal)
        self.pdata_left = p.patch_len if p.data is None and p.codec != SAME_CODEC else 0
        self.content_left = p.new_size
        if p.auto_chunk:
            self._pwrite(0, p.new_size, p.auto_chunk)

    def _take(self, n: int, what: str) -> None:
        if self.pdata_left:
            raise StreamFormatError(f"{what} before the patch's PDATA")
        if n <= 0 or n > self.content_left:
            raise StreamFormatError(f"{what} runs past the patched content")
        self.content_left -= n

    def _pwrite(self, offset: int, length: int, chunk: int) -> None:
        self._take(length, "PWRITE")
        if chunk <= 0 or (self.version == 1 and chunk > 0xFFFF):
            raise StreamFormatError(f"PWRITE chunk {chunk} is invalid")
        full, last = divmod(length, chunk)
        self.count += full + (last > 0)
        self.size += full * _write_size(len(self.path), chunk, self.version)
        if last:
            self.size += _write_size(len(self.path), last, self.version)

    def _penc(self, e: PEncoded) -> None:
        self._take(e.length, "PENC")
        rec = R.EncodedWrite(self.path, e.offset, e.file_len, e.unencoded_len,
                             e.unencoded_offset, e.compression, b"", e.encryption)
        self.count += 1
        self.size += sum(len(p) for p in encode_record(rec, self.version)) + e.disk_len

    def finish(self, commands: int, size: int) -> None:
        """The end: the output must be complete and expand to ``commands`` commands of
        ``size`` bytes (what ``delta make`` read)."""
        self.parser.feed(b"")
        self._pull()
        end = self.end
        if end is None:
            raise StreamFormatError("no DEND record", source=_SOURCE)
        if (end.count, end.size) != (commands, size) or (self.count, self.size) != (
            commands, size
        ):
            raise StreamFormatError(
                f"the stream read has {commands} commands / {size} bytes, DEND says "
                f"{end.count} / {end.size}, the records expand to {self.count} / {self.size}",
                source=_SOURCE,
            )


class _Pipe:
    """Bytes handed from ``delta make``'s writer to the thread expanding them (a file-like
    ``read``): at most ``limit`` bytes wait; nothing waits once the reader stopped."""

    def __init__(self, limit: int = 16 << 20) -> None:
        self.limit = limit
        self.pieces: deque[bytes] = deque()
        self.held = 0
        self.closed = False
        self.stopped = False
        self.cond = threading.Condition()

    def put(self, data: Any) -> None:
        with self.cond:
            while self.held >= self.limit and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return
            self.pieces.append(bytes(data))
            self.held += len(data)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self.cond:
            while not self.pieces and not self.closed:
                self.cond.wait()
            if not self.pieces:
                return b""
            piece = self.pieces.popleft()
            if 0 <= n < len(piece):
                self.pieces.appendleft(piece[n:])
                piece = piece[:n]
            self.held -= len(piece)
            self.cond.notify_all()
            return piece


class FullCheck:
    """``--verify``: the output expanded in a thread against the old tree as it is
    written (:meth:`feed`), and the result of that expansion at :meth:`finish`."""

    def __init__(self, old_root: str | os.PathLike[str], max_file_size: int) -> None:
        self.pipe = _Pipe()
        self.error: BaseException | None = None
        self.expanded = 0
        self.thread = threading.Thread(
            target=self._run, args=(old_root, max_file_size), name="btrdelta-verify",
            daemon=True,
        )
        self.thread.start()

    def _run(self, old_root: str | os.PathLike[str], max_file_size: int) -> None:
        from .expand import expand_to, open_delta

        try:
            self.expanded = expand_to(
                open_delta(self.pipe, source=_SOURCE),  # type: ignore[arg-type]
                old_root, lambda _data: None, max_file_size=max_file_size, source=_SOURCE,
            )
        except BaseException as exc:  # reported by finish
            self.error = exc
        finally:
            self.pipe.stop()

    def feed(self, data: Any) -> None:
        """The next bytes written."""
        if len(data):
            self.pipe.put(data)

    def finish(self, commands: int, size: int) -> None:
        """Wait for the expansion; it must have checked ``DEND`` (whose count, size and
        digest are those of the stream read) and produced ``size`` bytes."""
        self.pipe.close()
        self.thread.join()
        if self.error is not None:
            if isinstance(self.error, BtrdeltaError):
                raise self.error
            raise StreamFormatError(f"expansion failed: {self.error!r}",
                                    source=_SOURCE) from self.error
        if self.expanded != size:
            raise StreamFormatError(
                f"expands to {self.expanded} bytes, the stream read has {size}",
                source=_SOURCE,
            )

    def abort(self) -> None:
        """Stop the expansion thread (``delta make`` failed anyway)."""
        self.pipe.close()
        self.pipe.stop()
        self.thread.join()
