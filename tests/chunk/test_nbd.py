"""``image nbd`` read by the real clients: ``nbdinfo --map`` and ``qemu-img map`` (block
status of ``base:allocation``), ``qemu-img info`` (the size), ``nbdcopy`` (a sparse copy),
over TCP, a unix socket and TLS; start-up errors and socket clean-up through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.chunk.nbd import NbdServer
from btrdelta.chunk.store import ChunkStore, ImageReader
from btrdelta.cli import main
from btrdelta.transport.listen import server_tls
from btrdelta.update.clone import clone_image
from tests.conftest import Children
from tests.transport.certs import Certs, make_certs

from .images import ImagePair

BLOCK = 64 << 10


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{tool} is required under CI (scripts/sysdeps.sh installs it)")
            pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def store(image_pair: ImagePair, tmp_path_factory: pytest.TempPathFactory) -> ChunkStore:
    chunk_store = ChunkStore(tmp_path_factory.mktemp("nbd") / "store")
    clone_image(str(image_pair.arc2), target=f"{chunk_store.root}/v2")
    return chunk_store


@pytest.fixture
def served(store: ChunkStore) -> Iterator[NbdServer]:
    _, index = store.read_description("v2")
    reader = ImageReader(store, index)
    server = NbdServer(reader, "v2", "127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()
    reader.close()


def _run(*argv: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120,
                          env=env).stdout


def _check_zero_runs(image: bytes, runs: list[tuple[int, int, bool]]) -> None:
    """``runs`` (offset, length, zero) tile the image; every zero run is zeros; and they
    cover most of the image's all-zero 64 KiB blocks (free space of the ext4)."""
    pos = 0
    for offset, length, _ in runs:
        assert offset == pos
        pos += length
    assert pos == len(image)
    zero_said = sum(n for _, n, z in runs if z)
    for offset, length, zero in runs:
        if zero:
            assert image[offset : offset + length].count(0) == length, (offset, length)
    zero_blocks = sum(BLOCK for k in range(0, len(image) - BLOCK + 1, BLOCK)
                      if image[k : k + BLOCK].count(0) == BLOCK)
    assert zero_blocks > len(image) // 4  # the test image has free space
    assert zero_said >= zero_blocks * 0.9


def test_nbdinfo_map_and_qemu_img(served: NbdServer, image_pair: ImagePair) -> None:
    _need("nbdinfo", "qemu-img")
    image = image_pair.img2.read_bytes()
    extents = json.loads(_run("nbdinfo", "--map", "--json", served.uri))
    runs = [(e["offset"], e["length"], e["type"] == 3) for e in extents]
    assert {e["type"] for e in extents} == {0, 3}  # data; hole,zero
    _check_zero_runs(image, runs)

    qmap = json.loads(_run("qemu-img", "map", "--output=json", "-f", "raw", served.uri))
    _check_zero_runs(image, [(m["start"], m["length"], m["zero"]) for m in qmap])
    assert sum(m["length"] for m in qmap if m["data"]) == sum(
        n for _, n, z in runs if not z)

    info = json.loads(_run("qemu-img", "info", "--output=json", "-f", "raw", served.uri))
    assert info["virtual-size"] == len(image)


