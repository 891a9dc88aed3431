"""``btrdelta serve`` against requests that used to crash or abuse it, and its start-up
errors. Each test failed before the hardening (thread crash, 64 copies, no idle timeout,
Nagle stalls, a bare "Address already in use")."""

from __future__ import annotations

import http.client
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.transport.server import StaticServer
from tests.conftest import Children

SIZE = 300_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StaticServer]:
    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * (SIZE // 256) + b"x" * (SIZE % 256))
    lines: list[str] = []
    srv = StaticServer(tmp_path, log=lines.append, idle_timeout=0.5)
    with srv.running():
        yield srv
    assert not [line for line in lines if "error in handler" in line]


@pytest.fixture
def conn(server: StaticServer) -> Iterator[http.client.HTTPConnection]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(str(host), int(port), timeout=10)
    yield connection
    connection.close()


def test_nul_in_path_is_404_and_the_connection_lives(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/f.bin%00.txt")
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    conn.request("GET", "/f.bin", headers={"Range": "bytes=0-9"})  # same connection
    assert conn.getresponse().read() == bytes(range(10))


@pytest.mark.parametrize(("spec", "status", "body"), [
    ("bytes=" + "9" * 5000 + "-", 416, b""),
    ("bytes=0-" + "9" * 5000, 206, None),  # to the end
    ("bytes=-" + "9" * 5000, 206, None),   # the last 10**5000 bytes: all of them
])
def test_huge_range_numbers(conn: http.client.HTTPConnection, spec: str, status: int,
                            body: bytes | None) -> None:
    conn.request("GET", "/f.bin", headers={"Range": spec})
    resp = conn.getresponse()
    assert resp.status == status
    data = resp.read()
    if body is None:
        assert len(data) == SIZE
        assert resp.getheader("Content-Range") == f"bytes 0-{SIZE - 1}/{SIZE}"


def test_overlapping_ranges_are_coalesced(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/f.bin", headers={"Range": "bytes=" + ",".join(["0-99999"] * 64)})
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes 0-99999/{SIZE}"
    assert len(data) == 100_000
    # separate ranges still come as multipart, in offset order, neighbours merged
    conn.request("GET", "/f.bin", headers={"Range": "bytes=5000-5009,0-9,20-29"})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.getheader("Content-Type").startswith("multipart/byteranges")
    assert body.count(b"Content-Range:") == 2
    assert b"Content-Range: bytes 0-29/" in body
    assert b"Content-Range: bytes 5000-5009/" in body


def test_idle_connection_is_closed(server: StaticServer) -> None:
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server, not our 5 s timeout
        assert time.monotonic() - start < 3


def test_keep_alive_requests_do_not_stall(conn: http.client.HTTPConnection) -> None:
    # headers and sendfile body are two writes: with Nagle on, each small reply waited for
    # the client's delayed ACK (~40 ms); with TCP_NODELAY a request takes well under that
    times = []
    for i in range(30):
        start = time.perf_counter()
        conn.request("GET", "/f.bin", headers={"Range": f"bytes={i * 100}-{i * 100 + 99}"})
        assert len(conn.getresponse().read()) == 100
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.02, times


def test_serve_start_up_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"btrdelta serve: error: cannot listen on 127.0.0.1:{port}: address "
                       "already in use (another server on that port?)"]
    assert main(["serve", str(tmp_path), "--port", "0", "--bind", "no-such-host.invalid"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "cannot listen on no-such-host.invalid:0: unknown host" in err[0]
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 1
    assert "nope': does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x\n")
    assert main(["serve", str(tmp_path / "file"), "--port", "0"]) == 1
    assert "file': not a directory" in capsys.readouterr().err
    for bad in (["--port", "70000"], ["--port", "http"], ["--idle-timeout", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["serve", str(tmp_path), *bad])
        assert info.value.code == 2
        assert "error: argument" in capsys.readouterr().err


def test_serve_says_where_clients_find_it(tmp_path: Path, children: Children) -> None:
    """A wildcard bind is not an address a client can use: the start line names the port
    and this host; the last line counts requests in the singular for one."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    (tmp_path / "f").write_bytes(b"hello")
    proc = children.start([sys.executable, "-m", "btrdelta", "serve", str(tmp_path),
                           "--port", "0", "--bind", "0.0.0.0"],
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    first = proc.stderr.readline()
    port = int(first.split("port ")[1].split()[0])
    assert first.strip() == (f"serving {tmp_path} on port {port} of every address of "
                             f"this host (e.g. http://{socket.gethostname()}:{port}/)")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/f", timeout=10) as resp:
        assert resp.read() == b"hello"
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert rest.strip().splitlines()[-1] == "stopped: 1 request, 5 bytes served"


def test_a_repository_page_opens_in_a_browser(tmp_path: Path) -> None:
    """docs/repository.md: serve the directory and open .../app/index.html in a browser. It
    came as application/octet-stream, which a browser downloads instead of showing; and the
    repository's own URL (.../app/) was a 404."""
    (tmp_path / "app").mkdir()
    page = b"<!DOCTYPE html><title>r</title>"
    (tmp_path / "app" / "index.html").write_bytes(page)
    (tmp_path / "app" / "timestamp.json").write_bytes(b"{}")
    (tmp_path / "app" / "x.pack").write_bytes(b"\0" * 10)
    srv = StaticServer(tmp_path, log=lambda line: None)
    with srv.running():
        host, port = srv.server_address[:2]
        c = http.client.HTTPConnection(str(host), int(port), timeout=10)
        try:
            for path, headers, want_type, want in (
                ("/app/index.html", {}, "text/html; charset=utf-8", page),
                ("/app/", {}, "text/html; charset=utf-8", page),
                ("/app/timestamp.json", {}, "application/json", b"{}"),
                ("/app/x.pack", {"Range": "bytes=0-1"}, "application/octet-stream", b"\0\0"),
            ):
                c.request("GET", path, headers=headers)
                resp = c.getresponse()
                assert (resp.getheader("Content-Type"), resp.read()) == (want_type, want), path
            c.request("GET", "/app")  # no directory listing, no index without the slash
            resp = c.getresponse()
            resp.read()
            assert resp.status == 404
        finally:
            c.close()


def test_hidden_files_are_not_served(tmp_path: Path) -> None:
    """A repository's directory served whole holds the publisher's state (REPO/.btrdelta:
    its catalog, temporary files) that no client needs; nor should a .git or a key beside
    it go out. Every path with a component starting with '.' is a 404, encoded or not."""
    (tmp_path / ".btrdelta").mkdir()
    (tmp_path / ".btrdelta" / "catalog.json").write_bytes(b"{}")
    (tmp_path / ".key").write_bytes(b"secret")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".hidden").write_bytes(b"x")
    (tmp_path / "ok.json").write_bytes(b"{}")
    srv = StaticServer(tmp_path, log=lambda line: None)
    with srv.running():
        host, port = srv.server_address[:2]
        c = http.client.HTTPConnection(str(host), int(port), timeout=10)
        try:
            for path in ("/.btrdelta/catalog.json", "/%2Ebtrdelta/catalog.json", "/.key",
                         "/sub/.hidden", "/sub/%2ehidden", "/sub/../.key", "/./ok.json"):
                c.request("GET", path)
                resp = c.getresponse()
                assert (resp.status, resp.read()) == (404, b""), path
            c.request("GET", "/ok.json")
            resp = c.getresponse()
            assert (resp.status, resp.read()) == (200, b"{}")
        finally:
            c.close()


def test_the_request_log_reaches_a_file_while_serving(tmp_path: Path, children: Children) -> None:
    """stderr into a file (not a terminal, no PYTHONUNBUFFERED): each request's line is in
    the file while the server still runs, as a user tailing it expects (session 29 saw
    lines late: each is written once its reply is sent, so right after a client read the
    reply its line may still be on the way; none waits for a buffer to fill)."""
    import os
    import signal
    import sys
    import time
    import urllib.request

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f").write_bytes(b"hello")
    log = tmp_path / "access.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(log, "wb") as out:
        proc = children.start([sys.executable, "-m", "btrdelta", "serve",
                               str(tmp_path / "www"), "--port", "0"], stderr=out, env=env)
    deadline = time.monotonic() + 30
    while "serving " not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    port = int(log.read_text().split("http://127.0.0.1:")[1].split("/")[0])
    for n in range(1, 4):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/f", timeout=10) as resp:
            assert resp.read() == b"hello"
        deadline = time.monotonic() + 5
        while log.read_text().count(" GET /f 200 5\n") < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.read_text().count(" GET /f 200 5\n") == n, log.read_text()
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_a_request_path_with_control_characters_is_logged_escaped(tmp_path: Path) -> None:
    """A client's request target is its own text: one with an ESC wrote terminal codes
    into ``serve``'s log (the stdlib escapes them in its own log lines; this log did
    not). Now escaped, as ``repr`` writes them; the request is answered as before."""
    lines: list[str] = []
    srv = StaticServer(tmp_path, log=lines.append, idle_timeout=2)
    with srv.running():
        host, port = srv.server_address[:2]
        with socket.create_connection((str(host), int(port)), timeout=10) as s:
            s.sendall(b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 404 ")
    assert [line.split(" ", 1)[1] for line in lines] == ["GET /\\x1b[31mred\\x07 404 0"], lines
