"""Run nginx on a loopback port with a config the test writes (no master, no daemon)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {log.read_text() if log.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


@contextlib.contextmanager
def nginx(workdir: Path, server_block: str, *, http_extra: str = "") -> Iterator[int]:
    """nginx with ``server_block`` (``{port}`` is filled in); yields the port."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is required under CI")
        pytest.skip("nginx not installed")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    error_log = workdir / "error.log"
    conf = workdir / "nginx.conf"
    temps = " ".join(f"{k}_temp_path {workdir}/{k};"
                     for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {workdir}/nginx.pid;
error_log {error_log};
events {{ worker_connections 64; }}
http {{
  access_log off; {temps}
  {http_extra}
  server {{ {server_block.replace("{port}", str(port))} }}
}}
""")
    proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(error_log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, error_log)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
