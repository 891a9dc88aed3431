"""``update`` and ``image clone`` behind an HTTP proxy named by the environment (as httpx
honoured until session 26): over http:// and https:// (a CONNECT tunnel, ``--ca-cert``
checking the origin) through a dumb forwarding proxy to nginx they give the right tree and
image and the proxy saw every request; ``no_proxy`` goes direct; a proxy that wants other
credentials, or a dead one, is one line naming it, exit 7, nothing applied; a malformed
variable is a usage error naming it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.tree import tree_sum
from tests.chunk.images import ImagePair
from tests.transport.certs import Certs, make_certs
from tests.transport.forwarder import Forwarder
from tests.transport.nginx import nginx
from tests.update.test_update_http import _published

VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
             "ALL_PROXY", "no_proxy", "NO_PROXY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def site(releases: list[Path], image_pair: ImagePair, tmp_path: Path
         ) -> Iterator[tuple[str, str, Certs]]:
    """A signed repository of two releases and ``v2.bdar`` under one nginx, served over
    http:// and https://: (http URL, https URL, certificates)."""
    root = _published(tmp_path, releases[:2])
    os.link(image_pair.arc2, root / "v2.bdar")
    certs = make_certs(tmp_path / "certs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        plain = s.getsockname()[1]
    block = f"""listen 127.0.0.1:{{port}} ssl; listen 127.0.0.1:{plain}; root {root};
      ssl_certificate {certs.server_cert}; ssl_certificate_key {certs.server_key};"""
    with nginx(tmp_path / "nginx", block) as port:
        yield f"http://127.0.0.1:{plain}", f"https://127.0.0.1:{port}", certs


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_update_and_image_clone_through_the_proxy(
    site: tuple[str, str, Certs], releases: list[Path], image_pair: ImagePair, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], scheme: str
) -> None:
    http_url, https_url, certs = site
    url = http_url if scheme == "http" else https_url
    tls = ["--ca-cert", str(certs.ca)] if scheme == "https" else []
    with Forwarder(user="dev", password="pw").running() as fwd:
        monkeypatch.setenv(f"{scheme}_proxy",
                           f"http://dev:pw@127.0.0.1:{fwd.server_address[1]}")
        dest = tmp_path / "dest"
        assert main(["update", url, str(dest), "--key", str(tmp_path / "root.pub"), *tls]) \
            == 0, capsys.readouterr().err
        updated = len(fwd.seen)
        out = tmp_path / "v2.img"
        assert main(["image", "clone", f"{url}/v2.bdar", "--output", str(out), *tls]) == 0, \
            capsys.readouterr().err
    assert tree_sum(dest / "v2") == tree_sum(releases[1])
    assert out.read_bytes() == image_pair.img2.read_bytes()
    assert updated >= 1  # (https: one tunnel, kept)
    assert len(fwd.seen) > updated
    where = url.split("://")[1]
    if scheme == "http":  # each request in absolute form
        assert all(m == "GET" and t.startswith(f"{url}/") for m, t, _ in fwd.seen), fwd.seen
        assert any(t == f"{url}/v2.bdar" for _, t, _ in fwd.seen[updated:])
    else:  # tunnels to the origin
        assert {(m, t) for m, t, _ in fwd.seen} == {("CONNECT", where)}
    assert {a for _, _, a in fwd.seen} == {"Basic ZGV2OnB3"}  # dev:pw
    assert fwd.down[0] > image_pair.arc2.stat().st_size // 2


def test_no_proxy_goes_direct(site: tuple[str, str, Certs], releases: list[Path],
                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    http_url, _, _ = site
    with Forwarder().running() as fwd:
        monkeypatch.setenv("HTTP_PROXY", fwd.url)
        monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.0/8")
        dest = tmp_path / "dest"
        assert main(["update", http_url, str(dest), "--key", str(tmp_path / "root.pub")]) == 0
    assert tree_sum(dest / "v2") == tree_sum(releases[1])
    assert fwd.seen == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_wrong_credentials_or_a_dead_proxy_exit_7_nothing_applied(
    site: tuple[str, str, Certs], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], scheme: str
) -> None:
    http_url, https_url, certs = site
    url = http_url if scheme == "http" else https_url
    tls = ["--ca-cert", str(certs.ca)] if scheme == "https" else []
    dest, out = tmp_path / "dest", tmp_path / "v2.img"
    update = ["update", url, str(dest), "--key", str(tmp_path / "root.pub"), "--retries", "0",
              *tls]
    clone = ["image", "clone", f"{url}/v2.bdar", "--output", str(out), "--retries", "0", *tls]
    var = f"{scheme.upper()}_PROXY"
    with Forwarder(user="dev", password="pw").running() as fwd:
        port = fwd.server_address[1]
        monkeypatch.setenv(var, f"http://dev:nope@127.0.0.1:{port}")
        capsys.readouterr()
        for args in (update, clone):
            assert main(args) == 7
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1, err
            assert f"proxy 127.0.0.1:{port} ({var}) answered" in err, err
            assert "with 407: proxy credentials needed or wrong" in err, err
            assert "nope" not in err, err
    for args in (update, clone):  # the proxy gone: nothing listens on its port
        assert main(args) == 7
        err = capsys.readouterr().err
        assert f"through the proxy 127.0.0.1:{port} ({var})" in err, err
        assert "Traceback" not in err
    assert not dest.exists() or not any(dest.iterdir())
    assert not out.exists()


def test_a_malformed_proxy_variable_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("https_proxy", "socks5://127.0.0.1:1080")
    capsys.readouterr()
    assert main(["image", "clone", "https://127.0.0.1:9/v2.bdar", "--output",
                 str(tmp_path / "x.img")]) == 2
    err = capsys.readouterr().err
    assert "https_proxy='socks5://127.0.0.1:1080': socks5:// proxies are not supported" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.img").exists()
