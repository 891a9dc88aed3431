"""FUSE and NBD exports read by real clients: the kernel (loop mount) and libnbd tools."""

from __future__ import annotations

import ctypes.util
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.chunk.archive import ArchiveIndex
from btrdelta.chunk.nbd import NbdServer
from btrdelta.chunk.store import ChunkStore, ImageReader
from btrdelta.cli._common import human_bytes
from btrdelta.errors import ChecksumError
from btrdelta.update.clone import clone_image

from .images import ImagePair, trees_equal


@pytest.fixture(scope="module")
def store_v2(image_pair: ImagePair, tmp_path_factory: pytest.TempPathFactory) -> ChunkStore:
    store = ChunkStore(tmp_path_factory.mktemp("exports") / "store")
    clone_image(str(image_pair.arc2), target=f"{store.root}/v2")
    return store


@pytest.fixture
def nbd_server(store_v2: ChunkStore) -> Iterator[NbdServer]:
    _, index = store_v2.read_description("v2")
    reader = ImageReader(store_v2, index)
    server = NbdServer(reader, "v2", "127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()
    reader.close()


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is required under CI")
        pytest.skip(f"{tool} not installed")


def test_nbdcopy_reads_the_image(
    nbd_server: NbdServer, image_pair: ImagePair, tmp_path: Path
) -> None:
    _need("nbdcopy")
    # (--no-content: nbdinfo otherwise probes the export's first bytes with file(1), and
    # where file is not installed (a minimal Debian) prints a "content" of uninitialized
    # bytes that are not UTF-8: libnbd 1.14.2)
    info = subprocess.run(["nbdinfo", "--json", "--no-content", nbd_server.uri],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    import json

    export = json.loads(info)["exports"][0]
    assert export["export-size"] == image_pair.img2.stat().st_size
    assert export["is_read_only"] is True
    out = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", nbd_server.uri, str(out)], check=True, timeout=120)
    assert out.read_bytes() == image_pair.img2.read_bytes()
    assert nbd_server.bytes_read > 0  # zero runs are skipped (block status): test_nbd.py


def test_nbd_unknown_export_and_write_refused(nbd_server: NbdServer) -> None:
    _need("nbdinfo")
    host, port = nbd_server.socket.getsockname()[:2]
    bad = subprocess.run(["nbdinfo", f"nbd://{host}:{port}/nope"], capture_output=True,
                         timeout=60, check=False)
    assert bad.returncode != 0
    # the server survives and still answers
    ok = subprocess.run(["nbdinfo", "--size", nbd_server.uri], capture_output=True, text=True,
                        timeout=60, check=True)
    assert int(ok.stdout) > 0


def _wait_for(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def test_parallel_reads_with_fd_eviction(store_v2: ChunkStore, image_pair: ImagePair) -> None:
    # many threads, a 3-descriptor LRU: descriptors are evicted while others read them
    _, index = store_v2.read_description("v2")
    reader = ImageReader(store_v2, index, max_open=3)
    image = image_pair.img2.read_bytes()
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            off = rng.randrange(len(image))
            n = rng.randrange(1, 200_000)
            if reader.pread(n, off) != image[off : off + n]:
                errors.append(f"{off}+{n}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert errors == []
    assert len(os.listdir("/proc/self/fd")) < 200  # nothing leaked


@pytest.mark.btrfs
@pytest.mark.parametrize("libfuse", ["fuse", "fuse3"])
def test_fuse_file_loop_mounts_to_the_source_tree(
    store_v2: ChunkStore, image_pair: ImagePair, tmp_path: Path, libfuse: str
) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        if os.environ.get("CI") == "true":
            pytest.fail("root and /dev/fuse are required under CI")
        pytest.skip("needs root and /dev/fuse")
    library = ctypes.util.find_library(libfuse)  # libfuse 2 / 3: mfusepy drives either
    if library is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"lib{libfuse} is required under CI (scripts/sysdeps.sh installs it)")
        pytest.skip(f"lib{libfuse} not installed")
    fuse_dir, loop_dir = tmp_path / "fuse", tmp_path / "loop"
    fuse_dir.mkdir()
    loop_dir.mkdir()
    log = tmp_path / "mount.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "btrdelta", "image", "mount", "v2", str(fuse_dir)],
            stdout=logf, stderr=subprocess.STDOUT, cwd=store_v2.root,  # a relative store
            env=dict(os.environ, FUSE_LIBRARY_PATH=library),
        )
    try:
        _wait_for(lambda: (fuse_dir / "v2").exists() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        # in the foreground, it says it is up (it said nothing: a new user saw a hang)
        _wait_for(lambda: "mounted" in log.read_text())
        # and only that (libfuse 3.14 printed "Ignoring invalid max threads value
        # 4294967295 > max (100000)." first: max_idle_threads is given now)
        assert log.read_text() == (
            f"mounted v2 ({human_bytes(image_pair.img2.stat().st_size)}, read-only) as "
            f"{fuse_dir}/v2; umount {fuse_dir} to end\n")
        assert (fuse_dir / "v2").stat().st_size == image_pair.img2.stat().st_size
        assert (fuse_dir / "v2").read_bytes() == image_pair.img2.read_bytes()
        with pytest.raises(OSError, match="Read-only"):
            open(fuse_dir / "v2", "r+b")  # noqa: SIM115 - must fail
        subprocess.run(["mount", "-o", "loop,ro", str(fuse_dir / "v2"), str(loop_dir)],
                       check=True, timeout=60)
        try:
            assert trees_equal(loop_dir, image_pair.tree2) == ""
        finally:
            subprocess.run(["umount", str(loop_dir)], check=True, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _mounted(fuse_dir)
        assert log.read_text().endswith(f"unmounted {fuse_dir}\n"), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _mounted(loop_dir):
            subprocess.run(["umount", "-l", str(loop_dir)], check=False)
        if _mounted(fuse_dir):
            subprocess.run(["umount", "-l", str(fuse_dir)], check=False)


_KINDS = ("empty", "short", "long", "content differs")


def _damage_chunks(store: ChunkStore, index: ArchiveIndex,
                   kinds: tuple[str, ...] = _KINDS) -> dict[str, int]:
    """Damage the chunks at image positions 1, 2, ... (distinct chunks) as a crash or a bad
    disk can: kind -> the position's offset in the image."""
    positions: dict[int, int] = {}  # entry -> first position
    for pos, entry in enumerate(index.order[1:], 1):
        positions.setdefault(entry, pos)
        if len(positions) == len(kinds):
            break
    damaged = {}
    for (entry, pos), kind in zip(positions.items(), kinds, strict=True):
        path = Path(store.chunk_path(index.digests[entry]))
        data = bytearray(path.read_bytes())
        path.chmod(0o644)
        if kind == "content differs":
            data[len(data) // 2] ^= 0x20
        path.write_bytes({"empty": b"", "short": bytes(data[:-1]), "long": bytes(data) + b"x",
                          "content differs": bytes(data)}[kind])
        damaged[kind] = index.starts[pos]
    return damaged


def test_a_damaged_chunk_fails_its_reads_instead_of_serving_wrong_bytes(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    """A chunk file left empty, short, long or with other content under its name (a power
    cut under an older version, a bad disk): the reader checks each chunk once, when it
    first opens it, and a read there fails naming the chunk; the rest reads as before."""
    store = ChunkStore(tmp_path / "store")
    clone_image(str(image_pair.arc2), target=f"{store.root}/v2")
    _, index = store.read_description("v2")
    damaged = _damage_chunks(store, index)
    bad_entries = {index.order[index.starts.index(o)] for o in damaged.values()}
    image = image_pair.img2.read_bytes()
    reader = ImageReader(store, index)
    for kind, offset in damaged.items():
        for _ in range(2):  # and again: a damaged chunk is never taken as checked
            with pytest.raises(ChecksumError, match=rf"chunk damaged in the store \({kind}\)"
                               r".*image verify --repair"):
                reader.pread(100, offset + 10)
    for pos, entry in enumerate(index.order):
        start, end = index.starts[pos], index.starts[pos + 1]
        if entry not in bad_entries:
            assert reader.pread(end - start, start) == image[start:end]
    reader.close()
    # unchecked (a caller that hashes the whole content itself), the wrong bytes come
    # through: what the check is there for
    unchecked = ImageReader(store, index, verify=False)
    offset = damaged["content differs"]
    n = index.starts[index.starts.index(offset) + 1] - offset
    assert len(unchecked.pread(n, offset)) == n
    assert unchecked.pread(n, offset) != image[offset:offset + n]
    unchecked.close()


@pytest.mark.btrfs
def test_a_mounted_image_with_a_damaged_chunk_gives_eio_and_says_which(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    """`image mount` of a store with a damaged chunk: the read there fails (EIO, where it
    served the wrong bytes), the command says once which chunk and what repairs it, the
    rest of the image reads bit for bit."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        if os.environ.get("CI") == "true":
            pytest.fail("root and /dev/fuse are required under CI")
        pytest.skip("needs root and /dev/fuse")
    store = ChunkStore(tmp_path / "store")
    clone_image(str(image_pair.arc2), target=f"{store.root}/v2")
    _, index = store.read_description("v2")
    offset = _damage_chunks(store, index, ("content differs",))["content differs"]
    end = index.starts[index.starts.index(offset) + 1]
    image = image_pair.img2.read_bytes()
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    log = tmp_path / "mount.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "btrdelta", "image", "mount", f"{store.root}/v2",
             str(fuse_dir)], stdout=logf, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: "mounted" in log.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        with open(fuse_dir / "v2", "rb", buffering=0) as f:
            for _ in range(2):
                with pytest.raises(OSError, match="Input/output error") as err:
                    os.pread(f.fileno(), end - offset, offset)
                assert err.value.errno == errno.EIO
            # before it: fine, up to the page that holds its first byte (a page is read
            # whole: that one fails; the chunk was page-aligned with 3.11's stdlib, not
            # with 3.13's, and the read came back short)
            good = offset - offset % 4096
            assert os.pread(f.fileno(), good, 0) == image[:good]
        said = [line for line in log.read_text().splitlines() if "error" in line]
        assert len(said) == 1, log.read_text()
        assert said[0].startswith("btrdelta image mount: error: ")
        assert "chunk damaged in the store (content differs)" in said[0]
        assert index.digests[index.order[index.starts.index(offset)]].hex() in said[0]
        assert said[0].endswith("reads there fail (EIO)")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _mounted(fuse_dir):
            subprocess.run(["umount", "-l", str(fuse_dir)], check=False)


def test_an_nbd_export_with_a_damaged_chunk_says_which_on_its_side(
    image_pair: ImagePair, tmp_path: Path
) -> None:
    """`image nbd` of a store with a damaged chunk: the client's read there fails (EIO, with
    the message in its structured reply) and the server says once which chunk, as `image
    mount` does (it said nothing: the operator saw no cause on the serving side)."""
    _need("nbdsh")
    store = ChunkStore(tmp_path / "store")
    clone_image(str(image_pair.arc2), target=f"{store.root}/v2")
    _, index = store.read_description("v2")
    offset = _damage_chunks(store, index, ("content differs",))["content differs"]
    log = tmp_path / "nbd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "btrdelta", "image", "nbd", f"{store.root}/v2", "--listen",
             "127.0.0.1:0"], stdout=logf, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: "nbd://" in log.read_text() or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        uri = "nbd://" + log.read_text().split("nbd://")[1].split()[0]
        env = dict(os.environ, PATH=f"/usr/bin:{os.environ['PATH']}")  # libnbd's python3
        out = subprocess.run(["nbdsh", "-c", f"""
import errno
h.connect_uri({uri!r})
for _ in range(2):
    try:
        h.pread(100, {offset + 10})
    except nbd.Error as e:
        print('error', e.errno in (errno.EIO, 'EIO'))
print(len(h.pread(100, 0)))
"""], capture_output=True, text=True, timeout=60, env=env, check=True).stdout
        assert out.split() == ["error", "True", "error", "True", "100"]
        said = [line for line in log.read_text().splitlines() if "error" in line]
        assert len(said) == 1, log.read_text()
        assert said[0].startswith("btrdelta image nbd: error: ")
        assert "chunk damaged in the store (content differs)" in said[0]
        assert said[0].endswith("reads there fail (EIO)")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
