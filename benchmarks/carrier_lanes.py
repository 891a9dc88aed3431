"""The xz carrier as one LZMA2 encoder or as two by content class:
``python -m benchmarks.carrier_lanes DELTA`` (a delta with a zstd carrier, e.g.
``delta make --carrier zstd --level 1``).

Not a benchmark (no peer): a measurement used to decide how the xz carrier could use two
cores (issue 12, ``docs/formats/delta-stream.md`` §7.10). The carrier is inflated and its
records are put in order into pieces as :class:`btrdelta.delta.writer.DeltaWriter` cuts
them (a piece ends after the record that takes it to 1 MiB); each piece goes through the
x86 converter where the writer would convert it, and is compressed up to a sync flush as
:mod:`btrdelta.delta.lanes` does (LZMA2 ``-9``, no ``-e``):

* **one encoder** over every piece, 48 MiB dictionary (the xz carrier of format 8);
* **two lanes**, each its own LZMA2 stream with no priming, on two threads at once: lane 1
  the WRITE records of ELF files (a file whose WRITE at offset 0 starts with ``\\x7fELF``),
  lane 0 everything else; a piece also ends where the next record goes to the other lane,
  so that the pieces in their order are the records in stream order (a reader would feed
  each piece to its lane's decoder).

Prints bytes, pieces, CPU seconds of each encoder (``time.thread_time``) and the wall time
of the two lanes.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from pathlib import Path

import zstandard

from btrdelta.delta import bcj
from btrdelta.delta.format import ZCommands
from btrdelta.delta.lzma2 import Lzma2Encoder
from btrdelta.delta.parser import iter_items
from btrdelta.delta.writer import XZ_DICT, ZCMDS_TARGET
from btrdelta.stream.constants import CMD_HEADER, CMD_HEADER_SIZE, Attr, Cmd

_TLV = struct.Struct("<HH")
_ELF = b"\x7fELF"

Piece = tuple[int, bytes]  # (lane, carried records)


def _carrier(path: Path) -> bytes:
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    raw = bytearray()
    with open(path, "rb") as f:
        for item in iter_items(f.read):
            if type(item) is ZCommands:
                raw += dctx.decompress(bytes(item.zdata))
    return bytes(raw)


def _write_attrs(rec: bytes) -> tuple[int, bytes]:
    """FILE_OFFSET and the first bytes of DATA of a carried WRITE."""
    pos, offset, data = CMD_HEADER_SIZE, -1, b""
    while pos + 4 <= len(rec):
        kind, n = _TLV.unpack_from(rec, pos)
        pos += 4
        if kind == Attr.FILE_OFFSET:
            offset = int.from_bytes(rec[pos : pos + n], "little")
        elif kind == Attr.DATA:
            data = rec[pos : pos + 4]
        pos += n
    return offset, data


def pieces(raw: bytes, lanes: bool) -> list[Piece]:
    """The carrier's records cut into pieces (with ``lanes``: also where the lane changes)."""
    out: list[Piece] = []
    cur = bytearray()
    cur_lane = 0
    elf = False
    pos = 0
    while pos < len(raw):
        length, cmd, _ = CMD_HEADER.unpack_from(raw, pos)
        end = pos + CMD_HEADER_SIZE + length
        rec = raw[pos:end]
        pos = end
        lane = 0
        if cmd == Cmd.WRITE:
            offset, head = _write_attrs(rec)
            if offset == 0:
                elf = head == _ELF
            lane = int(elf and lanes)
        if lane != cur_lane and cur:
            out.append((cur_lane, bytes(cur)))
            cur = bytearray()
        cur_lane = lane
        cur += rec
        if len(cur) >= ZCMDS_TARGET:
            out.append((cur_lane, bytes(cur)))
            cur = bytearray()
    if cur:
        out.append((cur_lane, bytes(cur)))
    return out


def encode(chunks: list[bytes], dict_size: int) -> tuple[int, float]:
    """(compressed bytes, CPU seconds) of one LZMA2 encoder over ``chunks``."""
    t0 = time.thread_time()
    enc = Lzma2Encoder(dict_size, preset=9, extreme=False)
    total = base = 0
    for chunk in chunks:
        conv = bytearray(chunk)
        data: bytes | bytearray = conv if bcj.worth_it(chunk, bcj.encode(conv, base)) else chunk
        base += len(chunk)
        total += len(enc.compress(data) + enc.flush())
    enc.close()
    return total, time.thread_time() - t0


def measure(path: Path) -> list[str]:
    raw = _carrier(path)
    one = [p for _, p in pieces(raw, lanes=False)]
    size, cpu = encode(one, XZ_DICT)
    lines = [f"{path}: carrier {len(raw):,} B raw",
             f"one encoder: {size:,} B, {len(one)} pieces, {cpu:.1f} CPU s"]
    cut = pieces(raw, lanes=True)
    got: dict[int, tuple[int, float]] = {}
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(
        k, encode([p for lane, p in cut if lane == k], XZ_DICT))) for k in (0, 1)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    for k in (0, 1):
        n = sum(len(p) for lane, p in cut if lane == k)
        lines.append(f"lane {k}: {n:,} B raw -> {got[k][0]:,} B, "
                     f"{sum(1 for lane, _ in cut if lane == k)} pieces, {got[k][1]:.1f} CPU s")
    both = got[0][0] + got[1][0]
    longer = max(cpu for _, cpu in got.values())
    lines.append(f"two lanes: {both:,} B ({both / size - 1:+.2%}), "
                 f"{got[0][1] + got[1][1]:.1f} CPU s, longer lane {longer:.1f} CPU s, "
                 f"wall {wall:.1f} s")
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for line in measure(Path(arg)):
            print(line, flush=True)
