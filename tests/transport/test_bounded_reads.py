"""Hostile servers: every read is bounded by what was asked, a trickle hits the deadline,
a redirect loop is one line; memory stays bounded (the CLI runs under ``RLIMIT_AS``)."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from btrdelta.chunk.archive import ArchiveHeader, encode_header
from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.transport.plan import parse_range_header

from .hostile import HostileServer, endless, trickle

#: address space for the CLI process: far below the 6+ GB these replies used to take
MEMORY_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _clone(url: str, tmp_path: Path, *extra: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "btrdelta", "image", "clone", url, f"{tmp_path}/store/img",
         "--retries", "1", "--retry-max-wait", "0.1", *extra],
        capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory, check=False)


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> str:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert err[-1].startswith("btrdelta image clone: error: "), proc.stderr
    assert text in err[-1], proc.stderr
    # anything before the error is one line per retry
    assert all(" attempt " in line for line in err[:-1]), proc.stderr
    return err[-1]


def _status(sock: socket.socket, head: str) -> None:
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")


def test_huge_announced_reply_to_the_header_request(tmp_path: Path) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _status(sock, f"HTTP/1.1 206 Partial Content\nContent-Range: bytes 0-159/{3 << 30}\n"
                      f"Content-Length: {3 << 30}\n")
        endless(sock)

    with HostileServer(reply).running() as server:
        proc = _clone(f"{server.url}/a.bdar", tmp_path)
    line = _one_line_error(proc, 7, f"reply of {3 << 30} bytes announced for 160 bytes asked")
    assert server.url in line


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_endless_reply_is_cut_off(tmp_path: Path, framing: str) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        extra = "Transfer-Encoding: chunked\n" if framing == "chunked" else "Connection: close\n"
        _status(sock, f"HTTP/1.1 206 Partial Content\nContent-Range: bytes 0-159/1000\n{extra}")
        endless(sock, b"10000\r\n" + b"\0" * 65536 + b"\r\n" if framing == "chunked"
                else b"\0" * 65536)

    with HostileServer(reply).running() as server:
        proc = _clone(f"{server.url}/a.bdar", tmp_path)
    _one_line_error(proc, 7, "reply longer than the 160 bytes asked; cut off")


def test_trickling_server_hits_the_deadline(tmp_path: Path) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        head = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-159/1000\r\n" \
               "Content-Length: 160\r\n\r\n"
        # the status line and headers too: ~50 s for the whole reply without a deadline
        trickle(sock, head.encode(), every=0.2, limit=60)

    with HostileServer(reply).running() as server:
        start = time.monotonic()
        proc = _clone(f"{server.url}/a.bdar", tmp_path, "--timeout", "1", "--retries", "0")
        took = time.monotonic() - start
    _one_line_error(proc, 7, "server too slow: ")
    # a 1 s deadline, plus start-up (seconds on a loaded machine): far below the ~50 s the
    # reply takes without one
    assert took < 25
    assert len(server.seen) == 1


def test_redirect_loop_is_one_line(tmp_path: Path) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _status(sock, f"HTTP/1.1 302 Found\nLocation: {path}x\nContent-Length: 0\n")

    with HostileServer(reply).running() as server:
        proc = _clone(f"{server.url}/a.bdar", tmp_path)
    _one_line_error(proc, 7, "more than 10 redirects (a redirect loop?)")
    assert len(server.seen) == 11


def _huge_index_header() -> bytes:
    params = ChunkerParams.from_avg(64 << 10)
    order = (3 << 30) // 4  # a 3 GiB order table, consistent with the image size
    return encode_header(ArchiveHeader(
        params=params, image_size=order * params.min_size, chunk_count=1, order_count=order,
        index_offset=4096, image_digest=b"\1" * 32, signed=True))


@pytest.mark.parametrize("with_key", [False, True])
def test_index_size_is_bounded_before_it_is_read(tmp_path: Path, with_key: bool) -> None:
    header = _huge_index_header()
    total = 4096 + 48 + (3 << 30) + 64  # what the header claims, so the sizes agree

    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        ranges = parse_range_header(headers["range"], total)
        assert ranges
        start, end = ranges[0]
        _status(sock, f"HTTP/1.1 206 Partial Content\nContent-Length: {end - start}\n"
                      f"Content-Range: bytes {start}-{end - 1}/{total}\n")
        if start == 0:
            sock.sendall(header[: end - start])
        else:
            endless(sock)

    key = tmp_path / "k.pem"
    key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with HostileServer(reply).running() as server:
        proc = _clone(f"{server.url}/a.bdar", tmp_path,
                      *(["--key", str(key)] if with_key else []))
    _one_line_error(proc, 3, "exceeds the 268435456-byte limit (not read)")
    assert [h["range"] for _, h in server.seen] == ["bytes=0-159"]


def test_header_disagreeing_with_the_served_size(tmp_path: Path) -> None:
    header = _huge_index_header()

    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _status(sock, "HTTP/1.1 206 Partial Content\nContent-Length: 160\n"
                      "Content-Range: bytes 0-159/5000\n")
        sock.sendall(header)

    with HostileServer(reply).running() as server:
        proc = _clone(f"{server.url}/a.bdar", tmp_path)
    _one_line_error(proc, 3, "archive is 5000 bytes, its header says")
