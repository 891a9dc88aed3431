"""FUSE and NBD exports read by real clients: the kernel (loop mount) and libnbd tools."""

from __future__ import annotations

import ctypes.util
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

from btrdelta.chunk.nbd import NbdServer
from btrdelta.chunk.store import ChunkStore, ImageReader
from btrdelta.cli._common import human_bytes
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
    info = subprocess.run(["nbdinfo", "--json", nbd_server.uri], capture_output=True,
                          text=True, check=True, timeout=60).stdout
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
