"""``btrdelta image`` and ``btrdelta serve`` end to end: real ext4 images over nginx and ours."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from btrdelta.chunk.store import ChunkStore
from btrdelta.cli import main
from tests.chunk.images import ImagePair, make_ext4, make_trees
from tests.conftest import Children, nobody_python


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    base = tmp_path_factory.mktemp("cli-images")
    tree1, tree2 = make_trees(base)
    img1, img2 = base / "v1.ext4", base / "v2.ext4"
    make_ext4(tree1, img1)
    make_ext4(tree2, img2)
    www = base / "www"
    www.mkdir()
    for img, arc in ((img1, www / "v1.bdar"), (img2, www / "v2.bdar")):
        argv = ["image", "compress", "-i", str(img), "-o", str(arc), "--avg-chunk", "16K"]
        assert main(argv) == 0
    return ImagePair(tree1, tree2, img1, img2, www / "v1.bdar", www / "v2.bdar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


@pytest.fixture
def nginx(images: ImagePair, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is required under CI")
        pytest.skip("nginx not installed")
    port = _free_port()
    log = tmp_path / "access.log"
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {log} combined; log_format bytes '$status $body_bytes_sent';
  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
  scgi_temp_path {tmp_path}/scgi;
  server {{ listen 127.0.0.1:{port}; root {images.arc1.parent};
            access_log {tmp_path}/bytes.log bytes; }}
}}
""")
    proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(tmp_path / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}", tmp_path / "bytes.log"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def serve(images: ImagePair, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "btrdelta", "serve", str(images.arc1.parent), "--port",
             str(port)], stdout=subprocess.DEVNULL, stderr=logf)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert "stopped:" in log.read_text()


def _served(log: Path, kind: str, requests: int) -> int:
    """Body bytes the server logged (nginx: '$status $bytes'; ours: '... status bytes'),
    once it has logged ``requests`` requests (the clients' count) or 10 s have passed: the
    server writes a line after its reply (a fixed 0.2 s could end first under load, and a
    late line of one clone was counted as the next one's)."""
    deadline = time.monotonic() + 10
    while True:
        sizes = []
        for line in log.read_text().splitlines():
            fields = line.split()
            if kind == "nginx" or (len(fields) >= 5 and fields[1] in ("GET", "HEAD")):
                sizes.append(int(fields[-1]))
        if len(sizes) >= requests or time.monotonic() > deadline:
            return sum(sizes)
        time.sleep(0.05)


