"""The seed scan of ``image clone`` (:mod:`btrdelta.chunk.seed`) on a large seed."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from btrdelta.chunk.chunker import ChunkerParams, chunk_digest, iter_chunks

_SCAN = """
import json, sys
from btrdelta.chunk.chunker import ChunkerParams, FastCdcChunking
from btrdelta.chunk.seed import scan_seeds
wanted = {bytes.fromhex(h) for h in json.loads(sys.argv[2])}
found = scan_seeds([sys.argv[1]], FastCdcChunking(ChunkerParams.from_avg(64 << 10)), wanted)
status = open("/proc/self/status").read()
peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak << 10,
                  "where": {d.hex(): list(w) for d, w in sorted(found.where.items())}}))
"""


def test_seed_scan_keeps_a_bounded_resident_set(tmp_path: Path) -> None:
    """The pages of a seed behind the scan are unmapped as it goes: the peak RSS of the
    scan of a 384 MiB seed stays far below the seed (it was the seed and more: every page
    stayed mapped until the scan's end; a 2 GB ext4 image of a Debian root as the seed of
    ``image clone``: 2,032 MB, session 23). A sparse seed: its page cache is made of zeros,
    nothing written to disk; what it finds is what cutting its bytes finds."""
    head = random.Random(7).randbytes(1 << 20)
    seed = tmp_path / "seed.img"
    with open(seed, "wb") as f:
        f.truncate(384 << 20)
        f.write(head)
    params = ChunkerParams.from_avg(64 << 10)
    _, first = next(iter_chunks(head, params))
    wanted = {chunk_digest(first), chunk_digest(bytes(params.max_size))}
    proc = subprocess.run(
        [sys.executable, "-c", _SCAN, str(seed), json.dumps(sorted(w.hex() for w in wanted))],
        capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    assert out["peak"] < 200 << 20, f"peak RSS {out['peak'] >> 20} MiB for a 384 MiB seed"
    assert out["where"][chunk_digest(first).hex()] == [0, 0]
    zero = out["where"][chunk_digest(bytes(params.max_size)).hex()]
    assert zero[0] == 0
    assert zero[1] >= len(head) - params.max_size
