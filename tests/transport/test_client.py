"""The HTTP/1.1 client (transport/client.py) against servers that answer in each framing
HTTP allows, or break it: what it reads is what was sent, keep-alive connections are reused
(and one the server closed meanwhile is replaced), a malformed reply is one error; and its
import costs nothing the CLI has not loaded (httpx took 40-60 ms)."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.transport.client import (
    Client,
    InvalidURL,
    RemoteProtocolError,
    TooManyRedirects,
    UnsupportedResponse,
)
from btrdelta.transport.server import StaticServer

from .hostile import HostileServer

BODY = bytes(range(256)) * 300


def _send(sock: socket.socket, head: str, body: bytes = b"") -> None:
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)


def _chunked(data: bytes, size: int) -> bytes:
    out = b"".join(b"%x;ext=1\r\n" % len(data[i : i + size]) + data[i : i + size] + b"\r\n"
                   for i in range(0, len(data), size))
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


def test_bodies_in_every_framing_and_connections_reused() -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        if path == "/length":
            _send(sock, f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\n", BODY)
        elif path == "/chunked":
            _send(sock, "HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n", _chunked(BODY, 1000))
        elif path == "/continue":  # an informational reply first, bare LF line ends
            sock.sendall(b"HTTP/1.1 100 Continue\n\nHTTP/1.1 204 No Content\nX-A: 1\nx-a: 2\n\n")
        else:  # up to the connection's close
            _send(sock, "HTTP/1.0 200 OK\n", BODY)
            sock.close()

    with HostileServer(reply).running() as server, Client(max_connections=2) as client:
        for path in ("/length", "/chunked", "/length", "/chunked"):
            assert client.get(f"{server.url}{path}") == (200, BODY)
        with client.stream("GET", f"{server.url}/continue") as resp:
            assert resp.status_code == 204
            assert resp.headers["X-A"] == "1, 2"
            assert resp.read() == b""
        assert client.get(f"{server.url}/close") == (200, BODY)
        assert client.get(f"{server.url}/length") == (200, BODY)
    # one connection for the kept-alive requests, a second after the close
    assert len(server.connections) == 2
    assert [p for p, _ in server.seen].count("/length") == 3


def test_a_kept_connection_closed_by_the_server_is_replaced() -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _send(sock, f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\n", BODY)
        if path == "/then-close":  # keep-alive announced, then closed (a server's timeout)
            sock.shutdown(socket.SHUT_RDWR)

    with HostileServer(reply).running() as server, Client() as client:
        assert client.get(f"{server.url}/then-close") == (200, BODY)
        assert client.get(f"{server.url}/next") == (200, BODY)
    # seen closed before it was used, or asked on it before the close arrived (the server
    # read it, but could not answer) and asked again on a new one
    paths = [p for p, _ in server.seen]
    assert paths[:2] == ["/then-close", "/next"], paths
    assert paths[2:] in ([], ["/next"]), paths
    assert len(server.connections) == 2


@pytest.mark.parametrize(("head", "body", "error", "text"), [
    ("HTTP/1.1 200 OK\nContent-Length: 10\n", b"12345", RemoteProtocolError,
     "5 bytes into a body of 10"),
    ("HTTP/1.1 200 OK\nContent-Length: 10, 11\n", b"", RemoteProtocolError,
     "bad Content-Length"),
    ("HTTP/1.1 200 OK\nContent-Length: -1\n", b"", RemoteProtocolError, "bad Content-Length"),
    ("HTTP/1.1 200 OK\nTransfer-Encoding: gzip, chunked\n", b"", UnsupportedResponse,
     "Transfer-Encoding 'gzip, chunked' not supported"),
    ("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n", b"zz\r\n", RemoteProtocolError,
     "bad chunk size"),
    ("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n", b"5\r\n12345XX\r\n", RemoteProtocolError,
     "not followed by its line end"),
    ("HTTP/1.1 200 OK\nX: " + "a" * (70 << 10) + "\n", b"", RemoteProtocolError,
     "reply headers longer than 65536 bytes"),
    ("HTTP/1.1 200 OK\n" + "X: 1\n" * 200, b"", RemoteProtocolError,
     "more than 128 header fields"),
    ("ICY 200 OK\n", b"", RemoteProtocolError, "not an HTTP/1.x status line"),
    ("HTTP/1.1 302 Found\nLocation: http://[::1/x\n", b"", RemoteProtocolError,
     "a redirect to a bad URL 'http://[::1/x'"),
    ("HTTP/1.1 301 x\nLocation: gopher://h/\n", b"", RemoteProtocolError,
     "a redirect to a bad URL 'gopher://h/'"),
    ("HTTP/1.1 200 OK\n folded: no\n", b"", RemoteProtocolError, "malformed header field"),
])
def test_a_malformed_reply_is_one_error(head: str, body: bytes, error: type[Exception],
                                        text: str) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _send(sock, head, body)
        sock.close()

    with HostileServer(reply).running() as server, Client() as client, \
            pytest.raises(error) as info:
        client.get(f"{server.url}/x")
    assert text in str(info.value)
    assert "\n" not in str(info.value)


def test_redirects_keep_credentials_on_their_origin_only() -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        if path == "/a":
            _send(sock, "HTTP/1.1 301 Moved\nLocation: /b?q=1\nContent-Length: 3\n", b"abc")
        elif path.startswith("/b"):
            _send(sock, f"HTTP/1.1 302 Found\nLocation: {other.url}/c\nContent-Length: 0\n")
        else:
            _send(sock, "HTTP/1.1 200 OK\nContent-Length: 2\n", b"ok")

    other = HostileServer(reply)
    with HostileServer(reply).running() as server, other.running(), \
            Client(headers={"Authorization": "Bearer t", "X-Token": "k"}) as client:
        assert client.get(f"{server.url}/a") == (200, b"ok")
        assert [(p, h.get("authorization")) for p, h in server.seen] == [
            ("/a", "Bearer t"), ("/b?q=1", "Bearer t")]
        assert [(p, h.get("authorization"), h.get("x-token")) for p, h in other.seen] == [
            ("/c", None, "k")]
        with Client(follow_redirects=False) as plain:
            assert plain.get(f"{server.url}/a") == (301, b"abc")
        with Client(max_redirects=1) as short, pytest.raises(TooManyRedirects):
            short.get(f"{server.url}/a")
    user = base64.b64encode(b"me:p w").decode()
    with HostileServer(reply).running() as server, Client() as client:
        assert client.get(server.url.replace("//", "//me:p%20w@") + "/c") == (200, b"ok")
        assert server.seen[0][1]["authorization"] == f"Basic {user}"
        assert server.seen[0][1]["host"] == server.url.removeprefix("http://")
        assert server.seen[0][1]["accept-encoding"] == "identity"
        with Client(headers={"Host": "example.org"}) as named:  # a virtual host, by IP
            assert named.get(f"{server.url}/c") == (200, b"ok")
        assert server.seen[1][1]["host"] == "example.org"


@pytest.mark.timeout(20)
def test_header_values_are_trimmed_and_long_blank_runs_parsed_in_linear_time() -> None:
    # (a lazy value before optional blanks took ~7 s of CPU on 60,000 blanks: a server
    # could stall the client per reply; now well under a millisecond)
    inner = "a" + " " * 60_000 + "b"
    trickled = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: \t v \t\r\nX-Long: " \
        + inner.encode() + b"\r\n\r\nok"

    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(trickled), 4096):  # in pieces: the end found across them
            sock.sendall(trickled[i : i + 4096])

    with HostileServer(reply).running() as server, Client() as client:
        for _ in range(20):
            with client.stream("GET", f"{server.url}/h") as resp:
                assert resp.read() == b"ok"
                assert resp.headers["x-pad"] == "v"
                assert resp.headers["x-long"] == inner


@pytest.mark.parametrize("url", ["ftp://example.org/x", "http:///x", "http://h:99999/",
                                 "http://h/a b\r\nX: y", "http://a..\u65e5\u672c/x",
                                 "https://\u65e5" + "x" * 70 + ".example/"])
def test_a_bad_url_is_refused_before_connecting(url: str) -> None:
    with Client() as client, pytest.raises(InvalidURL):
        client.get(url)


@pytest.mark.parametrize("value", ["\u65e5\u672c", "a\tb", "caf\u00e9"])
def test_a_header_that_is_not_printable_ascii_is_refused(value: str) -> None:
    with pytest.raises(InvalidURL, match="not printable ASCII"):
        Client(headers={"X-Token": value})


def test_an_internationalised_host_goes_on_the_wire_in_its_ascii_form(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _send(sock, "HTTP/1.1 200 OK\nContent-Length: 2\n", b"ok")

    for name in ("no_proxy", "NO_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    with HostileServer(reply).running() as server:  # the proxy: it sees the name as sent
        monkeypatch.setenv("http_proxy", server.url)
        with Client() as client:
            assert client.get("http://B\u00fccher.\u65e5\u672c.example:8080/p\u00e4th") \
                == (200, b"ok")
    (path, headers), = server.seen
    assert path == "http://xn--bcher-kva.xn--wgv71a.example:8080/p%C3%A4th"
    assert headers["host"] == "xn--bcher-kva.xn--wgv71a.example:8080"


_CODE = """
import sys
from btrdelta.chunk import castr
from btrdelta.repo.mirror import Mirrors
from btrdelta.transport import client, config, http, pacing
from btrdelta.update import versions
from btrdelta.cli import update_cmd
m = Mirrors([sys.argv[1]])
assert m.client.get(sys.argv[2]) == (200, b"hello")
m.close()
heavy = ("httpx", "httpcore", "h11", "http.client", "email", "urllib.request", "ssl")
print(*(name for name in heavy if name in sys.modules))
"""


def test_a_plain_http_fetch_imports_no_http_library_nor_ssl(tmp_path: Path) -> None:
    (tmp_path / "hi").write_bytes(b"hello")
    server = StaticServer(tmp_path)
    with server.running():
        out = subprocess.run([sys.executable, "-c", _CODE, server.url, f"{server.url}/hi"],
                             capture_output=True, text=True, check=True).stdout
    assert out.split() == []


@pytest.mark.parametrize(("status", "early"), [(501, True), (201, False), (100, False)])
def test_an_answer_before_the_whole_body_is_taken_only_as_a_refusal(
        status: int, early: bool, tmp_path: Path) -> None:
    """A server that answers a ``PUT`` before it read the body and closes: its refusal (a
    4xx or 5xx) says why the body was not taken; a success, or nothing final, for a body it
    never read is the broken connection's error, not a request that succeeded."""
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        _send(sock, f"HTTP/1.1 {status} Whatever\nContent-Length: 0\n")
        sock.close()  # (unread data: a reset)

    body = tmp_path / "body"
    body.write_bytes(bytes(64 << 20))  # (more than the sockets' buffers)
    with HostileServer(reply).running() as server, Client() as client, \
            body.open("rb") as content:
        if early:
            with client.stream("PUT", f"{server.url}/x", content=content) as resp:
                assert resp.status_code == status
        else:
            with pytest.raises(RemoteProtocolError) as info, \
                    client.stream("PUT", f"{server.url}/x", content=content):
                pass
            assert "\n" not in str(info.value)
