"""``btrdelta update`` takes the shared HTTP options: a repository behind nginx with TLS, a
client certificate and a token header required (certificates made by the test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.tree import tree_sum
from tests.conftest import Children
from tests.transport.certs import make_certs
from tests.transport.nginx import nginx


def _published(tmp_path: Path, trees: list[Path], init: tuple[str, ...] = ("--avg-chunk", "4K"),
               sign: tuple[str, ...] = ()) -> Path:
    """``tmp_path/repo``: the trees added as v1, v2, ... and signed with a root key made
    here (``tmp_path/root.pem``, ``root.pub``)."""
    root = tmp_path / "repo"
    trust.save_key_pair(trust.generate_key(), str(tmp_path / "root.pem"),
                        str(tmp_path / "root.pub"))
    assert main(["repo", "init", str(root), *init]) == 0
    for i, tree in enumerate(trees, 1):
        assert main(["repo", "add", str(root), f"v{i}", str(tree)]) == 0
    assert main(["repo", "sign", str(root), "--key", str(tmp_path / "root.pem"), *sign]) == 0
    return root


def test_update_over_mutual_tls_with_a_token(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _published(tmp_path, releases[:1], sign=("--timestamp-key", str(tmp_path / "root.pem"),
                                                     "--expires", "1d"))
    certs = make_certs(tmp_path / "certs")
    block = f"""
      listen 127.0.0.1:{{port}} ssl; root {root};
      ssl_certificate {certs.server_cert}; ssl_certificate_key {certs.server_key};
      ssl_client_certificate {certs.ca}; ssl_verify_client on;
      location / {{ if ($http_x_token != "t0ken") {{ return 403; }} }}
    """
    tls = ["--ca-cert", str(certs.ca), "--client-cert", str(certs.client_cert),
           "--client-key", str(certs.client_key)]
    with nginx(tmp_path / "nginx", block) as port:
        url = f"https://127.0.0.1:{port}"
        dest = tmp_path / "dest"
        capsys.readouterr()
        args = ["update", url, str(dest), "--key", str(tmp_path / "root.pub"), *tls]
        assert main(args) == 7  # no token: 403
        assert "403" in capsys.readouterr().err
        assert main([*args, "--header", "X-Token: t0ken", "-j", "2"]) == 0, \
            capsys.readouterr().err
    assert tree_sum(dest / "v1") == tree_sum(releases[0])


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_full_s_download_stops_at_once(tmp_path: Path, signame: str,
                                                       children: Children) -> None:
    """Ctrl-C (or SIGTERM) while the ranges of a full arrive: exit 130 (143) in about a
    second, one line. (Until session 9 the fetch threads went on reading and storing their
    ranges, up to 16 MiB each: 8 s on a Debian full at load 5, and here, a server sending
    256 KiB/s a connection, ~20 s. Until session 31 it waited for a ``syncfs`` of the
    chunks not yet named, which writes out the whole file system's dirty data: 4.4 and
    6.7 s in 2 of ~14 runs at load 9, ~2 s in 3 of 8 beside a writer of 1.5 GB; now they
    are dropped, tests/chunk/test_store.py.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.update.conftest import Nginx

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(5):  # incompressible: the pack is as large as the tree
        (tree / f"f{i}").write_bytes(os.urandom(4 << 20))
    root = _published(tmp_path, [tree], init=("--level", "1"))
    srv = Nginx(root, tmp_path / "nginx", limit_rate="256k")
    dest = tmp_path / "dest"
    proc = children.start(
        [sys.executable, "-m", "btrdelta", "update", srv.url, str(dest), "--key",
         str(tmp_path / "root.pub")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("plan: from nothing to v1")  # then the full
        time.sleep(1.5)  # its ranges are arriving
        proc.send_signal(getattr(signal, signame))
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        srv.stop()
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert err == "btrdelta update: interrupted\n"
    assert took < 4, took
    assert not (dest / "v1").exists()


def test_update_from_python_http_server_which_ignores_range(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A repository served by ``python3 -m http.server`` (the standard library's static
    server answers every Range request with the whole file): the full's chunks are taken
    as the pack streams past, a delta is downloaded whole, and the update lands. Before,
    every mirror "failed" with 'server ignores Range requests' (exit 7) after three
    warnings of ranges not sent, on every artifact."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = _published(tmp_path, releases[:2])

    class Quiet(SimpleHTTPRequestHandler):
        ranged = 0

        def log_message(self, format: str, *args: object) -> None:
            if "Range" in self.headers:
                Quiet.ranged += 1

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        dest = tmp_path / "dest"
        key = ["--key", str(tmp_path / "root.pub")]
        capsys.readouterr()
        assert main(["update", url, str(dest), "--to", "v1", *key]) == 0, \
            capsys.readouterr().err
        err = capsys.readouterr().err
        assert "ignores Range requests: reading the whole file" in err
        assert "attempt 2 of" not in err  # no retries for an answer that will not change
        assert main(["update", url, str(dest)]) == 0, capsys.readouterr().err
        assert "delta v1 -> v2" in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert Quiet.ranged > 0  # it was asked for ranges, and answered with whole files
    assert tree_sum(dest / "v1") == tree_sum(releases[0])
    assert tree_sum(dest / "v2") == tree_sum(releases[1])


def test_a_dead_first_mirror_is_tried_once(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dead first mirror (connection refused) fails the first file and is then tried
    last. Before, the lookup of the next root (root/2.json: no mirror has it when the key
    never rotated) marked every mirror failed, so each file of the update, every pack
    range included, went to the dead mirror first, with its retries and their warnings."""
    root = _published(tmp_path, releases[:1])
    dead = "http://127.0.0.1:1/app"  # nothing listens on port 1
    dest = tmp_path / "dest"
    capsys.readouterr()
    assert main(["update", dead, str(dest), "--mirror", str(root), "--key",
                 str(tmp_path / "root.pub"), "--retries", "1"]) == 0
    err = capsys.readouterr().err
    assert "packs/" not in err, err
    assert "fulls/" not in err, err
    assert tree_sum(dest / "v1") == tree_sum(releases[0])
    # run again: nothing to do, and where it is (was: 'v1 is already in DEST')
    assert main(["update", str(root), str(dest)]) == 0
    assert capsys.readouterr().out == f"v1 is already in {dest / 'v1'}: nothing to download\n"


def test_a_silent_first_mirror_is_waited_for_once(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A first mirror that accepts connections and never answers (a hung server): the
    lookup of the next root (a 404 on every mirror) ranked it with the good one, so the
    timestamp and the index it names each waited for its timeout again (27 s with
    --timeout 3, 4.5 min with the default). Now only the first file waits for it."""
    import socket
    import threading
    import time

    root = _published(tmp_path, releases[:1])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def hang() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=hang)
    t.start()
    try:
        silent = f"http://127.0.0.1:{listener.getsockname()[1]}/app"
        capsys.readouterr()
        start = time.monotonic()
        assert main(["update", silent, str(tmp_path / "dest"), "--mirror", str(root),
                     "--key", str(tmp_path / "root.pub"), "--timeout", "2",
                     "--retries", "0"]) == 0
        took = time.monotonic() - start
    finally:
        stop.set()
        t.join()
        listener.close()
        for s in held:
            s.close()
    assert len(held) == 1, (len(held), took)  # the next root's lookup only
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])


def test_a_first_mirror_that_answers_every_path_with_a_page(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A first mirror that answers 200 with an HTML page for every path (a captive portal,
    a host's 'soft 404'), the repository second: the update comes from the second mirror,
    the first one named once. Before, the lookup of the next root (root/2.json, which the
    repository lacks: its key never rotated) failed the update (exit 3, 'every mirror
    failed: ... not valid JSON ...; REPO: ... No such file'), although the second mirror
    serves every file; after a rotation (the next root is root/3.json) as well."""
    import http.server
    import threading

    page = b"<html><body>Sign in to use this network</body></html>"

    class Portal(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    root = _published(tmp_path, releases[:2])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Portal)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        portal = f"http://127.0.0.1:{server.server_address[1]}/app"
        dest = tmp_path / "dest"
        capsys.readouterr()
        # the portal alone: one line naming the file (exit 3, update --help), DEST not made
        assert main(["update", portal, str(dest), "--key", str(tmp_path / "root.pub")]) == 3
        assert capsys.readouterr().err == f"btrdelta update: error: {portal}/timestamp.json: " \
            "not valid JSON: Expecting value: line 1 column 1 (char 0)\n"
        assert not dest.exists()
        args = ["update", portal, str(dest), "--mirror", str(root)]
        assert main([*args, "--key", str(tmp_path / "root.pub"), "--to", "v1"]) == 0, \
            capsys.readouterr().err
        err = capsys.readouterr().err
        assert portal in err, err  # the broken mirror is said
        assert tree_sum(dest / "v1") == tree_sum(releases[0])
        # the key rotated: the device follows root/2.json and looks for root/3.json
        new_key, new_pub = tmp_path / "new.pem", tmp_path / "new.pub"
        trust.save_key_pair(trust.generate_key(), str(new_key), str(new_pub))
        assert main(["repo", "sign", str(root), "--key", str(new_key), "--previous-key",
                     str(tmp_path / "root.pem")]) == 0
        capsys.readouterr()
        assert main(args) == 0, capsys.readouterr().err
        assert tree_sum(dest / "v2") == tree_sum(releases[1])
        # an update that only a new key signed: the device trusts root 2 now
        assert main(["update", portal, str(tmp_path / "dest2"), "--mirror", str(root),
                     "--key", str(new_pub)]) == 0, capsys.readouterr().err
        assert tree_sum(tmp_path / "dest2" / "v2") == tree_sum(releases[1])
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_a_mirror_holding_a_truncated_pack(
    releases: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pack cut short on a mirror (nginx answers a range past its end with what there
    is): one line naming its size, then the next mirror, at once. It was taken for a
    transient failure: "server did not send every range asked for", retried with waits,
    a line each, before the next mirror; alone, the same lines and exit 7."""
    import shutil

    # (no solid full: the pack is what a first install reads)
    root = _published(tmp_path, releases[:1], init=("--avg-chunk", "4K", "--solid-level", "0"))
    bad = tmp_path / "bad"
    shutil.copytree(root, bad, ignore=shutil.ignore_patterns(".btrdelta"))
    pack = max((bad / "packs").iterdir(), key=lambda p: p.stat().st_size)
    size = pack.stat().st_size
    with open(pack, "r+b") as f:
        f.truncate(size // 2)
    key = ["--key", str(tmp_path / "root.pub")]
    with nginx(tmp_path / "nginx", f"listen 127.0.0.1:{{port}}; root {bad};") as port:
        url = f"http://127.0.0.1:{port}"
        capsys.readouterr()
        assert main(["update", "-q", url, str(tmp_path / "alone"), *key]) == 7
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{pack.name}: the file is {size // 2} bytes, shorter than the ranges" in err
        assert not (tmp_path / "alone" / "v1").exists()
        assert main(["update", "-q", url, str(tmp_path / "dest"), "--mirror", str(root),
                     *key]) == 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"the file is {size // 2} bytes" in err
        assert f"trying the next mirror, {root}" in err
    assert tree_sum(tmp_path / "dest" / "v1") == tree_sum(releases[0])
