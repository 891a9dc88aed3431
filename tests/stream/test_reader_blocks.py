"""StreamReader reuses a read block only when no record still holds a view into it."""

from __future__ import annotations

import io
import os
from uuid import UUID

from btrdelta.stream import StreamReader, write_stream
from btrdelta.stream.records import End, Mkfile, Subvol, Write


def _stream(chunks: list[bytes]) -> bytes:
    out = io.BytesIO()
    recs = [Subvol(path=b"s", uuid=UUID(int=1), ctransid=1), Mkfile(path=b"f", ino=257)]
    recs += [Write(path=b"f", offset=i * 3000, data=c) for i, c in enumerate(chunks)]
    write_stream([*recs, End()], out.write)
    return out.getvalue()


def test_kept_records_survive_block_reuse() -> None:
    chunks = [os.urandom(3000) for _ in range(3000)]  # ~9 MB in 64 KiB blocks
    reader = StreamReader(io.BytesIO(_stream(chunks)), block_size=64 << 10)
    handed_out: list[int] = []
    take = reader._buffer

    def spy(size: int) -> bytearray:
        buf = take(size)
        handed_out.append(id(buf))
        return buf

    reader._buffer = spy  # type: ignore[method-assign]
    kept = {}
    for rec in reader:
        if isinstance(rec, Write) and rec.offset % 300_000 == 0:  # pin a few blocks
            kept[rec.offset // 3000] = rec
    # blocks were reused (the test can tell), and no kept record saw its bytes overwritten
    assert len(set(handed_out)) < len(handed_out) // 4
    assert all(bytes(rec.data) == chunks[i] for i, rec in kept.items())
