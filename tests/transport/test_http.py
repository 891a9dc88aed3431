"""Fetching against real local servers: ours, and a flaky one that misbehaves on purpose."""

from __future__ import annotations

import email
import http.client
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.chunk.chunker import ChunkerParams, chunk_digest
from btrdelta.chunk.compress import compress_image
from btrdelta.chunk.source import HttpSource
from btrdelta.chunk.store import ChunkStore
from btrdelta.errors import StreamFormatError, TransportError
from btrdelta.transport.config import HttpConfig
from btrdelta.transport.http import RangeFetcher
from btrdelta.transport.plan import parse_range_header
from btrdelta.transport.server import StaticRequestHandler, StaticServer
from btrdelta.update.clone import clone_image

PARAMS = ChunkerParams.from_avg(4096)


class FlakyHandler(StaticRequestHandler):
    """Misbehaves while ``server.faults`` is positive (or always, for some modes)."""

    server: FlakyServer

    def _serve(self, *, body: bool) -> None:
        mode = self.server.take_fault(multi="," in (self.headers.get("Range") or ""))
        if mode is None:
            super()._serve(body=body)
            return
        self.server.fault_log.append(mode)
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if mode == "500":
            self._error(500)  # type: ignore[arg-type]
            return
        path = self._resolve()
        assert path is not None
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if mode in ("norange", "nomulti"):
                self._send_whole(f, size, body)
                return
            if mode == "truncate":  # a 206 whose body stops half way
                ranges = parse_range_header(self.headers["Range"], size)
                assert ranges
                start, end = ranges[0]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                f.seek(start)
                self.wfile.write(f.read((end - start) // 2))
                self.close_connection = True
                return
        raise AssertionError(mode)


class FlakyServer(StaticServer):
    def __init__(self, root: Path, mode: str, faults: int) -> None:
        super().__init__(root, handler=FlakyHandler)
        self.mode = mode
        self.faults = faults
        self.fault_log: list[str] = []
        self._flock = threading.Lock()

    def take_fault(self, *, multi: bool) -> str | None:
        with self._flock:
            if self.mode == "norange":
                return "norange"
            if self.mode == "nomulti":
                return "nomulti" if multi else None
            if self.faults <= 0:
                return None
            self.faults -= 1
            return self.mode


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    base = tmp_path_factory.mktemp("flaky")
    data = b"".join(Path(p).read_bytes()
                    for p in sorted(Path(email.__file__).parent.glob("*.py")))[: 256 << 10]
    img = base / "img"
    img.write_bytes(data)
    with open(base / "img.bdar", "wb") as f:
        compress_image(img, f, params=PARAMS)
    return base, data


def _flaky(root: Path, mode: str, faults: int = 3) -> Iterator[FlakyServer]:
    server = FlakyServer(root, mode, faults)
    with server.running():
        yield server


def _clone(url: str, store: ChunkStore, **kw):  # type: ignore[no-untyped-def]
    fetcher = RangeFetcher(url, HttpConfig(backoff=0.01, jobs=3),
                           max_ranges=kw.pop("max_ranges", 16))
    src = HttpSource(url, fetcher)
    try:
        return clone_image(src, target=f"{store.root}/img", **kw)
    finally:
        src.close()


def _preload_every_other_chunk(arc: Path, store: ChunkStore) -> None:
    """Store half the chunks so the rest form many separate ranges (multi-range requests)."""
    import zstandard

    from btrdelta.chunk.archive import decode_header, decode_index

    blob = arc.read_bytes()
    h = decode_header(blob)
    index = decode_index(h, blob[h.index_offset : h.index_offset + h.index_size])
    for e in range(0, h.chunk_count, 2):
        frame = blob[index.offsets[e] : index.offsets[e] + index.comp_sizes[e]]
        store.put(index.digests[e], zstandard.ZstdDecompressor().decompress(frame))
    store.sync()


def _store_is_clean(store: ChunkStore) -> None:
    for digest, path in store.iter_chunks():
        assert chunk_digest(Path(path).read_bytes()) == digest


@pytest.mark.parametrize("mode", ["drop", "500", "truncate", "norange", "nomulti"])
def test_clone_survives_misbehaving_server(archive, mode: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, data = archive
    for server in _flaky(root, mode):
        store = ChunkStore(tmp_path / "store")
        _preload_every_other_chunk(root / "img.bdar", store)
        out = tmp_path / "out"
        report = _clone(f"{server.url}/img.bdar", store, output=str(out), max_ranges=4)
        assert out.read_bytes() == data
        assert server.fault_log, "the fault was never injected"
        if mode in ("drop", "500", "truncate"):
            assert report.requests > 3
        assert report.full_download == (mode == "norange")
        _store_is_clean(store)


def test_permanent_failure_is_a_clear_error(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = archive
    for server in _flaky(root, "500", faults=10**6):
        with pytest.raises(TransportError, match="giving up after 6 attempts: HTTP 500"):
            _clone(f"{server.url}/img.bdar", ChunkStore(tmp_path / "s"))
    for server in _flaky(root, "500", faults=0):
        with pytest.raises(TransportError, match="404"):
            _clone(f"{server.url}/missing.bdar", ChunkStore(tmp_path / "s"))


def test_retries_wait_exponentially_with_jitter_then_succeed(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A range that fails 3 times is fetched at the 4th attempt; before attempt n + 1 the
    fetcher waits backoff * 2 ** (n - 1) seconds (at most retry_max_wait) plus up to one
    backoff at random, and says so in one line each."""
    import re
    import time

    root, data = archive
    lines: list[str] = []
    for server in _flaky(root, "500", faults=3):
        fetcher = RangeFetcher(f"{server.url}/img", HttpConfig(backoff=0.1, retry_max_wait=0.25,
                                                               retries=5), log=lines.append)
        t = time.monotonic()
        try:
            assert fetcher.get_range(100, 5000) == data[100:5000]
        finally:
            fetcher.close()
        took = time.monotonic() - t
        assert server.fault_log == ["500"] * 3
    assert [re.sub(r" in [0-9.]+ s$", "", line).split("; ")[1] for line in lines] == \
        [f"attempt {n} of 6" for n in (2, 3, 4)]
    waits = [float(re.findall(r" in ([0-9.]+) s$", line)[0]) for line in lines]
    for wait, low in zip(waits, (0.1, 0.2, 0.25), strict=True):  # (the third one capped)
        assert low - 0.05 <= wait <= low + 0.1 + 0.05, (wait, low)
    assert took >= 0.55
    assert fetcher.stats.retries == 3


def test_corrupted_chunk_from_server_is_refused(archive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = archive
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    arc = bytearray((root / "img.bdar").read_bytes())
    arc[200] ^= 0xFF  # inside the first compressed chunk
    (bad_root / "img.bdar").write_bytes(bytes(arc))
    store = ChunkStore(tmp_path / "store")
    for server in _flaky(bad_root, "500", faults=0):
        with pytest.raises(StreamFormatError) as info:  # zstd frame check or BLAKE3
            _clone(f"{server.url}/img.bdar", store)
        assert "chunk 0" in str(info.value)
    _store_is_clean(store)
    assert not (tmp_path / "store" / "img").exists()


def test_static_server_ranges_match_file(archive) -> None:  # type: ignore[no-untyped-def]
    root, _ = archive
    blob = (root / "img.bdar").read_bytes()
    lines: list[str] = []
    server = StaticServer(root, log=lines.append)
    with server.running():
        # the standard library's client, an oracle independent of ours
        host, port = server.server_address[:2]
        client = http.client.HTTPConnection(str(host), int(port), timeout=30)

        def get(path: str, method: str = "GET", **headers: str
                ) -> tuple[int, http.client.HTTPMessage, bytes]:
            client.request(method, path, headers=headers)
            r = client.getresponse()
            return r.status, r.headers, r.read()

        status, headers, body = get("/img.bdar", Range="bytes=10-19")
        assert status == 206
        assert body == blob[10:20]
        assert headers["content-range"] == f"bytes 10-19/{len(blob)}"
        status, headers, _ = get("/img.bdar", Range="bytes=0-3,100-103")
        assert status == 206
        assert headers["content-type"].startswith("multipart/byteranges")
        assert get("/img.bdar", Range=f"bytes={len(blob)}-")[0] == 416
        assert get("/img.bdar")[2] == blob
        assert get("/../../etc/passwd")[0] == 404
        assert get("/img.bdar", "HEAD")[1]["content-length"] == str(len(blob))
        client.close()
    assert server.bytes_served == sum(int(line.rsplit(" ", 1)[1]) for line in lines)
    assert any(line.endswith(f" 200 {len(blob)}") for line in lines)


def test_dry_run_against_server_ignoring_range_reports_archive_size(
    archive, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import json

    from btrdelta.cli import main

    root, _ = archive
    size = (root / "img.bdar").stat().st_size
    for server in _flaky(root, "norange"):
        store = ChunkStore(tmp_path / "store")
        report = _clone(f"{server.url}/img.bdar", store, dry_run=True)
        assert report.full_download
        assert report.fetch_bytes == report.archive_size == size
        assert report.bytes_received < size  # the whole body was not downloaded
        assert not list(store.iter_chunks())
        assert not (tmp_path / "store" / "img").exists()
        capsys.readouterr()
        assert main(["image", "clone", "--dry-run", f"{server.url}/img.bdar",
                     f"{tmp_path}/store/img"]) == 0
        out = capsys.readouterr().out
        assert "ignores Range" in out
        assert main(["image", "clone", "--dry-run", "--json", f"{server.url}/img.bdar",
                     f"{tmp_path}/store/img"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["full_download"] is True
        assert got["fetch_bytes"] == size
        assert not (tmp_path / "store" / "img").exists()


def test_server_ignoring_range_with_a_bad_archive_names_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that ignores Range is downloaded whole into a temporary file; an error in
    what it sent names the URL, not that temporary file (was: '.tmp-download-…: offset 18:
    archive truncated')."""
    from btrdelta.cli import main

    root = tmp_path / "www"
    root.mkdir()
    (root / "img.bdar").write_bytes(b"<html>log in</html>")
    for server in _flaky(root, "norange"):
        url = f"{server.url}/img.bdar"
        assert main(["image", "clone", "-q", "--retries", "0", url,
                     "--output", str(tmp_path / "out")]) == 3
        err = capsys.readouterr().err
        assert err.startswith(f"btrdelta image clone: error: {url} (downloaded whole"), err
        assert ".tmp-download" not in err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]


def test_ctrl_c_while_batches_are_submitted_cuts_the_started_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that reaches :meth:`RangeFetcher.fetch_spans` inside its first ``submit``
    (``Thread.start`` waits for the new worker, which meanwhile took the batch and stalls in
    a server's body) cancels the started read at once. Before, the interrupt left the ``try``
    that cancels: the mid-session CI of session 31 saw `image clone` print "interrupted"
    and go on for over 60 s, its worker (started, not yet registered with the pool, so not
    joined by its shutdown; joined at the interpreter's exit) retrying into the timeouts."""
    import socket
    import time

    from btrdelta.transport import http as http_mod
    from btrdelta.transport.plan import Part, Span

    from .hostile import HostileServer

    data = bytes(range(256)) * 64
    stalled, release = threading.Event(), threading.Event()

    def reply(sock: socket.socket, _path: str, headers: dict[str, str]) -> None:
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        head = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {last + 1 - first}\r\n"
                f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n").encode()
        sock.sendall(head + data[first : first + 10])
        stalled.set()
        release.wait(60)

    class Interrupted(http_mod.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            super().submit(*args, **kwargs)  # its worker takes the batch; the read stalls
            assert stalled.wait(30), "no range was asked for"
            raise KeyboardInterrupt  # (before submit returned the future)

    monkeypatch.setattr(http_mod, "ThreadPoolExecutor", Interrupted)
    spans = [Span(start, start + 100, (Part(k, start, 100),))
             for k, start in enumerate(range(0, 4000, 1000))]
    lines: list[str] = []
    server = HostileServer(reply)
    with server.running():
        fetcher = RangeFetcher(f"{server.url}/img", HttpConfig(timeout=20, jobs=2, retries=5),
                               max_ranges=1, log=lines.append)
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                fetcher.fetch_spans(spans, lambda span, view: None)
            took = time.monotonic() - t0
        finally:
            release.set()
            fetcher.close()
    assert took < 5, took
    assert lines == []


def test_a_stop_before_the_fetch_is_kept(archive) -> None:  # type: ignore[no-untyped-def]
    """``Mirrors.stop()`` cancels a fetcher made after it; its ``fetch_spans`` used to clear
    that cancel at its start and fetch anyway (rev31). It now fails at once, asking the
    server nothing; a fetch failed by its own batch does not carry over to the next."""
    from btrdelta.repo.mirror import Mirrors
    from btrdelta.transport.plan import Part, coalesce

    root, data = archive
    (root / "plain").write_bytes(data)
    spans = coalesce([Part(i, i * 8192, 100) for i in range(8)], max_span=1)
    server = StaticServer(root)
    with server.running():
        mirrors = Mirrors([server.url], config=HttpConfig(backoff=0.01, jobs=2))
        try:
            good = mirrors.fetcher(server.url, "plain")

            def bad(span: object, got: memoryview) -> None:
                raise StreamFormatError("refused")

            with pytest.raises(StreamFormatError):
                good.fetch_spans(spans, bad)
            got: dict[int, bytes] = {}
            good.fetch_spans(spans, lambda s, b: got.update({s.start: bytes(b)}))
            assert got == {s.start: data[s.start:s.end] for s in spans}
            served = server.bytes_served
            mirrors.stop()
            late = mirrors.fetcher(server.url, "plain")
            with pytest.raises(TransportError, match="cancelled"):
                late.fetch_spans(spans, lambda s, b: None)
            with pytest.raises(TransportError, match="cancelled"):
                good.fetch_spans(spans, lambda s, b: None)
            assert server.bytes_served == served
        finally:
            mirrors.close()
