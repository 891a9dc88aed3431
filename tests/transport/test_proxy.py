"""The client through the environment's proxy (transport/proxy.py, client.py): ``http://``
in absolute form on the proxy's kept connections, ``https://`` in a ``CONNECT`` tunnel with
TLS checked against the origin, ``no_proxy`` as curl reads it, credentials to the proxy only,
and a refusing, dead or misconfigured proxy as one error naming it. The oracles: a dumb
forwarding proxy (tests/transport/forwarder.py) relaying to nginx, a server that records
what reached it."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from btrdelta.transport import proxy
from btrdelta.transport.client import Client, ConnectError, InvalidURL, ProxyRefused
from btrdelta.transport.config import HttpConfig

from .certs import make_certs
from .forwarder import Forwarder
from .hostile import HostileServer
from .nginx import nginx

BODY = bytes(range(256)) * 100
VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
             "ALL_PROXY", "no_proxy", "NO_PROXY", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "f.bin").write_bytes(BODY)
    return root


def test_http_through_the_proxy_absolute_form_credentials_to_it_only(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with nginx(tmp_path / "nginx", f"listen 127.0.0.1:{{port}}; root {www};") as port, \
            Forwarder(user="u s", password="p@ss").running() as fwd:
        monkeypatch.setenv("http_proxy", fwd.url.replace("://", "://u%20s:p%40ss@"))
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # (not for http://)
        with Client() as client:
            assert client.get(f"http://127.0.0.1:{port}/f.bin") == (200, BODY)
            assert client.get(f"http://127.0.0.1:{port}/f.bin?x=1") == (200, BODY)
    assert fwd.seen == [("GET", f"http://127.0.0.1:{port}/f.bin", _basic("u s", "p@ss")),
                        ("GET", f"http://127.0.0.1:{port}/f.bin?x=1", _basic("u s", "p@ss"))]
    assert fwd.down[0] > 2 * len(BODY)  # the bodies came through it


def test_requests_to_two_origins_share_the_proxy_s_kept_connection(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def reply(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        body = f"{path} {headers.get('host')} {headers.get('proxy-authorization')}".encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    with HostileServer(reply).running() as fake:
        monkeypatch.setenv("HTTP_PROXY", fake.url)  # upper case: honoured outside CGI
        with Client() as client:
            assert client.get("http://a.example/x") == (200, b"http://a.example/x a.example None")
            assert client.get("http://b.example:8080/y?q") == \
                (200, b"http://b.example:8080/y?q b.example:8080 None")
    assert len(fake.connections) == 1


def test_https_through_a_connect_tunnel_tls_checked_against_the_origin(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certs(tmp_path / "certs")
    block = f"""listen 127.0.0.1:{{port}} ssl; root {www};
      ssl_certificate {certs.server_cert}; ssl_certificate_key {certs.server_key};"""
    with nginx(tmp_path / "nginx", block) as port, Forwarder(user="u").running() as fwd:
        monkeypatch.setenv("https_proxy", f"u:@127.0.0.1:{fwd.server_address[1]}")
        url = f"https://127.0.0.1:{port}/f.bin"
        with HttpConfig(ca_cert=str(certs.ca)).client() as client:
            assert client.get(url) == (200, BODY)
            assert client.get(url) == (200, BODY)  # (the tunnel kept)
        assert fwd.seen == [("CONNECT", f"127.0.0.1:{port}", _basic("u", ""))]
        assert fwd.down[0] > len(BODY) * 2
        # the origin's certificate is checked, not the proxy's: another CA fails
        with HttpConfig(ca_cert=str(certs.other_ca), retries=0).client() as client, \
                pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(url)


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), [
    ("*", "anything.example", 80, True),
    ("example.com", "example.com", 80, True),
    ("example.com", "www.example.com", 443, True),
    (".example.com", "example.com", 80, True),
    ("example.com", "badexample.com", 80, False),
    ("example.com.", "WWW.Example.COM", 80, True),
    ("a.example, b.example", "b.example", 80, True),
    ("a.example b.example", "b.example", 80, True),
    ("example.com:8080", "example.com", 8080, True),
    ("example.com:8080", "example.com", 80, False),
    ("10.0.0.0/8", "10.1.2.3", 80, True),
    ("10.0.0.0/8", "11.1.2.3", 80, False),
    ("127.0.0.1", "127.0.0.1", 80, True),
    ("localhost", "127.0.0.1", 80, False),  # (names never match an address: curl's rule)
    ("", "127.0.0.1", 80, False),  # loopback not bypassed unless listed
    ("::1", "::1", 80, True),
    ("[::1]:8080", "::1", 8080, True),
    ("fd00::/8", "fd12::1", 80, True),
    ("1.2.3.4", "1.2.3.4.example", 80, False),
])
def test_no_proxy_as_curl_reads_it(monkeypatch: pytest.MonkeyPatch, no_proxy: str, host: str,
                                   port: int, bypassed: bool) -> None:
    monkeypatch.setenv("all_proxy", "proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    proxies = proxy.from_environ()
    assert proxies is not None
    via = proxies.for_url("http", host, port)
    assert (via is None) == bypassed
    if via is not None:
        assert (via.host, via.port, via.variable) == ("proxy.example", 3128, "all_proxy")


def test_variables_lower_case_first_and_httpoxy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert proxy.from_environ() is None
    monkeypatch.setenv("HTTP_PROXY", "http://upper:1")
    monkeypatch.setenv("http_proxy", "http://lower:2")
    monkeypatch.setenv("https_proxy", "")  # empty: unset
    proxies = proxy.from_environ()
    assert proxies is not None
    via = proxies.for_url("http", "h", 80)
    assert via is not None
    assert (via.host, via.port) == ("lower", 2)
    assert proxies.for_url("https", "h", 443) is None
    monkeypatch.delenv("http_proxy")
    monkeypatch.setenv("REQUEST_METHOD", "GET")  # a CGI program: HTTP_PROXY is a header's
    assert proxy.from_environ() is None


def test_a_no_proxy_host_is_reached_directly(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with nginx(tmp_path / "nginx", f"listen 127.0.0.1:{{port}}; root {www};") as port, \
            Forwarder().running() as fwd:
        monkeypatch.setenv("http_proxy", fwd.url)
        monkeypatch.setenv("no_proxy", f"localhost,127.0.0.1:{port}")
        with Client() as client:
            assert client.get(f"http://127.0.0.1:{port}/f.bin") == (200, BODY)
    assert fwd.seen == []


def test_proxy_credentials_not_sent_to_a_direct_origin_after_a_redirect(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def direct(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with HostileServer(direct).running() as there:
        def moved(sock: socket.socket, path: str, headers: dict[str, str]) -> None:
            sock.sendall(f"HTTP/1.1 302 Found\r\nLocation: {there.url}/b\r\n"
                         "Content-Length: 0\r\n\r\n".encode())

        with HostileServer(moved).running() as here, \
                Forwarder(user="me", password="secret").running() as fwd:
            monkeypatch.setenv("http_proxy", fwd.url.replace("://", "://me:secret@"))
            monkeypatch.setenv("no_proxy", f"127.0.0.1:{there.server_address[1]}")
            with Client() as client:
                assert client.get(f"{here.url}/a") == (200, b"ok")
    assert [(m, t) for m, t, _ in fwd.seen] == [("GET", f"{here.url}/a")]
    assert [(p, h.get("proxy-authorization")) for p, h in here.seen] == [("/a", None)]
    assert [(p, h.get("proxy-authorization")) for p, h in there.seen] == [("/b", None)]


def test_a_proxy_asking_for_credentials_is_one_error_naming_it(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    with Forwarder(user="me", password="right").running() as fwd:
        port = fwd.server_address[1]
        monkeypatch.setenv("http_proxy", f"http://me:wrong@127.0.0.1:{port}")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        with Client() as client:
            with pytest.raises(ProxyRefused, match=rf"^the proxy 127\.0\.0\.1:{port} "
                               r"\(http_proxy\) answered the request with 407: proxy "
                               r"credentials needed or wrong"):
                client.get("http://origin.example/x")
            with pytest.raises(ProxyRefused, match=r"\(https_proxy\) answered CONNECT "
                               r"origin\.example:443 with 407: proxy credentials"):
                client.get("https://origin.example/x")
    assert [m for m, _, _ in fwd.seen] == ["GET", "CONNECT"]


def test_a_dead_proxy_is_a_connection_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (closed again: nothing listens)
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{port}")
    with Client() as client:
        for url in ("http://origin.example/", "https://origin.example/"):
            with pytest.raises(ConnectError, match=rf"refused; through the proxy "
                               rf"127\.0\.0\.1:{port} \(ALL_PROXY\)$"):
                client.get(url)


@pytest.mark.parametrize(("name", "value", "text"), [
    ("https_proxy", "socks5://127.0.0.1:1080", "socks5:// proxies are not supported"),
    ("ALL_PROXY", "https://proxy.example", "https:// proxies are not supported"),
    ("http_proxy", "ftp://proxy.example", "unsupported proxy scheme ftp://"),
    ("HTTPS_PROXY", "http://proxy.example:port", "not a proxy URL"),
    ("http_proxy", "http://:3128", "not a proxy URL"),
    ("http_proxy", "http://proxy.example/path", "not a proxy URL"),
    ("https_proxy", "http://user:s3cret@proxy.example:99999", "not a proxy URL"),
])
def test_a_malformed_proxy_variable_is_named(monkeypatch: pytest.MonkeyPatch, name: str,
                                             value: str, text: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidURL, match=f"^{name}=.*{text}") as caught:
        Client()
    assert "s3cret" not in str(caught.value)
