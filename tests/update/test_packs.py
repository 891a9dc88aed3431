"""``repo add``'s packing of a release's full stream (:func:`btrdelta.update.packs.pack_stream`)
on a large stream: its resident set stays bounded."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

_PACK = """
import json, sys
from pathlib import Path
from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.update.packs import pack_stream
repo = Path(sys.argv[2])
(repo / "packs").mkdir(parents=True)
chunk_map = {}
res = pack_stream(Path(sys.argv[1]), repo, repo, params=ChunkerParams.from_avg(64 << 10),
                  level=1, chunk_map=chunk_map, packs=[])
status = open("/proc/self/status").read()
peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak << 10, "size": res.stream_size, "chunks": res.chunks,
                  "new": res.new_chunks}))
"""


def test_packing_a_large_stream_keeps_a_bounded_resident_set(tmp_path: Path) -> None:
    """The stream's pages behind the chunks still being compressed are unmapped as the
    packing goes: its peak RSS for a 384 MiB stream stays far below it (it was the stream
    and more: ``repo add`` of a 1.2 GB Debian root peaked at 1,174 MB, session 23). A
    sparse stream: its pages are zeros of the page cache, nothing written to disk; 16 MiB
    of random data at its start, the rest one repeated chunk."""
    stream = tmp_path / "full.stream"
    head = random.Random(5).randbytes(16 << 20)
    with open(stream, "wb") as f:
        f.truncate(384 << 20)
        f.write(head)
    proc = subprocess.run([sys.executable, "-c", _PACK, str(stream), str(tmp_path / "repo")],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["size"] == 384 << 20
    assert out["new"] < out["chunks"]  # (the zeros: one chunk, stored once)
    assert out["peak"] < 200 << 20, f"peak RSS {out['peak'] >> 20} MiB for a 384 MiB stream"
