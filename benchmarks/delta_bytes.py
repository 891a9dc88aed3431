"""Where the bytes of a delta stream go: ``python -m benchmarks.delta_bytes DELTA``.

Not a benchmark (no peer): an accounting used to decide what to make smaller. The top-level
records are counted as they are (framing, ZCMDS attributes, DEND); the carrier is inflated
and its records are classified (btrfs command number, delta record); since zstd compresses
them together, each class's share is measured as the *marginal* cost: the carrier's
content compressed again (the writer's zstd parameters, one piece) with that class left out,
subtracted from the whole compressed the same way. Times, paths and patch bytes are also
measured as parts of their records (UTIMES without its times TLV, CPATCH without its
patch bytes, ...).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import zstandard

from btrdelta.delta.format import DCmd, ZCommands
from btrdelta.delta.parser import iter_items
from btrdelta.delta.writer import CARRIER_TABLE_LOG, DEFAULT_WINDOW_LOG
from btrdelta.stream.constants import CMD_HEADER, CMD_HEADER_SIZE, Cmd


def _zsize(data: bytes) -> int:
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=DEFAULT_WINDOW_LOG, enable_ldm=True, chain_log=CARRIER_TABLE_LOG,
        hash_log=CARRIER_TABLE_LOG)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return len(cobj.compress(data) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))


def _name(cmd: int) -> str:
    try:
        return Cmd(cmd).name if cmd < 200 else DCmd(cmd).name
    except ValueError:
        return str(cmd)


Record = tuple[int, bytes]  # (command number, whole record)
Part = Callable[[int, bytes], bytes]  # a record -> what is kept of it


def _records(raw: bytes) -> list[Record]:
    out = []
    pos = 0
    while pos < len(raw):
        length, cmd, _ = CMD_HEADER.unpack_from(raw, pos)
        end = pos + CMD_HEADER_SIZE + length
        out.append((cmd, raw[pos:end]))
        pos = end
    return out


def _without(recs: list[Record], keep: Part) -> bytes:
    return b"".join(keep(c, r) for c, r in recs)


def _utimes_no_times(cmd: int, r: bytes) -> bytes:
    if cmd != Cmd.UTIMES:
        return r
    # header, first TLV (path or marker): drop the rest
    n = int.from_bytes(r[12:14], "little")
    return r[: CMD_HEADER_SIZE + 4 + n]


def _no_headers(cmd: int, r: bytes) -> bytes:
    return r[CMD_HEADER_SIZE:]


def _cpatch_no_data(cmd: int, r: bytes) -> bytes:
    return r if cmd != DCmd.CPATCH else r[: CMD_HEADER_SIZE + 5]


def account(path: Path) -> list[str]:
    """The accounting of the (zstd-carrier) delta at ``path``, as printable lines."""
    data = path.read_bytes()
    zparts = []
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    raw = bytearray()
    with open(path, "rb") as f:
        for item in iter_items(f.read):
            if type(item) is ZCommands:
                zparts.append(len(item.zdata))
                raw += dctx.decompress(bytes(item.zdata))
    carrier = sum(zparts)
    lines = [f"{path}: {len(data):,} B; carrier {carrier:,} B compressed in {len(zparts)} "
             f"ZCMDS, {len(raw):,} B raw; framing, ZCMDS attributes, STREAM, DEND "
             f"{len(data) - carrier:,} B"]
    recs = _records(bytes(raw))
    whole = _zsize(bytes(raw))
    lines.append(f"carrier recompressed as one piece: {whole:,} B")
    by_cmd: dict[str, list[Record]] = defaultdict(list)
    for c, r in recs:
        by_cmd[_name(c)].append((c, r))
    lines.append(f"{'class':<28}{'count':>7}{'raw B':>9}{'alone z':>9}{'marginal':>9}")
    for name, rs in sorted(by_cmd.items(), key=lambda kv: -sum(len(r) for _, r in kv[1])):
        alone = _zsize(b"".join(r for _, r in rs))
        marg = whole - _zsize(_without([x for x in recs if _name(x[0]) != name],
                                       lambda c, r: r))
        lines.append(f"{name:<28}{len(rs):>7}{sum(len(r) for _, r in rs):>9}{alone:>9}"
                     f"{marg:>9}")
    for label, keep in (("UTIMES times TLVs", _utimes_no_times),
                        ("record headers (10 B each)", _no_headers),
                        ("CPATCH patch bytes", _cpatch_no_data)):
        lines.append(f"{label:<44}{'':>9}{whole - _zsize(_without(recs, keep)):>9}")
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for line in account(Path(arg)):
            print(line)
