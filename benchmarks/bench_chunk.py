"""Chunked-image benchmark: cut+hash speed, compress time, clone bytes vs casync, export reads.

Images (cached under ``benchmarks/.cache/chunk/``):

* the real pair from :func:`benchmarks.trees.real_pair` (a Debian bookworm minbase root
  before and after ``apt-get upgrade`` when debootstrap works here, else local trees), made
  into two ext4 images of the same size with ``mkfs.ext4 -d`` (same UUID, hash seed,
  timestamps, ``root_owner=0:0``);
* a 2 GiB ext4 image made with ``mkfs.ext4 -d`` from ~1.5 GB of real files (the OLD root
  plus parts of this machine's ``/usr``, hard-linked into the tree, not copied), in the
  cache or, when the disk is short, in ``/dev/shm``.

Measured in one run, side by side: FastCDC+BLAKE3 on one core (pinned, from the page
cache) and with the hashing thread; ``compress`` of the 2 GiB image on 2 cores; clone of
v2 over HTTP (``btrdelta serve``) with v1 in the store (and the store's size), and with no
store straight onto a copy of v1 in place, against ``casync extract`` of v2 over HTTP
seeded with v1 (same average chunk size, same server), and btrdelta reading casync's own
index and store: bytes the server sent and requests; a full clone of v2 into an empty store
(wall, CPU of the child process, throughput) against ``casync extract`` with no seed; FUSE
sequential read through the kernel (``dd`` of the mounted file) and NBD (``nbdcopy``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.trees import CACHE as TREE_CACHE
from benchmarks.trees import real_pair

CACHE = TREE_CACHE / "chunk"
AVG = 64 << 10
UUID = "6a1c0f5e-1d2b-4c3d-8e4f-5a6b7c8d9e0f"
BIG_PARTS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/jvm", "/usr/lib/gcc")


def _mkfs(tree: Path, image: Path, size_mib: int) -> None:
    """A reproducible ext4 image of ``tree`` (written to a temporary name first)."""
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-U", UUID, "-E", f"hash_seed={UUID},root_owner=0:0",
         "-d", str(tree), str(tmp), f"{size_mib}M"],
        check=True, env=env, capture_output=True,
    )
    tmp.rename(image)


def _tree_bytes(tree: Path) -> int:
    out = subprocess.run(["du", "-sb", str(tree)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def pair_images() -> tuple[str, Path, Path]:
    """(name, v1.ext4, v2.ext4) from the real pair, same size (cached)."""
    name, old, new = real_pair()
    img1, img2 = CACHE / f"{name}-v1.ext4", CACHE / f"{name}-v2.ext4"
    if not (img1.exists() and img2.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        need = max(_tree_bytes(old), _tree_bytes(new))
        size_mib = (int(need * 1.3) >> 20) + 128
        _mkfs(old, img1, size_mib)
        _mkfs(new, img2, size_mib)
    return name, img1, img2


def _big_dir() -> Path | None:
    """Where the 2 GiB image fits: the cache, else RAM (``/dev/shm``), else nowhere."""
    for where in (CACHE, Path("/dev/shm")):
        if where.is_dir() and shutil.disk_usage(where).free > 3 << 30:
            return where
    return None


def big_image(old: Path) -> Path | str:
    """A 2 GiB ext4 image of ~1.5 GB of real files (cached), or why it cannot be made."""
    for where in (CACHE, Path("/dev/shm")):
        if (where / "btrdelta-big-2g.ext4").exists():
            return where / "btrdelta-big-2g.ext4"
    where = _big_dir()
    if where is None:
        return "less than 3 GiB free in the cache and in /dev/shm"
    image = where / "btrdelta-big-2g.ext4"
    tree = CACHE / "big-tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    try:  # hard links: no data copied (the cache is on the same file system as /usr)
        subprocess.run(["cp", "-al", str(old), str(tree / "root")], check=True,
                       capture_output=True)
        for part in BIG_PARTS:
            if os.path.isdir(part):
                subprocess.run(["cp", "-al", part, str(tree / Path(part).name)], check=True,
                               capture_output=True)
        _mkfs(tree, image, 2048)
    except subprocess.CalledProcessError as exc:
        return f"could not build it ({exc}: {exc.stderr!r})"
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        image.with_suffix(".tmp").unlink(missing_ok=True)
    return image


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def _cut_hash(path: Path, threads: bool) -> tuple[float, float, int]:
    """(wall GB/s, GB per CPU-second, chunks) of FastCDC+BLAKE3 over a warm file."""
    from btrdelta.chunk.chunker import ChunkerParams, hash_chunks, map_file

    params = ChunkerParams.from_avg(AVG)
    n = 0
    with map_file(path) as view, ThreadPoolExecutor(1) as pool:
        size = len(view)
        t, c = time.perf_counter(), time.process_time()
        for batch in hash_chunks(view, params, pool=pool if threads else None):
            n += len(batch.digests)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        del batch
    return size / dt / 1e9, size / dc / 1e9, n


def bench_cut_hash(path: Path, label: str) -> list[str]:
    _warm(path)
    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        one = max((_cut_hash(path, threads=False) for _ in range(3)), key=lambda r: r[0])
    finally:
        os.sched_setaffinity(0, cpus)
    two = max((_cut_hash(path, threads=True) for _ in range(3)), key=lambda r: r[0])
    return [
        f"chunk+hash {label}, 1 core (pinned): {one[0]:.2f} GB/s wall, {one[1]:.2f} GB per "
        f"CPU-second ({one[2]} chunks; target >= 1.5)",
        f"chunk+hash {label}, cut || hash threads: {two[0]:.2f} GB/s wall",
    ]


def bench_compress_big(big: Path, www: Path) -> list[str]:
    from btrdelta.chunk.chunker import ChunkerParams
    from btrdelta.chunk.compress import DEFAULT_LEVEL, compress_image

    _warm(big)
    t, c = time.perf_counter(), time.process_time()
    with open(www / "big.bdar", "wb") as f:
        rep = compress_image(big, f, params=ChunkerParams.from_avg(AVG), threads=2)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    size = rep.header.image_size
    return [f"compress 2 GiB ext4 ({size >> 20} MiB, {rep.distinct_bytes >> 20} MiB distinct, "
            f"zstd {DEFAULT_LEVEL}) on 2 cores: {dt:.1f} s wall ({size / dt / 1e6:.0f} MB/s), "
            f"{dc:.1f} CPU s, archive {rep.archive_size >> 20} MiB (target < 60 s)"]


def _store_bytes(store: Path) -> int:
    """Bytes of the chunk files in a store (what it costs on the device's disk)."""
    return sum(p.stat().st_size for p in (store / "chunks").rglob("*") if p.is_file())


def _served(server: object, before: tuple[int, int]) -> tuple[int, int]:
    return (server.bytes_served - before[0],  # type: ignore[attr-defined]
            server.requests - before[1])  # type: ignore[attr-defined]


def _mark(server: object) -> tuple[int, int]:
    return server.bytes_served, server.requests  # type: ignore[attr-defined]


def bench_clone(name: str, img1: Path, img2: Path, tmp: Path) -> tuple[list[str], Path]:
    """Bytes a device downloads for v2 holding v1: into a store, straight onto the old slot
    (no store), and casync's ``extract`` (and btrdelta reading casync's own index)."""
    from btrdelta.chunk.chunker import ChunkerParams
    from btrdelta.chunk.compress import compress_image
    from btrdelta.transport.server import StaticServer
    from btrdelta.update.clone import clone_image

    out: list[str] = []
    www = tmp / "www"
    www.mkdir()
    params = ChunkerParams.from_avg(AVG)
    for img, arc in ((img1, "v1.bdar"), (img2, "v2.bdar")):
        with open(www / arc, "wb") as f:
            compress_image(img, f, params=params)
    store = tmp / "store"
    server = StaticServer(www)
    with server.running():
        for v in ("v1", "v2"):
            before = _mark(server)
            t = time.perf_counter()
            rep = clone_image(f"{server.url}/{v}.bdar", target=f"{store}/{v}")
            dt = time.perf_counter() - t
            served, requests = _served(server, before)
        needed = rep.fetch_bytes + rep.index_bytes
        size2 = img2.stat().st_size
        out.append(f"[{name}] image {size2 >> 20} MiB, v2 archive "
                   f"{(www / 'v2.bdar').stat().st_size} bytes")
        out.append(f"clone v2 over HTTP with v1 in store: {served} bytes in {requests} requests, "
                   f"{dt:.2f} s; needed = chunks v1 lacks {rep.fetch_bytes} + index "
                   f"{rep.index_bytes}: ratio {served / needed:.3f} (target <= 1.05); store "
                   f"holds {_store_bytes(store) >> 20} MiB for v1+v2 "
                   f"({_store_bytes(store) / size2:.2f} x one image)")
        # no store: v2 written over a copy of v1 (the old slot), in place
        slot = tmp / "slot.img"
        shutil.copyfile(img1, slot)
        before = _mark(server)
        t = time.perf_counter()
        rep = clone_image(f"{server.url}/v2.bdar", output=str(slot), in_place=True)
        dt = time.perf_counter() - t
        ours, our_req = _served(server, before)
        if slot.read_bytes() != img2.read_bytes():
            raise AssertionError("the in-place clone produced a different image")
        out.append(f"clone v2 over HTTP straight onto the v1 slot, no store: {ours} bytes in "
                   f"{our_req} requests, {dt:.2f} s; store 0 bytes; {rep.out_in_place >> 20} "
                   f"MiB left in place, {rep.out_moved >> 20} MiB moved within the slot, "
                   f"{rep.out_fetched >> 20} MiB downloaded")
        slot.unlink()
        out += bench_full_clone(server, www, img2, tmp)
        if shutil.which("casync"):
            out += _casync_side(server, www, img1, img2, tmp, ours)
        else:
            out.append("casync not installed: no comparison")
    return out, store


def _child_run(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system, from ``wait4``) of a command run to its end."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {err[-300:]}")
    return wall, usage.ru_utime + usage.ru_stime


