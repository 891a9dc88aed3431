"""``image clone`` with the HTTP options against nginx (TLS, a client certificate required,
a token header required), a server that comes up late, and the rate limit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.chunk.compress import compress_image
from btrdelta.cli import main
from btrdelta.transport.config import HttpConfig
from btrdelta.transport.http import RangeFetcher
from btrdelta.transport.server import StaticServer

from .certs import Certs, make_certs
from .nginx import free_port, nginx

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    base = tmp_path_factory.mktemp("www")
    data = b"".join(Path(p).read_bytes() for p in sorted(Path(threading.__file__).parent.glob(
        "[a-f]*.py")))[: 3 << 20]
    (base / "img").write_bytes(data)
    with open(base / "img.bdar", "wb") as f:
        compress_image(base / "img", f, params=ChunkerParams.from_avg(16 << 10))
    return base, data


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _server_block(root: Path, certs: Certs, log: Path) -> str:
    return f"""
      listen 127.0.0.1:{{port}} ssl; root {root};
      ssl_certificate {certs.server_cert}; ssl_certificate_key {certs.server_key};
      ssl_client_certificate {certs.ca}; ssl_verify_client on;
      access_log {log} conns;
      location / {{ if ($http_x_token != "{TOKEN}") {{ return 403; }} }}
    """


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, text: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("btrdelta image clone: error: "), err
    assert text in lines[0], err


def test_clone_over_mutual_tls_with_a_token(
    www: tuple[Path, bytes], certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, data = www
    log = tmp_path / "conns.log"
    fmt = "log_format conns '$connection $status $ssl_client_s_dn';"
    with nginx(tmp_path / "nginx", _server_block(root, certs, log), http_extra=fmt) as port:
        url = f"https://127.0.0.1:{port}/img.bdar"
        store = f"{tmp_path}/store/img"
        tls = ["--ca-cert", str(certs.ca)]
        client = ["--client-cert", str(certs.client_cert), "--client-key", str(certs.client_key)]
        header = ["--header", f"X-Token: {TOKEN}"]

        # no TLS option: the default trust store, loaded at the first HTTPS connection
        # (LazyTLS), refuses it too
        code, _, err = _run(capsys, "image", "clone", url, store, *header)
        assert code == 7
        _one_line(err, "TLS: server certificate not trusted")
        # the server's certificate does not chain to the default trust store / another CA
        for ca in ([], ["--ca-cert", str(certs.other_ca)]):
            code, _, err = _run(capsys, "image", "clone", url, store, *ca, *client, *header)
            assert code == 7
            _one_line(err, "TLS: server certificate not trusted")
        # no client certificate: nginx answers 400
        code, _, err = _run(capsys, "image", "clone", url, store, *tls, *header)
        assert code == 7
        _one_line(err, "HTTP 400 Bad Request for a range request")
        # no token: 403
        code, _, err = _run(capsys, "image", "clone", url, store, *tls, *client)
        assert code == 7
        _one_line(err, "HTTP 403 Forbidden for a range request")
        # the token from a file (kept out of ps)
        hfile = tmp_path / "headers"
        hfile.write_text(f"# device credentials\nX-Token: {TOKEN}\n")
        out_img = tmp_path / "out.img"
        code, _out, err = _run(capsys, "image", "clone", url, store, *tls, *client,
                              "--header", f"@{hfile}", "-j", "2", "--output", str(out_img))
        assert code == 0, err
        assert out_img.read_bytes() == data
        time.sleep(0.2)
    lines = [line.split() for line in log.read_text().splitlines()]
    ok = [f for f in lines if f[1] == "206"]
    assert ok
    assert all("CN=device-0001" in " ".join(f[2:]) for f in ok)
    assert len(ok) > 2  # header, index, chunks
    assert len({f[0] for f in ok}) <= 2  # -j 2: at most two connections


def test_bad_http_options_are_one_line(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "https://127.0.0.1:1/img.bdar"
    store = f"{tmp_path}/store/img"
    code, _, err = _run(capsys, "image", "clone", url, store, "--ca-cert", str(tmp_path / "no"))
    assert code == 1
    _one_line(err, "CA certificates not loaded")
    code, _, err = _run(capsys, "image", "clone", url, store, "--client-cert", str(certs.ca))
    assert code == 1
    _one_line(err, "client certificate/key not loaded")
    code, _, err = _run(capsys, "image", "clone", url, store, "--header", f"@{tmp_path}/none")
    assert code == 1
    _one_line(err, "--header file not read")
    for bad in (["--header", "no colon"], ["--timeout", "0"], ["-j", "0"],
                ["--rate-limit", "fast"], ["--retries", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["image", "clone", url, store, *bad])
        assert exit_info.value.code == 2
        assert "error: argument" in capsys.readouterr().err.strip().splitlines()[-1]


def test_refused_connection_waits_as_long_as_asked(
    www: tuple[Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, data = www
    port = free_port()
    url = f"http://127.0.0.1:{port}/img.bdar"
    # impatient: gives up quickly, one line per retry, then the error
    start = time.monotonic()
    code, _, err = _run(capsys, "image", "clone", url, f"{tmp_path}/s1/img", "--retries", "2",
                        "--retry-max-wait", "0.1")
    assert code == 7
    lines = err.strip().splitlines()
    assert len(lines) == 3
    assert "attempt 2 of 3" in lines[0]
    # each line names the command, as the error line does (the retry lines said 'btrdelta:')
    assert all(line.startswith("btrdelta image clone: ") for line in lines), lines
    assert "giving up after 3 attempts: " in lines[-1]
    assert "refused" in lines[-1]
    # none asked: no retry line, and the error says so (was: 'giving up after 1 attempts')
    code, _, err = _run(capsys, "image", "clone", url, f"{tmp_path}/s0/img", "--retries", "0")
    assert code == 7
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert ": no retries asked (--retries 0): " in lines[0]
    assert time.monotonic() - start < 5
    # patient: the server comes up 2 s later and the clone completes
    started = threading.Event()

    def late() -> None:
        time.sleep(2)
        late_server = StaticServer(root, ("127.0.0.1", port))
        started.set()
        late_server.serve_forever()

    threading.Thread(target=late, daemon=True).start()
    out_img = tmp_path / "out.img"
    code, _, err = _run(capsys, "image", "clone", url, f"{tmp_path}/s2/img", "--retries", "30",
                        "--retry-max-wait", "0.5", "--output", str(out_img))
    assert code == 0, err
    assert started.is_set()
    assert out_img.read_bytes() == data
    assert "Connection refused" in err


def test_rate_limit_bounds_the_speed(www: tuple[Path, bytes]) -> None:
    root, _ = www
    size = min(768 << 10, (root / "img.bdar").stat().st_size)
    assert size > 256 << 10
    server = StaticServer(root)
    with server.running():
        url = f"{server.url}/img.bdar"
        for rate in (None, 256 << 10):
            with RangeFetcher(url, HttpConfig(rate_limit=rate, jobs=2)) as fetcher:
                start = time.monotonic()
                assert len(fetcher.get_range(0, size)) == size
                took = time.monotonic() - start
            if rate is None:
                assert took < 1.5
            else:  # at 256 KiB/s, less one burst of 32 KiB
                assert took >= (size - (32 << 10)) / rate * 0.95
