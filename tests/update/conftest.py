"""Release trees of a real wheel (MarkupSafe, nine releases), downloaded once per machine;
nginx on loopback; and a check that no test of update/ leaves a file descriptor open."""

from __future__ import annotations

import multiprocessing.resource_tracker
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from btrdelta.testing.wheels import MARKUPSAFE, release_trees

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "btrdelta-tests"


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what they are."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return out


_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport,
                                                              pytest.TestReport]:
    """Note whether a test's own body passed (none is made when it was interrupted)."""
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


@pytest.fixture(autouse=True)
def _no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every descriptor a test (and the code it drives) opens is closed when it ends.

    Checked only after a test that passed: one that failed or was interrupted (Ctrl-C of
    ``make soak``) may leave its channels open, and its own error is the one to read."""
    multiprocessing.resource_tracker.ensure_running()  # one pipe for the process's life
    before = open_fds()
    yield
    if not request.node.stash.get(_PASSED, False):
        return
    leaked = {fd: what for fd, what in open_fds().items() if before.get(fd) != what}
    assert not leaked, f"{len(leaked)} descriptors left open: {sorted(leaked.items())[:8]}"


@pytest.fixture(scope="session")
def releases() -> list[Path]:
    trees = release_trees(*MARKUPSAFE, CACHE)
    if trees is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pip download of the MarkupSafe wheels failed under CI")
        pytest.skip("pip download of the MarkupSafe wheels failed (no network?)")
    return trees


#: nginx's status page (``stub_status``: its requests in progress), not logged
_STATUS = "/.nginx-status"


class Nginx:
    """nginx serving one directory on a loopback port; counts body bytes per request."""

    def __init__(self, root: Path, work: Path, *, limit_rate: str = "0") -> None:
        import shutil
        import socket
        import subprocess

        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            if os.environ.get("CI") == "true":
                pytest.fail("nginx is required under CI")
            pytest.skip("nginx not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "bytes.log"
        conf = work / "nginx.conf"
        conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
  log_format bytes '$status $body_bytes_sent $request_uri';
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{ listen 127.0.0.1:{self.port}; root {root}; access_log {self.log} bytes;
             limit_rate {limit_rate};
             location = {_STATUS} {{ stub_status; access_log off; limit_rate 0; }} }}
}}
""")
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(work / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        import time

        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, "nginx exited early"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def served(self) -> int:
        """Body bytes of the requests served so far (nginx's access log, once it is idle:
        :meth:`requests`)."""
        return sum(n for _status, n, _uri in self.requests())

    def requests(self, *, idle: bool = True) -> list[tuple[int, int, str]]:
        """(status, body bytes, URI) of each request logged, in order. With ``idle``, once
        nginx serves no request but the status page's: it logs a request after its last
        byte is sent, so its client can be done, or killed, before the line is written
        (right after a reply: 18 lines late in 5,000 requests at load 6-8; after a kill under
        ``limit_rate``: until nginx's next write fails). ``idle=False``: what is logged
        now, a transfer in progress left out."""
        if idle:
            self._idle()
        if not self.log.exists():
            return []
        return [(int(a), int(b), c) for a, b, c in
                (line.split(" ", 2) for line in self.log.read_text().splitlines())]

    def _idle(self) -> None:
        """Until nginx's status page counts no request read or written but its own. Read
        through ``_socket``'s socket: a test may count the connections this process makes
        through ``socket.socket`` (test_short_paths)."""
        import _socket
        import re
        import time

        deadline = time.monotonic() + 60
        while True:
            sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            try:
                sock.settimeout(30)
                sock.connect(("127.0.0.1", self.port))
                sock.sendall(f"GET {_STATUS} HTTP/1.0\r\n\r\n".encode())
                reply = b""
                while more := sock.recv(4096):
                    reply += more
            finally:
                sock.close()
            status = reply.decode("latin-1")
            counts = re.search(r"Reading: (\d+) Writing: (\d+)", status)
            assert counts, status
            if (counts[1], counts[2]) == ("0", "1"):
                return
            assert time.monotonic() < deadline, f"nginx still serving a request: {status}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(params=["dir", pytest.param("btrfs", marks=pytest.mark.btrfs)])
def dest_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """An empty DEST: a directory on this filesystem, or on a loop-mounted btrfs."""
    if request.param == "dir":
        return tmp_path / "dest"
    dest: Path = request.getfixturevalue("btrfs_dest")
    return dest


@pytest.fixture
def btrfs_dest() -> Iterator[Path]:
    """An empty DEST on a loop-mounted btrfs of its own (512 MiB)."""
    from tests.conftest import btrfs_loop

    with btrfs_loop("512M") as mnt:
        yield mnt / "dest"
