"""`btrdelta replicate` over real networks: OpenSSH (Debian's sshd on a loopback port, keys
made here) and TCP with TLS between two network namespaces joined by a veth pair, with the
link cut (`ip link set down`) and the sender killed mid-stream, then resumed. Oracles:
tree-sum of the received tree, bytes the receiver logged (resent at most one segment)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from btrdelta.tree import tree_sum
from tests.conftest import Children
from tests.jsondoc import checked

SEG = 1 << 20
BTRDELTA = [sys.executable, "-m", "btrdelta"]


def _need(tool: str) -> None:
    if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {tool} is missing (make sysdeps)")
        pytest.skip(f"{tool} missing")
    if os.geteuid() != 0:
        pytest.skip("needs root")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(root: Path, mib: int) -> Path:
    root.mkdir()
    for i in range(mib):
        (root / f"f{i}").write_bytes(os.urandom(1 << 20))
    (root / "small").write_bytes(b"small")
    return root


def _wait_gone(marker: str, timeout: float = 60) -> None:
    """Wait until no process other than this one has ``marker`` on its command line (a
    fixed sleep was too short on a loaded machine)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd and b"--serve" in cmd and int(pid) != os.getpid():
                alive.append(pid)
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes serving {marker} still running after {timeout} s")


def _visible(dest: Path) -> list[str]:
    return sorted(n for n in os.listdir(dest) if not n.startswith("."))


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """sshd on a loopback port with a host key and a client key made here; the ssh command."""
    _need("sshd")
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = _port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
        "StrictModes no\nSetEnv PATH=/usr/bin:/bin\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=subprocess.DEVNULL)
    ssh = (f"ssh -i {d / 'client'} -o StrictHostKeyChecking=no -o BatchMode=yes "
           f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    end = time.monotonic() + 60  # (a loaded machine's start)
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, "sshd exited"
        assert time.monotonic() < end, "sshd did not start"
        time.sleep(0.05)
    try:
        yield port, ssh
    finally:
        proc.terminate()
        proc.wait()


def test_over_openssh(sshd: tuple[int, str], tmp_path: Path, children: Children) -> None:
    port, ssh = sshd
    src = _tree(tmp_path / "src", 6)
    dest = tmp_path / "dest"
    dest.mkdir()
    remote = f"{sys.executable} -m btrdelta"
    url = f"ssh://root@127.0.0.1:{port}{dest}"
    common = ["--ssh", ssh, "--remote-cmd", remote, "--store", str(tmp_path / "store"),
              "--segment", "1M", "--json"]
    first = subprocess.run([*BTRDELTA, "replicate", str(src), url, *common],
                           capture_output=True, text=True, check=False, env=_env())
    assert first.returncode == 0, first.stderr
    assert checked("replicate", json.loads(first.stdout))["kind"] == "full"
    # killed mid-stream (rate-limited so it is surely in the middle), then resumed
    (src / "big").write_bytes(os.urandom(5 * SEG))
    proc = children.start([*BTRDELTA, "replicate", str(src), url, *common, "--rate-limit",
                           "2M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    _wait_partial(dest, SEG)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    _wait_gone(str(dest))  # the remote --serve sees its stdin close and exits
    assert len(_visible(dest)) == 1
    again = subprocess.run([*BTRDELTA, "replicate", str(src), url, *common],
                           capture_output=True, text=True, check=False, env=_env())
    assert again.returncode == 0, again.stderr
    report = checked("replicate", json.loads(again.stdout))
    assert report["kind"] == "resume"
    assert report["resumed_from"] >= SEG
    newest = dest / _visible(dest)[-1]
    assert tree_sum(newest) == tree_sum(src)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def _wait_partial(dest: Path, at_least: int, timeout: float = 60) -> None:
    meta = dest / ".btrdelta-partial" / "meta.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if json.loads(meta.read_text())["offset"] >= at_least:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the transfer did not start")


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Namespaces btd-a (10.77.0.1) and btd-b (10.77.0.2) joined by a veth pair."""
    _need("ip")
    tag = f"{os.getpid() % 10000}"
    a, b = f"btd-a{tag}", f"btd-b{tag}"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
            ["ip", "link", "set", f"va{tag}", "netns", a],
            ["ip", "link", "set", f"vb{tag}", "netns", b],
            ["ip", "-n", a, "addr", "add", "10.77.0.1/24", "dev", f"va{tag}"],
            ["ip", "-n", b, "addr", "add", "10.77.0.2/24", "dev", f"vb{tag}"],
            ["ip", "-n", a, "link", "set", f"va{tag}", "up"],
            ["ip", "-n", b, "link", "set", f"vb{tag}", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            proc = subprocess.run(c, capture_output=True, check=False)
            if proc.returncode != 0:
                msg = f"cannot make network namespaces: {proc.stderr.decode().strip()}"
                if os.environ.get("CI") == "true":
                    pytest.fail(msg)
                pytest.skip(msg)
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", b], capture_output=True, check=False)


def _received(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) bytes received", log)]


def _wait_log(log: Path, ended: Callable[[str], bool], what: str) -> None:
    """Until ``ended(log's text)`` (60 s at most: a loaded machine's)."""
    end = time.monotonic() + 60
    while not ended(log.read_text()):
        assert time.monotonic() < end, f"{what}: {log.read_text()}"
        time.sleep(0.05)


def test_tls_between_namespaces_with_cuts(netns: tuple[str, str], tmp_path: Path,
                                          children: Children) -> None:
    a, b = netns
    tag = a[len("btd-a"):]
    for name in ("server", "client", "intruder"):
        subprocess.run([*BTRDELTA, "key", "generate", "-o", str(tmp_path / name)], check=True,
                       capture_output=True, env=_env())
    src = _tree(tmp_path / "src", 6)
    dest = tmp_path / "dest"
    dest.mkdir()
    log = tmp_path / "listen.log"
    with open(log, "w") as logf:
        server = subprocess.Popen(
            ["ip", "netns", "exec", b, *BTRDELTA, "replicate", "--listen", "10.77.0.2:7447",
             "--key", str(tmp_path / "server.key"), "--allow", str(tmp_path / "client.pub"),
             "--timeout", "3", str(dest)], stderr=logf, env=_env())
    try:
        _wait_log(log, lambda text: "listening" in text, "the receiver did not start")

        def client(*extra: str, key: str = "client") -> subprocess.Popen[str]:
            return children.start(
                ["ip", "netns", "exec", a, *BTRDELTA, "replicate", str(src),
                 "tcp://10.77.0.2:7447", "--key", str(tmp_path / f"{key}.key"), "--peer",
                 str(tmp_path / "server.pub"), "--store", str(tmp_path / "store"),
                 "--segment", "1M", "--timeout", "3", "--json", *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())

        intruder = client(key="intruder")
        out, err = intruder.communicate(timeout=60)
        assert intruder.returncode == 5, err
        assert os.listdir(dest) == [".btrdelta-replica.json"]
        # 1. the link goes down mid-stream: the client gives up, then resumes
        first = client("--rate-limit", "2M")
        _wait_partial(dest, SEG)
        subprocess.run(["ip", "-n", a, "link", "set", f"va{tag}", "down"], check=True)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 7, err  # a transport error
        assert _visible(dest) == []
        subprocess.run(["ip", "-n", a, "link", "set", f"va{tag}", "up"], check=True)
        # the receiver's side of the dead connection times out too: it takes one
        # conversation at a time, and said how this one ended
        _wait_log(log, lambda text: len(_received(text)) == 1, "the cut was not seen")
        # 2. the sender killed mid-stream
        done = json.loads((dest / ".btrdelta-partial" / "meta.json").read_text())["offset"]
        second = client("--rate-limit", "2M")
        _wait_partial(dest, done + SEG)  # killed once it has sent data
        second.send_signal(signal.SIGKILL)
        second.communicate()
        assert _visible(dest) == []
        _wait_log(log, lambda text: len(_received(text)) == 2, "the kill was not seen")
        third = client()
        out, err = third.communicate(timeout=120)
        assert third.returncode == 0, err
        report = json.loads(out)
        assert report["kind"] == "resume", log.read_text()
        (got,) = _visible(dest)
        assert tree_sum(dest / got) == tree_sum(src)
        _wait_log(log, lambda text: len(_received(text)) == 3, "the last run was not said")
        received = _received(log.read_text())
        # every byte the receiver got beyond the stream is at most a segment per cut
        assert sum(received) - report["size"] <= 2 * SEG, (received, report)
        assert max(received[:-1]) > 0
    finally:
        server.terminate()
        server.wait()


def test_over_openssh_without_btrdelta_on_the_remote_path(sshd: tuple[int, str],
                                                          tmp_path: Path) -> None:
    """The remote shell does not find `btrdelta` (a venv, /usr/local not on ssh's PATH):
    the one line says so and names --remote-cmd (was: ...said: bash: line 1: btrdelta:
    command not found, and nothing about the option)."""
    port, ssh = sshd
    src = _tree(tmp_path / "src", 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = subprocess.run([*BTRDELTA, "replicate", str(src), f"ssh://root@127.0.0.1:{port}{dest}",
                           "--ssh", ssh, "--store", str(tmp_path / "store"), "-q"],
                          capture_output=True, text=True, check=False, env=_env(), timeout=120)
    assert proc.returncode == 7
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "btrdelta: command not found (install btrdelta there, or give its path: " \
           "--remote-cmd /path/to/btrdelta)" in proc.stderr


@pytest.mark.btrfs
def test_over_openssh_the_backend_goes_to_the_remote_side(sshd: tuple[int, str],
                                                           tmp_path: Path) -> None:
    """``--backend dir`` with an ssh:// DEST on btrfs: the remote ``--serve`` receives a
    directory (registered), not a subvolume. Before, the option stayed on the sending side
    and the remote side used ``auto`` (a subvolume). With tcp:// it is refused: the
    listener at the other end has its own."""
    from tests.conftest import btrfs_loop

    port, ssh = sshd
    src = _tree(tmp_path / "src", 2)
    with btrfs_loop("300M") as fs:
        dest = fs / "dest"
        dest.mkdir()
        proc = subprocess.run([*BTRDELTA, "replicate", "--backend", "dir", str(src),
                               f"ssh://root@127.0.0.1:{port}{dest}", "--ssh", ssh,
                               "--remote-cmd", f"{sys.executable} -m btrdelta", "--store",
                               str(tmp_path / "store"), "--json"],
                              capture_output=True, text=True, check=False, env=_env(),
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        name = checked("replicate", json.loads(proc.stdout))["name"]
        assert os.stat(dest / name).st_ino != 256  # a directory, not a subvolume
        assert name in (dest / ".btrdelta-subvols.json").read_text()
        assert tree_sum(dest / name) == tree_sum(src)
    tcp = subprocess.run([*BTRDELTA, "replicate", "--backend", "dir", str(src),
                          "tcp://127.0.0.1:9", "--no-auth", "--store", str(tmp_path / "s2")],
                         capture_output=True, text=True, check=False, timeout=60)
    assert tcp.returncode == 2, tcp.stderr
    assert tcp.stderr.count("\n") == 1, tcp.stderr
    assert "replicate --listen" in tcp.stderr, tcp.stderr


def test_every_over_openssh(sshd: tuple[int, str], tmp_path: Path, children: Children) -> None:
    """``replicate --every`` to an ssh:// DEST: an ssh session (and a remote ``--serve``)
    per round; each round's tree is the source's, SIGTERM between rounds exits 0 and leaves
    no remote receiver."""
    port, ssh = sshd
    src = _tree(tmp_path / "src", 2)
    dest = tmp_path / "dest"
    dest.mkdir()
    url = f"ssh://root@127.0.0.1:{port}{dest}"
    proc = children.start([*BTRDELTA, "replicate", str(src), url, "--ssh", ssh,
                           "--remote-cmd", f"{sys.executable} -m btrdelta", "--store",
                           str(tmp_path / "store"), "--json", "--every", "5s"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env())
    assert proc.stdout is not None
    kinds = []
    for i in range(3):
        got = checked("replicate --every", json.loads(proc.stdout.readline()))
        os.kill(proc.pid, signal.SIGSTOP)  # (changed between rounds)
        assert (got["round"], got["outcome"]) == (i + 1, "committed"), got
        assert tree_sum(dest / got["name"]) == tree_sum(src)
        kinds.append(got["kind"])
        (src / f"new{i}").write_bytes(os.urandom(70000))
        os.kill(proc.pid, signal.SIGCONT)
    assert kinds == ["full", "incremental", "incremental"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    _wait_gone(str(dest))
    assert len(_visible(dest)) == 3