def _clone_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    assert main(["image", "clone", "--json", *args]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.parametrize("server", ["nginx", "serve"])
def test_clone_v1_then_v2_over_http(
    server: str, images: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    url, log = request.getfixturevalue(server)
    store = tmp_path / "store"
    v1 = _clone_json(capsys, f"{url}/v1.bdar", f"{store}/v1", "--output",
                     str(tmp_path / "v1.img"))
    assert (tmp_path / "v1.img").read_bytes() == images.img1.read_bytes()
    v1_requests = int(v1["requests"])  # type: ignore[call-overload]
    v1_bytes = _served(log, server, v1_requests)
    assert v1_bytes <= images.arc1.stat().st_size * 1.01

    dry = _clone_json(capsys, "--dry-run", f"{url}/v2.bdar", f"{store}/v2")
    report = _clone_json(capsys, f"{url}/v2.bdar", f"{store}/v2", "--output",
                         str(tmp_path / "v2.img"))
    assert (tmp_path / "v2.img").read_bytes() == images.img2.read_bytes()
    v2_bytes = _served(log, server, v1_requests + int(dry["requests"])  # type: ignore[call-overload]
                       + int(report["requests"])) - v1_bytes  # type: ignore[call-overload]
    assert report["fetch_bytes"] == dry["fetch_bytes"]
    # what the server sent for v2 (dry run included): chunks v1 lacked + index, and
    # multipart framing; far less than the full v2 archive
    needed = int(report["fetch_bytes"]) + int(report["index_bytes"])  # type: ignore[call-overload]
    assert v2_bytes <= 1.05 * needed + 2 * int(report["index_bytes"]) + 4096  # type: ignore[call-overload]
    assert v2_bytes < images.arc2.stat().st_size / 3
    assert main(["image", "verify", f"{store}/v2"]) == 0


@pytest.mark.parametrize("server", ["nginx", "serve"])
def test_an_archive_shorter_than_its_header_over_http(
    server: str, images: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """A server answers a range that runs past the end with what there is (206, `bytes
    0-99/100`): a truncated archive, exit 3 at once as for a local file. It was taken for a
    transient failure: six attempts over ~7 s, a line each, then exit 7 ("server sent a
    different range than asked")."""
    url, _ = request.getfixturevalue(server)
    short = images.arc1.parent / f"short-{server}.bdar"
    short.write_bytes(images.arc1.read_bytes()[:100])
    store, output = tmp_path / "store", tmp_path / "v1.img"
    try:
        for argv in (["image", "info", f"{url}/{short.name}"],
                     ["image", "clone", f"{url}/{short.name}", f"{store}/v1", "--output",
                      str(output)]):
            err = _one_line_error(capsys, 3, argv)
            assert "offset 100: archive truncated: wanted [0, 160), file is 100 bytes" in err
        # as the local file is (exit 3)
        assert "truncated" in _one_line_error(capsys, 3, ["image", "info", str(short)])
    finally:
        short.unlink()
    assert not store.exists()
    assert not output.exists()


def test_clone_onto_a_new_output_leaves_the_image_zeros_as_holes(tmp_path: Path) -> None:
    """A new output file is made empty at the image's size: chunks of zeros are holes there
    (as `casync extract` leaves them). They were written: a clone of a 1.7 GiB ext4 image of
    1.3 GiB of data took 1.7 GiB of disk."""
    image = tmp_path / "disk.img"
    data = os.urandom(4 << 20)
    image.write_bytes(data + bytes(24 << 20) + data[::-1])
    archive = tmp_path / "disk.bdar"
    assert main(["image", "compress", "-q", "-i", str(image), "-o", str(archive)]) == 0
    out = tmp_path / "out.img"
    assert main(["image", "clone", "-q", str(archive), "--output", str(out)]) == 0
    assert out.read_bytes() == image.read_bytes()
    allocated = out.stat().st_blocks * 512
    assert 8 << 20 <= allocated < 12 << 20, allocated


def test_info_gc_and_errors(
    images: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert main(["image", "clone", str(images.arc1), f"{store}/v1"]) == 0
    assert main(["image", "clone", str(images.arc2), f"{store}/v2"]) == 0
    capsys.readouterr()
    assert main(["image", "info", "--json", str(images.arc2)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_size"] == images.img2.stat().st_size
    assert info["kind"] == "archive"
    assert main(["image", "info", "--json", f"{store}/v2"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "description"
    os.unlink(store / "v1")
    assert main(["image", "gc", str(store)]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["image", "verify", f"{store}/v2"]) == 0
    # errors: one line, the class's exit code, no traceback
    bad = tmp_path / "bad.bdar"
    bad.write_bytes(b"not an archive" * 20)
    capsys.readouterr()
    assert main(["image", "info", str(bad)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "bad magic" in err
    assert main(["image", "clone", str(images.arc1), f"{store}/chunks"]) == 4
    assert main(["image", "verify", f"{store}/nope"]) == 6


def test_signed_archive_and_tampering(
    images: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "key.pem", tmp_path / "key.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    arc = tmp_path / "signed.bdar"
    assert main(["image", "compress", "-i", str(images.img1), "-o", str(arc), "--sign", str(priv),
                 "--avg-chunk", "16K"]) == 0
    assert main(["image", "info", "--key", str(pub), str(arc)]) == 0
    store = tmp_path / "store"
    assert main(["image", "clone", "--key", str(pub), str(arc), f"{store}/ok"]) == 0
    assert main(["image", "verify", "--key", str(pub), f"{store}/ok"]) == 0
    # flip one byte of the signature: refused before anything is fetched or stored
    blob = bytearray(arc.read_bytes())
    blob[-1] ^= 1
    tampered = tmp_path / "tampered.bdar"
    tampered.write_bytes(bytes(blob))
    capsys.readouterr()
    assert main(["image", "clone", "--key", str(pub), str(tampered), f"{tmp_path}/s2/x"]) == 5
    assert "signature" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()
    # unsigned archive but a key required
    assert main(["image", "clone", "--key", str(pub), str(images.arc1), f"{tmp_path}/s3/x"]) == 5


def test_clone_output_uses_seeds_and_updates_a_seed_in_place(
    images: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = images.img2.stat().st_size
    new = images.img2.read_bytes()
    # a separate output: what the seed (v1) holds is copied from it
    out = tmp_path / "b.img"
    r = _clone_json(capsys, "--seed", str(images.img1), "--output", str(out), str(images.arc2),
                    f"{tmp_path}/s1/v2")
    assert out.read_bytes() == new
    assert r["out_in_place"] == 0
    assert int(r["out_from_seeds"]) > size // 2  # type: ignore[call-overload]
    assert int(r["out_from_seeds"]) + int(r["out_from_store"]) == size  # type: ignore[call-overload]
    # the A/B case on one file: the seed is the output, updated where it differs only
    part = tmp_path / "partition.img"
    shutil.copyfile(images.img1, part)
    capsys.readouterr()
    assert main(["image", "clone", "--seed", str(part), "--output", str(part), str(images.arc2),
                 f"{tmp_path}/s2/v2"]) == 0
    text = capsys.readouterr().out
    assert part.read_bytes() == new
    assert "already in place" in text
    # the image's bytes written from fetched chunks are not what was downloaded (the
    # line before says that, compressed): "400.0 MiB downloaded" after "45.5 MiB received"
    assert "from downloaded chunks" in text
    assert " downloaded\n" not in text
    assert main(["image", "verify", f"{tmp_path}/s2/v2"]) == 0


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, argv: list[str]) -> str:
    """Run ``argv``; it must exit ``code`` with exactly one line on stderr, no traceback."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_user_mistakes_are_one_line_errors(
    images: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = tmp_path / "store"
    (tmp_path / "work").mkdir()
    assert main(["image", "clone", str(images.arc1), f"{store}/v1"]) == 0
    err = _one_line_error(capsys, 1, ["image", "mount", f"{store}/v1", str(tmp_path / "nope")])
    assert "mount point does not exist" in err
    from btrdelta.chunk.fuse import LIBFUSE  # (needs the [fuse] extra)

    if LIBFUSE[0] == 2:  # it refuses a directory that is not empty on two more lines
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "f").touch()
        err = _one_line_error(capsys, 1, ["image", "mount", f"{store}/v1", str(busy)])
        assert "mount point is not empty" in err
    err = _one_line_error(capsys, 1, ["image", "compress", "-i", str(tmp_path), "-o",
                                      str(tmp_path / "x.bdar")])
    assert "a directory" in err
    assert "Cannot allocate memory" not in err
    assert not (tmp_path / "x.bdar").exists()
    # a zstd-compressed archive is named as such, not "bad magic"
    zst = tmp_path / "v1.bdar.zst"
    subprocess.run(["zstd", "-q", str(images.arc1), "-o", str(zst)], check=True)
    for argv in (["image", "info", str(zst)], ["image", "clone", str(zst), f"{store}/z"]):
        assert "zstd-compressed" in _one_line_error(capsys, 3, argv)
    # missing chunks: exit 6 (a missing base), damaged ones only: exit 5
    _, index = ChunkStore(store).read_description("v1")
    first = store / "chunks" / index.digests[0].hex()[:2] / index.digests[0].hex()
    first.chmod(0o644)
    first.write_bytes(b"")
    # the image named as `verify` names it when it is OK ("path 'STORE/v1'" was a stream's)
    err = _one_line_error(capsys, 5, ["image", "verify", f"{store}/v1"])
    assert err.startswith(f"btrdelta image verify: error: {store}/v1: 0 chunk(s) missing, "
                          "1 damaged"), err
    first.unlink()
    err = _one_line_error(capsys, 6, ["image", "verify", f"{store}/v1"])
    assert err.startswith(f"btrdelta image verify: error: {store}/v1: 1 chunk(s) missing"), err
    # no target, or --castr for a btrdelta archive: usage errors (they were exit 1)
    err = _one_line_error(capsys, 2, ["image", "clone", str(images.arc1)])
    assert "nothing to clone into" in err
    err = _one_line_error(capsys, 2, ["image", "clone", str(images.arc1), "--output",
                                      str(tmp_path / "c.img"), "--castr", str(tmp_path)])
    assert "--castr is for casync indexes" in err
    assert not (tmp_path / "c.img").exists()
    # a target without STORE/: the working directory was made a chunk store (chunks/,
    # .lock, .sources and the image's description next to the user's files)
    monkeypatch.chdir(tmp_path / "work")
    for bare in ("v1.img", "v1/"):
        err = _one_line_error(capsys, 2, ["image", "clone", str(images.arc1), bare])
        assert "give STORE/NAME" in err
        assert f"--output {bare}" in err
    assert os.listdir(".") == []


@pytest.mark.parametrize("argv", [
    ["image", "compress", "-i", "-", "-o", "x.bdar"],
    ["image", "compress", "-i", "{image}", "-o", "-"],
    ["image", "clone", "-", "store/v1"],
    ["image", "clone", "{archive}", "--output", "-"],
    ["image", "info", "-"],
])
def test_images_refuse_standard_input_and_output(
    images: ImagePair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], argv: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [a.format(image=images.img1, archive=images.arc1) for a in argv]
    assert "by ranges, not as a stream" in _one_line_error(capsys, 2, argv)
    assert list(tmp_path.iterdir()) == []  # no file named '-' (or anything else) made


def test_compress_never_writes_through_a_planted_symlink(
    images: ImagePair, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not overwrite")
    out = tmp_path / "out.bdar"
    # the temporary names a local user could predict (the old code opened OUT.tmp-PID)
    for name in (f"out.bdar.tmp-{os.getpid()}", f".out.bdar.tmp-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)
    assert main(["image", "compress", "-i", str(images.img1), "-o", str(out),
                 "--avg-chunk", "16K"]) == 0
    assert victim.read_bytes() == b"do not overwrite"
    assert out.read_bytes() == images.arc1.read_bytes()


def _as_nobody(*argv: str) -> list[str]:
    return [*nobody_python(), "-m", "btrdelta", *argv]


def test_mount_as_a_user_without_fuse_access_is_one_line(
    images: ImagePair, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        if os.environ.get("CI") == "true":
            pytest.fail("root and setpriv are required under CI")
        pytest.skip("needs root (to drop privileges with setpriv)")
    if os.access("/dev/fuse", os.R_OK | os.W_OK, effective_ids=False) and \
            os.stat("/dev/fuse").st_mode & 0o006:
        pytest.skip("/dev/fuse is open to every user here: nothing to refuse")
    base = Path(tempfile.mkdtemp(prefix="btrdelta-nobody-", dir="/tmp"))
    try:
        base.chmod(0o755)
        assert main(["image", "clone", str(images.arc1), f"{base}/store/v1"]) == 0
        for p in [base / "store", *(base / "store").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (base / "mnt").mkdir()
        (base / "mnt").chmod(0o755)  # (whatever the umask: nobody reaches it, as root's)
        proc = subprocess.run(
            _as_nobody("image", "mount", f"{base}/store/v1",
                       str(base / "mnt")), capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "FUSE is not available to user 65534" in proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_compress_counts_one_chunk_in_the_singular(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # a small file is one chunk: it said "1 chunks (1 distinct)"
    small = tmp_path / "small"
    small.write_bytes(b"notes\n" * 100)
    capsys.readouterr()
    assert main(["image", "compress", "-i", str(small), "-o", str(tmp_path / "s.bdar")]) == 0
    out = capsys.readouterr().out
    assert ", 1 chunk (1 distinct), archive " in out, out


def test_ctrl_c_while_the_server_stalls_in_a_range_stops_at_once(
    images: ImagePair, tmp_path: Path, children: Children
) -> None:
    """Ctrl-C while the fetch threads wait for a stalled server's next byte (each range of
    chunks: its head and 100 bytes, then nothing): exit 130 and one line at once. Before,
    the clone waited for the reads' timeout (``--timeout``, 20 s here), then printed a retry
    line per thread."""
    import threading

    from btrdelta.chunk.archive import HEADER_SIZE, decode_header
    from tests.transport.hostile import HostileServer

    data = images.arc2.read_bytes()
    chunks_end = decode_header(data[:HEADER_SIZE], source="test").index_offset
    stalled, release = threading.Event(), threading.Event()

    def reply(sock: socket.socket, _path: str, headers: dict[str, str]) -> None:
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        body = data[first : last + 1]
        head = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n").encode()
        if not HEADER_SIZE <= first < chunks_end:  # the header, the index: whole
            sock.sendall(head + body)
            return
        sock.sendall(head + body[:100])
        stalled.set()
        release.wait(60)

    server = HostileServer(reply)
    with server.running():
        try:
            proc = children.start(
                [sys.executable, "-m", "btrdelta", "image", "clone", f"{server.url}/v2.bdar",
                 f"{tmp_path}/store/v2", "--timeout", "20", "-j", "2"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            assert stalled.wait(60), "no range of chunks was asked for"
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - t0
        finally:
            release.set()
    assert proc.returncode == 130, err
    assert err == "btrdelta image clone: interrupted\n"
    assert took < 5, took
