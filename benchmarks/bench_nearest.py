"""``delta make``'s old-file index (:mod:`btrdelta.delta.nearest`) on a tree of 100k files.

Issue 12: finding the nearest old file must take bounded time and memory on trees of 100k
files. The old tree here is made for the run (``BTRDELTA_BENCH_NEAREST_FILES`` files, default
100,000, in directories of 100, under /var/tmp, removed after): most files small (64 B to
4 KiB, as in a root file system), one in ten from 4 KiB to 96 KiB (the ones sketched);
seven in ten are libraries with hash suffixes, the others modules of Python packages in
versioned directories (10k old files named ``core.py`` at 100k files). The queries are what
an update sends as new files: 1,000 old files renamed (another hash suffix, another version
of their directory; found by name), and 1,000 copies of old files with a few bytes changed
under unrelated names (found by content only).

Measured in a fresh interpreter (its peak RSS is the index's, the interpreter's floor
printed apart): the name index (one walk of the tree), the sketches (first content lookup),
lookups per second, and how often the file a query was made from comes first (the oracle:
we made it). The peer is the walk and read of the same bytes by coreutils, measured in the
same run (page cache warm for both): ``find -type f`` for the walk, ``head -c 256K`` of
every file the index sketches (``find -size +4k -exec head``) for the sketches.

Run: ``.venv/bin/python -m benchmarks nearest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILES = int(os.environ.get("BTRDELTA_BENCH_NEAREST_FILES", "100000"))
QUERIES = 1000
PER_DIR = 100

_CHILD = r"""
import json, os, random, resource, sys, time
from btrdelta.delta.nearest import OldIndex
root = sys.argv[1]
with open(sys.argv[2]) as f:
    queries = json.load(f)
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
index = OldIndex(root, 256 << 20)
t = time.perf_counter()
index.by_name(b"warm", 1)
t_names = time.perf_counter() - t
rss_names = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rnd = random.Random(1)
def edited(path):
    data = bytearray(open(os.path.join(root, path), "rb").read())
    for _ in range(4):
        data[rnd.randrange(len(data))] ^= 0x5A
    return bytes(data)
first = edited(queries["content"][0][1])
t = time.perf_counter()
index.by_content(first)
t_sketch = time.perf_counter() - t
rss_index = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
del first
contents = [(edited(origin), origin) for _, origin in queries["content"]]
t = time.perf_counter()
hits_c = sum(index.by_content(d, limit=1)[:1] == [o.encode()] for d, o in contents)
t_content = time.perf_counter() - t
t = time.perf_counter()
hits_n = sum(
    [p for p, _ in index.by_name(new.encode(), size)[:1]] == [origin.encode()]
    for new, origin, size in queries["name"]
)
t_name = time.perf_counter() - t
print(json.dumps({
    "floor": floor, "rss_names": rss_names, "rss": rss_index,
    "t_names": t_names, "t_sketch": t_sketch, "t_content": t_content, "t_name": t_name,
    "hits_content": hits_c, "hits_name": hits_n, "files": len(index.paths),
    "sketched_pairs": len(index._pairs),
}))
"""


def _stem(rnd: random.Random) -> str:
    """Letters past ``f`` only: :func:`~btrdelta.delta.nearest.name_key` keeps them."""
    return "".join(chr(ord("g") + rnd.randrange(20)) for _ in range(8))


def _paths(rnd: random.Random, i: int, pkgs: dict[int, str]) -> tuple[str, str]:
    """(old path of file ``i``, its path after an update). Seven in ten are libraries
    renamed with another hash suffix in their directory; the others are modules of Python
    packages (``__init__.py``, ``core.py``, ``util.py``: 10k old files share each name at
    100k files) whose versioned directory is renamed."""
    if i % 10 < 7:
        stem, major = _stem(rnd), rnd.randrange(1, 9)
        d = f"usr/lib/d{i // PER_DIR:04d}"
        return (f"{d}/lib{stem}-{rnd.getrandbits(32):08x}.so.{major}",
                f"{d}/lib{stem}-{rnd.getrandbits(32):08x}.so.{major}")
    pkg = i // 30 * 3 + i % 3  # three modules a package
    stem = pkgs.setdefault(pkg, _stem(rnd))
    name = ("__init__.py", "core.py", "util.py")[i // 10 % 3]
    d = "usr/lib/python3/dist-packages"
    return f"{d}/{stem}-1.{pkg % 9}/{name}", f"{d}/{stem}-1.{pkg % 9 + 1}/{name}"


def _make_tree(root: Path) -> tuple[dict[str, list[list[object]]], int, int]:
    """The old tree; the queries; (sketchable files, their bytes)."""
    rnd = random.Random(12)
    pkgs: dict[int, str] = {}
    renamed: list[list[object]] = []
    sketchable: list[str] = []
    sketch_bytes = 0
    for i in range(FILES):
        rel, new_rel = _paths(rnd, i, pkgs)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        big = rnd.random() < 0.1
        size = int(4096 * 24 ** rnd.random()) if big else int(64 * 64 ** rnd.random())
        path.write_bytes(rnd.randbytes(size))
        if big:
            sketchable.append(rel)
            sketch_bytes += min(size, 256 << 10)
        if len(renamed) < QUERIES and rnd.random() < 0.05:
            renamed.append([new_rel, rel, size])
    content: list[list[object]] = [[f"opt/unrelated/blob{k}.bin", p]
               for k, p in enumerate(rnd.sample(sketchable, min(QUERIES, len(sketchable))))]
    return {"name": renamed, "content": content}, len(sketchable), sketch_bytes


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def run() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-nearest-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "old"
        t = time.perf_counter()
        queries, n_sketch, sketch_bytes = _make_tree(root)
        made = time.perf_counter() - t
        t_find = _wall(["find", str(root), "-type", "f"])
        t_head = _wall(["find", str(root), "-type", "f", "-size", "+4k", "-exec", "head",
                        "-q", "-c", "256K", "{}", "+"])
        qfile = Path(tmp) / "queries.json"
        qfile.write_text(json.dumps(queries))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(qfile)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        shutil.rmtree(root)
    mib = 1 << 20
    nq, cq = len(queries["name"]), len(queries["content"])
    return [
        f"old tree: {r['files']:,} files ({n_sketch:,} of 4-96 KiB: "
        f"{sketch_bytes / mib:.0f} MiB to sketch), made in {made:.0f} s",
        f"name index (one walk): {r['t_names']:.2f} s vs find -type f {t_find:.2f} s "
        f"({r['t_names'] / t_find:.1f}x); RSS {r['rss_names'] / mib:.0f} MiB "
        f"(interpreter floor {r['floor'] / mib:.0f} MiB)",
        f"sketches ({r['sketched_pairs']:,} hashes): {r['t_sketch']:.2f} s vs head -c 256K "
        f"of the same files {t_head:.2f} s ({r['t_sketch'] / t_head:.1f}x); "
        f"peak RSS {r['rss'] / mib:.0f} MiB",
        f"lookups: by name {nq / r['t_name']:,.0f}/s, the origin first for "
        f"{r['hits_name']}/{nq} renamed files; by content {cq / r['t_content']:,.0f}/s, "
        f"the origin first for {r['hits_content']}/{cq} edited copies",
    ]


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