def test_nbdcopy_makes_a_sparse_copy(
    served: NbdServer, image_pair: ImagePair, tmp_path: Path
) -> None:
    """nbdcopy reads only its request-sized blocks that hold data: the image is a copy of
    the running interpreter's stdlib (18 MB of data with pyenv's unstripped extensions,
    5.3 MB with Debian's), so its few data runs' ends, rounded out to whole blocks, can
    add a quarter to the data; the bound is those blocks, not a ratio of the data."""
    _need("nbdcopy")
    out = tmp_path / "copy.img"
    out.touch()
    request = 256 << 10  # nbdcopy's default, set so that the bound below stays true
    _run("nbdcopy", f"--request-size={request}", served.uri, str(out))
    image = image_pair.img2.read_bytes()
    assert out.read_bytes() == image
    blocks: set[int] = set()
    data = pos = 0
    for n, flags in served.extents.extents(0, len(image), 1 << 20):
        if not flags:
            blocks.update(range(pos // request, (pos + n - 1) // request + 1))
            data += n
        pos += n
    assert data < len(image) * 0.8
    # the zero runs were not written, and no block of zero runs only was read
    assert out.stat().st_blocks * 512 <= data * 1.1
    assert served.bytes_read <= sum(min(request, len(image) - b * request) for b in blocks)
    assert served.bytes_read < len(image) * 0.8


def test_structured_replies_errors_and_old_clients(served: NbdServer) -> None:
    _need("nbdsh")
    uri = served.uri
    # nbdsh runs the first python3 on PATH: the one of libnbd's Python binding (Debian's)
    env = dict(os.environ, PATH=f"/usr/bin:{os.environ['PATH']}")
    # a client without structured replies still reads (simple replies)
    out = _run("nbdsh", "-c", f"""
h.set_request_structured_replies(False)
h.connect_uri({uri!r})
print(len(h.pread(4096, 0)), h.get_structured_replies_negotiated(),
      h.can_meta_context('base:allocation'))
""", env=env)
    assert out.split() == ["4096", "False", "False"]
    # with them: a read past the end is an error with a message, the connection lives
    out = _run("nbdsh", "-c", f"""
import errno
h.add_meta_context('base:allocation')
h.set_strict_mode(0)  # let the server, not libnbd, refuse the bad read
h.connect_uri({uri!r})
try:
    h.pread(4096, h.get_size() - 100)
except nbd.Error as e:
    print('error', e.errno in (errno.EINVAL, 'EINVAL'))
print(len(h.pread(512, 0)), h.get_structured_replies_negotiated(),
      h.can_meta_context('base:allocation'))
""", env=env)
    assert out.split() == ["error", "True", "512", "True", "True"]


def _wait_for(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cli_unix_socket_removed_on_exit(store: ChunkStore, tmp_path: Path, sig: int,
                                         children: Children) -> None:
    _need("nbdinfo")
    sock = tmp_path / "v2.sock"
    sock_stale = socket.socket(socket.AF_UNIX)
    sock_stale.bind(str(sock))  # a stale socket file, as a killed server leaves
    sock_stale.close()
    proc = children.start(
        [sys.executable, "-m", "btrdelta", "image", "nbd", f"{store.root}/v2", "--listen",
         f"unix:{sock}"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert f"nbd+unix:///v2?socket={sock}" in line, line
    size = _run("nbdinfo", "--size", f"nbd+unix:///v2?socket={sock}")
    assert int(size) > 0
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert not sock.exists()


def test_cli_listen_errors_are_one_line(
    store: ChunkStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = f"{store.root}/v2"
    for bad in ("bogus", "127.0.0.1:99999", "::1:80", "unix:"):
        with pytest.raises(SystemExit) as info:
            main(["image", "nbd", target, "--listen", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("btrdelta image nbd: error: argument --listen: bad listen")
        assert "Traceback" not in "".join(err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["image", "nbd", target, "--listen", f"127.0.0.1:{port}"]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"btrdelta image nbd: error: cannot listen on 127.0.0.1:{port}: address already in "
            "use (another server on that port?)"]
    assert main(["image", "nbd", target, "--tls-cert", f"{tmp_path}/none.pem"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "TLS certificate/key not loaded" in err[0]
    (tmp_path / "file").write_text("not a socket")
    assert main(["image", "nbd", target, "--listen", f"unix:{tmp_path}/file"]) == 1
    assert "the path exists and is not a socket" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a socket"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("nbd-certs"))


def test_tls_with_client_certificates(
    store: ChunkStore, certs: Certs, image_pair: ImagePair, tmp_path: Path
) -> None:
    _need("nbdinfo", "nbdcopy")
    _, index = store.read_description("v2")
    reader = ImageReader(store, index)
    tls = server_tls(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    server = NbdServer(reader, "v2", "127.0.0.1:0", tls=tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.uri.startswith("nbds://127.0.0.1:")
        pki = tmp_path / "pki"  # libnbd's certificate directory layout
        pki.mkdir()
        shutil.copy(certs.ca, pki / "ca-cert.pem")
        uri = f"{server.uri}?tls-certificates={pki}"
        plain = server.uri.replace("nbds://", "nbd://")
        refused = subprocess.run(["nbdinfo", "--size", plain], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert refused.returncode != 0  # TLS is required
        # (libnbd 1.14 says so; 1.22 only that it got no export size)
        assert "TLS" in refused.stderr or "export size" in refused.stderr, refused.stderr
        no_cert = subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert no_cert.returncode != 0  # a client certificate is required
        shutil.copy(certs.client_cert, pki / "client-cert.pem")
        shutil.copy(certs.client_key, pki / "client-key.pem")
        assert int(_run("nbdinfo", "--size", uri)) == reader.size
        out = tmp_path / "copy.img"
        _run("nbdcopy", uri, str(out))
        assert out.read_bytes() == image_pair.img2.read_bytes()
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        reader.close()