def bench_full_clone(server: object, www: Path, img2: Path, tmp: Path,
                     rounds: int = 3) -> list[str]:
    """A whole image downloaded into an empty store (every chunk fetched, stored as it
    arrives, named in durable batches), in a child process (its CPU from ``wait4``),
    median of ``rounds``; and ``casync extract`` of the same image with no seed."""
    url = server.url  # type: ignore[attr-defined]
    arc = (www / "v2.bdar").stat().st_size
    walls, cpus = [], []
    for _ in range(rounds):
        store = tmp / "full-store"
        shutil.rmtree(store, ignore_errors=True)
        os.sync()
        wall, cpu = _child_run([sys.executable, "-m", "btrdelta", "image", "clone",
                                f"{url}/v2.bdar", f"{store}/v2"])
        walls.append(wall)
        cpus.append(cpu)
    shutil.rmtree(tmp / "full-store", ignore_errors=True)
    wall, cpu = sorted(walls)[rounds // 2], sorted(cpus)[rounds // 2]
    out = [f"full clone of v2 into an empty store over HTTP (median of {rounds}): "
           f"{wall:.2f} s wall, {cpu:.2f} s CPU, {arc / wall / 2**20:.1f} MiB/s of archive "
           f"({arc >> 20} MiB), {img2.stat().st_size / wall / 2**20:.0f} MiB/s of image"]
    if shutil.which("casync"):
        cas = www / "casync-full"
        cas.mkdir(exist_ok=True)
        subprocess.run(["casync", "make", f"--store={cas}/default.castr",
                        f"--chunk-size={AVG}", str(cas / "v2.caibx"), str(img2)],
                       check=True, capture_output=True)
        result = tmp / "casync-full.img"
        c_wall, c_cpu = _child_run(["casync", "extract",
                                    f"--store={url}/casync-full/default.castr",
                                    f"{url}/casync-full/v2.caibx", str(result)])
        result.unlink()
        shutil.rmtree(cas)
        out.append(f"casync extract of v2 over HTTP, no seed (one request a chunk): "
                   f"{c_wall:.2f} s wall, {c_cpu:.2f} s CPU")
    return out


def _casync_side(server: object, www: Path, img1: Path, img2: Path, tmp: Path,
                 ours: int) -> list[str]:
    """casync extract of v2 seeded with v1, and btrdelta reading casync's own files."""
    from btrdelta.update.clone import clone_image

    cas = www / "casync"
    cas.mkdir()
    for name, img in (("v1", img1), ("v2", img2)):
        subprocess.run(["casync", "make", f"--store={cas}/default.castr",
                        f"--chunk-size={AVG}", str(cas / f"{name}.caibx"), str(img)],
                       check=True, capture_output=True)
    before = _mark(server)
    result = cas / "v2.out"
    subprocess.run(["casync", "extract", f"--store={server.url}/casync/default.castr",
                    f"--seed={img1}", f"{server.url}/casync/v2.caibx", str(result)],
                   check=True, capture_output=True)
    if result.read_bytes() != img2.read_bytes():
        raise AssertionError("casync extract produced a different image")
    result.unlink()
    c_bytes, c_req = _served(server, before)
    slot = tmp / "slot-casync.img"
    shutil.copyfile(img1, slot)
    before = _mark(server)
    clone_image(f"{server.url}/casync/v2.caibx", output=str(slot), in_place=True)
    b_bytes, b_req = _served(server, before)
    if slot.read_bytes() != img2.read_bytes():
        raise AssertionError("the clone of casync's index produced a different image")
    slot.unlink()
    return [
        f"casync extract v2 over HTTP seeded with v1 (--chunk-size={AVG}): {c_bytes} bytes "
        f"in {c_req} requests; btrdelta archive, no store / casync bytes = "
        f"{ours / c_bytes:.3f}",
        f"btrdelta clone of casync's own v2.caibx + default.castr onto the v1 slot: "
        f"{b_bytes} bytes in {b_req} requests (btrdelta/casync bytes = {b_bytes / c_bytes:.3f})",
    ]


def bench_exports(store_dir: Path, tmp: Path) -> list[str]:
    from btrdelta.chunk.nbd import NbdServer
    from btrdelta.chunk.store import ChunkStore, ImageReader

    out: list[str] = []
    store = ChunkStore(store_dir)
    _, index = store.read_description("v2")
    reader = ImageReader(store, index)
    size = reader.size
    nbd = NbdServer(reader, "v2", "127.0.0.1:0")
    th = threading.Thread(target=nbd.serve_forever, daemon=True)
    th.start()
    t = time.perf_counter()
    subprocess.run(["nbdcopy", nbd.uri, "null:"], check=True)
    dt = time.perf_counter() - t
    nbd.shutdown()
    th.join()
    nbd.server_close()
    reader.close()
    out.append(f"NBD sequential read (nbdcopy): {nbd.bytes_read / dt / 1e6:.0f} MB/s of data "
               f"read (target >= 300); {size / dt / 1e6:.0f} MB/s of image (zero runs are "
               "skipped through block status)")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        out.append("FUSE: needs root and /dev/fuse; not measured")
        return out
    mnt = tmp / "fuse"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "btrdelta", "image", "mount",
                             str(store_dir / "v2"), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "v2").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("FUSE mount did not come up")
            time.sleep(0.05)
        rates = []
        for _ in range(3):  # each open drops the kernel's cached pages: reads reach us
            t = time.perf_counter()
            subprocess.run(["dd", f"if={mnt / 'v2'}", "of=/dev/null", "bs=1M"], check=True,
                           capture_output=True)
            rates.append(size / (time.perf_counter() - t) / 1e6)
        rates.sort()
        out.append(f"FUSE sequential read through the kernel (dd bs=1M of the mounted file, "
                   f"3 runs): median {rates[1]:.0f} MB/s, best {rates[2]:.0f} MB/s "
                   f"(target >= 300)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def run() -> list[str]:
    """Run the benchmark; returns lines of results."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    out: list[str] = [f"load average at start: {load} (2 cores shared with other work)"]
    name, img1, img2 = pair_images()
    _, old, _ = real_pair()
    big = big_image(old)
    out += bench_cut_hash(img2, f"{name} v2 ({img2.stat().st_size >> 20} MiB)")
    if isinstance(big, Path):
        out += bench_cut_hash(big, f"2 GiB ext4 ({big.stat().st_size >> 20} MiB)")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp_s:
        tmp = Path(tmp_s)
        lines, store_dir = bench_clone(name, img1, img2, tmp)
        out += lines
        out += bench_exports(store_dir, tmp)
    if isinstance(big, str):
        out.append(f"compress of a 2 GiB image: not measured: {big}")
        return out
    with tempfile.TemporaryDirectory(dir=big.parent) as tmp_s:
        out += bench_compress_big(big, Path(tmp_s))
    return out


if __name__ == "__main__":  # python -m benchmarks.bench_chunk
    for line in run():
        print(line)
