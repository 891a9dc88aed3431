"""A backup index is untrusted input (a USB stick, an HTTP server): ``device restore``
refuses a damaged or lying one in one line naming it (exit 3), reads nothing it names
outside its location and never loops. Through the CLI, ``--to-dir`` into a plain
directory (the index is refused before anything is received); oracles: the exit code,
stderr, the output directory left empty, a file beside the location never read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import BTRDELTA

_GOOD = {"n": 1, "file": "home.1.stream", "parent": None, "uuid": "u", "tree_sum": "0" * 64}


def _restore(out: Path, src: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BTRDELTA, "device", "restore", str(out), "home", src, "--to-dir"],
                          capture_output=True, text=True, timeout=120, check=False)


def _index(backups: Any) -> bytes:
    return json.dumps({"format": "btrdelta-backups", "version": 1, "name": "home",
                       "backups": backups}).encode()


def _refused(proc: subprocess.CompletedProcess[str], said: str, out: Path) -> None:
    """Exit 3, one line saying ``said``, no byte of the secret file shown, nothing made."""
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert said in proc.stderr, proc.stderr
    assert "SECRET" not in proc.stderr
    assert "53 45 43" not in proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("backups", [
    # a parent naming its own backup, or a later one: the chain never ended (restore ran
    # forever, its memory growing)
    [{**_GOOD, "n": 2, "file": "home.2.delta", "parent": 2}],
    [{**_GOOD, "n": 1, "file": "home.1.delta", "parent": 2},
     {**_GOOD, "n": 2, "file": "home.2.delta", "parent": 1}],
    # a file name that leaves the location: read, and its first bytes shown in the error
    [{**_GOOD, "file": "../secret"}],
    [{**_GOOD, "file": "/etc/hostname"}],
    # fields missing or of another type: "internal error: KeyError"
    [{"file": "home.1.stream"}],
    [{**_GOOD, "n": "1"}],
    [{**_GOOD, "n": True}],
    [{**_GOOD, "tree_sum": None}],
    [_GOOD, _GOOD],
    {"n": 1},
    ["home.1.stream"],
], ids=["own-parent", "parent-loop", "dotdot", "absolute", "no-n", "n-string", "n-bool",
        "no-sum", "twice", "not-a-list", "not-objects"])
def test_a_lying_backup_index_is_refused_in_one_line(tmp_path: Path, backups: Any) -> None:
    src, out = tmp_path / "backups", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (tmp_path / "secret").write_bytes(b"SECRET-BYTES" * 8)
    (src / "home.1.stream").write_bytes(b"not read either")
    index = src / "home.backups.json"
    index.write_bytes(_index(backups))
    _refused(_restore(out, str(src)), f"{index}: invalid backup index: ", out)


@pytest.mark.parametrize("planted", ["index-symlink", "index-fifo", "file-symlink",
                                     "file-fifo"])
def test_backup_files_are_read_only_as_regular_files(tmp_path: Path, planted: str) -> None:
    """A symlink in the location (an untrusted USB stick) was followed: to a file of the
    machine, whose first bytes the error showed ("starts 53 45 43 ..."); a FIFO made the
    restore wait forever. Each is refused in one line naming it (exit 3)."""
    import os

    src, out = tmp_path / "backups", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET-BYTES" * 8)
    index, stream = src / "home.backups.json", src / "home.1.stream"
    victim = index if planted.startswith("index") else stream
    if victim is stream:
        index.write_bytes(_index([_GOOD]))
    if planted.endswith("symlink"):
        victim.symlink_to(secret if victim is stream else tmp_path / "real.json")
        (tmp_path / "real.json").write_bytes(_index([_GOOD]))
    else:
        os.mkfifo(victim)
    _refused(_restore(out, str(src)), f"{victim}: ", out)


def test_an_endless_index_over_http_is_not_downloaded_whole(tmp_path: Path) -> None:
    """An index is read up to 1 MiB: a server that sends an endless one (here 256 MiB) was
    read whole into a temporary file before the first MiB was parsed."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    served = [0]

    class Endless(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(256 << 20))
            self.end_headers()
            block = b'{"format": "btrdelta-backups", ' + b" " * ((1 << 16) - 31)
            try:
                for _ in range(256 << 4):
                    self.wfile.write(block)
                    served[0] += len(block)
            except OSError:
                pass  # the client went away

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "out"
        out.mkdir()
        url = f"http://127.0.0.1:{server.server_address[1]}/backups"
        proc = _restore(out, url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
    _refused(proc, f"{url}/home.backups.json: larger than 1048576 bytes", out)
    assert served[0] < 16 << 20, served[0]


@pytest.mark.parametrize("variable", ["http_proxy", "all_proxy"])
def test_a_malformed_proxy_variable_is_a_usage_error(tmp_path: Path, variable: str) -> None:
    """``device restore`` from a URL under a proxy variable that cannot be used: exit 2
    naming the variable, as ``update`` and ``image clone`` do (it was a failed transfer:
    exit 7), nothing made."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run(
        [*BTRDELTA, "device", "restore", str(out), "home", "http://127.0.0.1:9/backups",
         "--to-dir"], capture_output=True, text=True, timeout=120, check=False,
        env={**env, variable: "socks5://127.0.0.1:1080"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{variable}='socks5://127.0.0.1:1080': socks5:// proxies are not supported" \
        in proc.stderr, proc.stderr
    assert list(out.iterdir()) == []
