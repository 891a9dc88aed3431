"""Chunked-image benchmark: chunking speed, compress time, clone bytes vs casync, export reads.

Builds two ext4 images with ``mkfs.ext4 -d`` from a real tree of this machine (v1) and a
modified copy (v2: files changed, added, removed), cached under ``benchmarks/.cache/``.
``run()`` returns result lines; casync (Debian) is measured in the same run with the same
average chunk size.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CACHE = Path(__file__).parent / ".cache" / "chunk"
SOURCE = "/usr/lib/python3.11"
AVG = 64 << 10


def _images() -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.chunk.images import make_ext4

    CACHE.mkdir(parents=True, exist_ok=True)
    img1, img2 = CACHE / "v1.ext4", CACHE / "v2.ext4"
    if img1.exists() and img2.exists():
        return img1, img2
    t1, t2 = CACHE / "tree1", CACHE / "tree2"
    shutil.rmtree(t1, ignore_errors=True)
    shutil.rmtree(t2, ignore_errors=True)
    shutil.copytree(SOURCE, t1, symlinks=True, ignore=shutil.ignore_patterns("site-packages"))
    shutil.copytree(t1, t2, symlinks=True)
    files = sorted(glob.glob(str(t2 / "**" / "*.py"), recursive=True))
    for i, f in enumerate(files[::40]):  # ~2.5% of modules change
        with open(f, "a") as fh:
            fh.write(f"\n# v2 change {i}\n")
    for d in ("idlelib", "tkinter"):
        shutil.rmtree(t2 / d, ignore_errors=True)
    shutil.copytree("/usr/share/doc", t2 / "added-doc", symlinks=True, dirs_exist_ok=True,
                    ignore_dangling_symlinks=True)
    make_ext4(t1, img1, "400M")
    make_ext4(t2, img2, "400M")
    return img1, img2


def run() -> list[str]:
    """Run the benchmark; returns lines of results."""
    from btrdelta.chunk.chunker import ChunkerParams, chunk_digest, iter_chunks, map_file
    from btrdelta.chunk.clone import HttpSource, clone
    from btrdelta.chunk.compress import compress_image
    from btrdelta.chunk.nbd import NbdServer
    from btrdelta.chunk.store import ChunkStore, ImageReader
    from btrdelta.transport.http import RangeFetcher
    from btrdelta.transport.server import StaticServer

    out: list[str] = []
    img1, img2 = _images()
    size = img2.stat().st_size
    params = ChunkerParams.from_avg(AVG)
    with map_file(img2) as view:
        t = time.perf_counter()
        n = 0
        data = memoryview(b"")
        for _, data in iter_chunks(view, params):
            chunk_digest(data)
            n += 1
        dt = time.perf_counter() - t
        del data
    out.append(f"chunk+hash (1 core): {size / dt / 1e9:.2f} GB/s over {size >> 20} MiB, "
               f"{n} chunks")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        for img, name in ((img1, "v1.cba"), (img2, "v2.cba")):
            t = time.perf_counter()
            with open(www / name, "wb") as f:
                rep = compress_image(img, f, params=params)
            dt = time.perf_counter() - t
            out.append(f"compress {name}: {dt:.2f} s ({size / dt / 1e6:.0f} MB/s), "
                       f"archive {rep.archive_size >> 20} MiB")
        store = ChunkStore(Path(tmp) / "store")
        server = StaticServer(www)
        with server.running():
            for name in ("v1", "v2"):
                before = server.bytes_served
                url = f"{server.url}/{name}.cba"
                src = HttpSource(url, RangeFetcher(url))
                t = time.perf_counter()
                rep2 = clone(src, store, name)
                dt = time.perf_counter() - t
                src.close()
                served = server.bytes_served - before
            needed = rep2.fetch_bytes + rep2.index_bytes
            out.append(f"clone v2 over HTTP with v1 in store: {served} bytes in {rep2.requests} "
                       f"requests, {dt:.2f} s (needed chunks {rep2.fetch_bytes} + index "
                       f"{rep2.index_bytes}: ratio {served / needed:.3f})")
        cas = Path(tmp) / "casync"
        if shutil.which("casync"):
            cas.mkdir()
            for name, img in (("v1", img1), ("v2", img2)):
                subprocess.run(["casync", "make", f"--store={cas}/{name}.castr",
                                f"--chunk-size={AVG}", str(cas / f"{name}.caibx"), str(img)],
                               check=True, capture_output=True)
            def chunks(store_dir: Path) -> dict[str, int]:
                return {os.path.basename(p): os.path.getsize(p)
                        for p in glob.glob(str(store_dir / "*" / "*.cacnk"))}
            c1, c2 = chunks(cas / "v1.castr"), chunks(cas / "v2.castr")
            cas_bytes = sum(s for k, s in c2.items() if k not in c1)
            cas_bytes += (cas / "v2.caibx").stat().st_size
            out.append(f"casync (same avg chunk): v2 needs {cas_bytes} bytes; btrdelta/casync = "
                       f"{served / cas_bytes:.3f}")
        _, index = store.read_description("v2")
        reader = ImageReader(store, index)
        nbd = NbdServer(reader, "v2", "127.0.0.1:0")
        th = threading.Thread(target=nbd.serve_forever, daemon=True)
        th.start()
        t = time.perf_counter()
        subprocess.run(["nbdcopy", nbd.uri, "null:"], check=True)
        dt = time.perf_counter() - t
        nbd.shutdown()
        th.join()
        nbd.server_close()
        out.append(f"NBD sequential read (nbdcopy): {size / dt / 1e6:.0f} MB/s")
        t = time.perf_counter()
        pos = 0
        while pos < size:
            pos += len(reader.pread(128 << 10, pos))
        dt = time.perf_counter() - t
        out.append(f"store read, 128 KiB requests (FUSE read path): {size / dt / 1e6:.0f} MB/s")
        reader.close()
    return out


if __name__ == "__main__":
    for line in run():
        print(line)
