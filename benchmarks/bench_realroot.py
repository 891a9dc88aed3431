"""Every engine on a real Debian root of realistic size, next to the peer tools (one run).

Trees: :func:`benchmarks.realroot.realroot_pair` (a bookworm server root of 1.2 GB and
47 k files, and the same after its security upgrade and three more applications; built once,
5-20 min, cached). Runs only with ``BTRDELTA_BENCH_REALROOT=1`` (it takes ~10 min of both
cores and ~20 GB of disk under ``BTRDELTA_BENCH_WORKDIR``, default /var/tmp: not /dev/shm,
which cannot hold the loop images beside the trees in RAM). On loop-mounted btrfs, as a user
would run each command (a child process: wall, CPU, peak RSS from ``os.wait4``):

* kernel ``btrfs send`` full (A) and ``-p`` (A -> B, NEW rsynced in place over OLD) received
  by ``btrfs receive`` and by ``btrdelta receive`` into btrfs and ext4 (tree-sums compared);
* ``btrdelta send -p`` (userspace, ``--parent-uuid btrfs``) received by the kernel;
* ``delta make`` / ``expand`` (bit for bit) / ``receive`` of the kernel's ``-p`` stream;
* ``image compress`` of ext4 images of both roots and ``image clone`` of the new one onto
  the old (in place) over nginx, against ``casync make`` / ``extract --seed`` (bytes and
  requests from nginx's log);
* ``repo add`` of both snapshots, ``repo sign``, ``update`` from nothing to v1 and v1 -> v2
  over nginx (bytes served);
* ``send --record`` / ``--from-sendshot`` of a live subvolume and ``replicate`` full and
  incremental, against the kernel's ``send | receive`` and ``send -p | receive``.

Peers on the roots' tars (``zstd --patch-from``, ``xdelta3``) are left out: each needs more
than 2 GB of memory and many minutes here (docs/performance.md, session 23, has a run).

Run: ``BTRDELTA_BENCH_REALROOT=1 .venv/bin/python -m benchmarks realroot``.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh

PY = sys.executable
BD = [PY, "-m", "btrdelta"]


def _timed(cmd: list[str], stdout: int | None = subprocess.DEVNULL) -> str:
    """Run ``cmd``; its wall time, CPU time and peak RSS as text."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    _pid, status, use = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-500:]}")
    return (f"{wall:6.2f} s wall, CPU {use.ru_utime + use.ru_stime:6.2f} s, "
            f"peak RSS {use.ru_maxrss >> 10:5d} MB")


def _sum(path: Path) -> str:
    return sh(*BD, "tree-sum", "--ignore-root-mtime", str(path)).split()[0][:16]


def _size(path: Path) -> str:
    return f"{path.stat().st_size:,} B"


class _Nginx:
    """nginx on a loopback port serving ``root``; bytes and requests from its log."""

    def __init__(self, root: Path, work: Path) -> None:
        from tests.update.conftest import Nginx

        self.srv = Nginx(root, work)
        self.url = self.srv.url

    def mark(self) -> int:
        return len(self.srv.requests()) if self.srv.log.exists() else 0

    def since(self, mark: int) -> str:
        reqs = self.srv.requests()[mark:] if self.srv.log.exists() else []
        return f"{sum(r[1] for r in reqs):,} B in {len(reqs)} requests"


def _bd(*args: object) -> list[str]:
    return [*BD, *(str(a) for a in args)]


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def _receive(w: Path, src: Path, dst: Path, ext: Path, out: list[str]) -> None:
    a_stream, ab_stream = w / "A.stream", w / "AB.stream"
    out.append(f"kernel send A        {_timed(_sh(f'btrfs send -q {src}/A > {a_stream}'))}"
               f"  {_size(a_stream)}")
    cmd = _sh(f"btrfs send -q -p {src}/A {src}/B > {ab_stream}")
    out.append(f"kernel send -p A B   {_timed(cmd)}  {_size(ab_stream)}")
    for label, stream in (("full", a_stream), ("incremental", ab_stream)):
        for who, recv, where in (
                ("btrfs receive", ["btrfs", "receive"], dst / "k"),
                ("btrdelta receive (btrfs)", _bd("receive"), dst / "o"),
                ("btrdelta receive (ext4)", _bd("receive"), ext / "o")):
            where.mkdir(exist_ok=True)
            cmd = [*recv, "-q", "-f", str(stream), str(where)]
            out.append(f"{label:11s} {who:25s} {_timed(cmd)}")
    want = _sum(src / "B")
    got = {_sum(d / "B") for d in (dst / "k", dst / "o", ext / "o")}
    out.append(f"received B equal to the source (tree-sum): {got == {want}}")


def _send_delta(w: Path, src: Path, dst: Path, out: list[str]) -> None:
    u, a, b = w / "uAB.stream", src / "A", src / "B"
    cmd = _bd("send", "-q", "-p", a, "--parent-uuid", "btrfs", b, "-o", u)
    out.append(f"btrdelta send -p (userspace) {_timed(cmd)}  {_size(u)} "
               f"(kernel's -p: {_size(w / 'AB.stream')})")
    d = dst / "u"
    d.mkdir()
    sh("btrfs", "receive", "-q", "-f", w / "A.stream", d)
    cmd = ["btrfs", "receive", "-q", "-f", str(u), str(d)]
    out.append(f"  btrfs receive of it {_timed(cmd)}  equal: {_sum(d / 'B') == _sum(b)}")
    delta, again = w / "AB.delta", w / "AB.again"
    cmd = _bd("delta", "make", "-q", "-f", w / "AB.stream", "--old", a, "-o", delta)
    out.append(f"delta make     {_timed(cmd)}  {_size(delta)}")
    cmd = _bd("delta", "expand", "-q", "-f", delta, "--old", a, "-o", again)
    took = _timed(cmd)
    same = filecmp.cmp(again, w / "AB.stream", shallow=False)
    out.append(f"delta expand   {took}  bit for bit: {same}")
    again.unlink()
    d = dst / "d"
    d.mkdir()
    sh("btrfs", "receive", "-q", "-f", w / "A.stream", d)
    cmd = _bd("receive", "-q", "-f", delta, d)
    out.append(f"receive delta  {_timed(cmd)}  equal: {_sum(d / 'B') == _sum(b)}")


def _images(w: Path, old: Path, new: Path, out: list[str]) -> None:
    www, img = w / "www", w / "img"
    www.mkdir()
    img.mkdir()
    uuid = "11111111-2222-3333-4444-555555555555"
    for v, tree in (("old", old), ("new", new)):
        sh("truncate", "-s", "2000M", img / f"{v}.ext4")
        sh("mkfs.ext4", "-q", "-F", "-U", uuid, "-E", f"root_owner=0:0,hash_seed={uuid}",
           "-d", tree, img / f"{v}.ext4")
        cmd = _bd("image", "compress", "-q", "-i", img / f"{v}.ext4", "-o", www / f"{v}.bdar")
        out.append(f"image compress {v} {_timed(cmd)}  {_size(www / f'{v}.bdar')}")
    srv = _Nginx(www, w / "nginx-img")
    try:
        slot = img / "slot.ext4"
        shutil.copyfile(img / "old.ext4", slot)
        m = srv.mark()
        cmd = _bd("image", "clone", "-q", f"{srv.url}/new.bdar", "--output", slot, "--in-place")
        out.append(f"image clone new onto old (in place) {_timed(cmd)}  {srv.since(m)}")
        if shutil.which("casync"):
            cas = www / "casync"
            cas.mkdir()
            for v in ("old", "new"):
                cmd = ["casync", "make", f"--store={cas}/default.castr",
                       str(cas / f"{v}.caibx"), str(img / f"{v}.ext4")]
                out.append(f"casync make {v} {_timed(cmd)}")
            res = img / "cas.ext4"
            m = srv.mark()
            cmd = ["casync", "extract", f"--store={srv.url}/casync/default.castr",
                   f"--seed={img / 'old.ext4'}", f"{srv.url}/casync/new.caibx", str(res)]
            out.append(f"casync extract new --seed old {_timed(cmd)}  {srv.since(m)}")
            same = all(subprocess.run(["cmp", "-s", str(f), str(img / "new.ext4")],
                                      check=False).returncode == 0 for f in (res, slot))
            out.append(f"  both clones equal to the new image: {same}")
    finally:
        srv.srv.stop()
    shutil.rmtree(img)
    shutil.rmtree(www)


def _repo(w: Path, src: Path, dst: Path, out: list[str]) -> None:
    repo = w / "repo" / "os"
    repo.parent.mkdir()
    sh(*_bd("key", "generate", "-o", w / "root"))
    sh(*_bd("repo", "init", repo))
    for v, snap in (("v1", "A"), ("v2", "B")):
        out.append(f"repo add {v} {_timed(_bd('repo', 'add', '-q', repo, v, src / snap))}")
    sh(*_bd("repo", "sign", repo, "--key", w / "root.key"))
    srv = _Nginx(repo.parent, w / "nginx-repo")
    up = dst / "up"
    up.mkdir()
    try:
        for label, extra in (("nothing -> v1", ["--to", "v1"]), ("v1 -> v2", [])):
            m = srv.mark()
            cmd = _bd("update", "-q", f"{srv.url}/os", up, "--key", w / "root.pub", *extra)
            out.append(f"update {label} {_timed(cmd)}  {srv.since(m)}")
    finally:
        srv.srv.stop()
    out.append(f"  v2 equal: {_sum(up / 'v2') == _sum(src / 'B')}")
    shutil.rmtree(repo.parent)


def _clear(mnt: Path) -> None:
    """Delete what a step received under ``mnt`` (a disk is short of room for all of it)."""
    for d in mnt.iterdir():
        for sub in d.iterdir() if d.is_dir() else ():
            if sub.is_dir() and sub.stat().st_ino == 256:
                sh("btrfs", "-q", "subvolume", "delete", sub)
        shutil.rmtree(d, ignore_errors=True)


def _fill(vol: Path, tree: Path, *, rsync: bool = False) -> None:
    if rsync:
        sh("rsync", "-aHAX", "--delete", f"{tree}/", f"{vol}/")
    else:
        sh("btrfs", "-q", "subvolume", "create", vol)
        sh("cp", "-a", f"{tree}/.", str(vol))
    sh("sync")


def _sendshots(w: Path, src: Path, dst: Path, old: Path, new: Path, out: list[str]) -> None:
    kp = dst / "kp"
    kp.mkdir()
    cmd = _sh(f"btrfs send -q {src}/A | btrfs receive -q {kp}")
    out.append(f"kernel send A | receive        {_timed(cmd)}")
    cmd = _sh(f"btrfs send -q -p {src}/A {src}/B | btrfs receive -q {kp}")
    out.append(f"kernel send -p A B | receive   {_timed(cmd)}")
    live, store = src / "live", w / "store"
    _fill(live, old)
    s1, s2 = w / "ss1.stream", w / "ss2.stream"
    cmd = _bd("send", "-q", live, "-o", s1, "--record", "--store", store, "--name", "live.1")
    out.append(f"send --record (live)           {_timed(cmd)}")
    _fill(live, new, rsync=True)
    cmd = _bd("send", "-q", live, "-o", s2, "--from-sendshot", "latest", "--store", store,
              "--record", "--name", "live.2")
    out.append(f"send --from-sendshot (live)    {_timed(cmd)}  {_size(s2)}")
    s1.unlink()
    s2.unlink()
    rep, dest = src / "rep", dst / "rep"
    _fill(rep, old)
    dest.mkdir()
    cmd = _bd("replicate", "-q", "--store", w / "repstore", rep, dest)
    out.append(f"replicate full                 {_timed(cmd)}")
    _fill(rep, new, rsync=True)
    out.append(f"replicate incremental          {_timed(cmd)}")
    newest = max(p for p in dest.iterdir() if not p.name.startswith("."))
    out.append(f"  replica equal: {_sum(newest) == _sum(src / 'B')}")


def run() -> list[str]:
    if os.environ.get("BTRDELTA_BENCH_REALROOT") != "1":
        return ["skipped: BTRDELTA_BENCH_REALROOT=1 runs it (~10 min, ~20 GB of disk)"]
    from benchmarks.realroot import realroot_pair

    old, new = realroot_pair()
    out: list[str] = []
    base = os.environ.get("BTRDELTA_BENCH_WORKDIR", "/var/tmp")
    w = Path(tempfile.mkdtemp(prefix="bench-realroot-", dir=base))
    try:
        with loop_fs("btrfs", size="10G", workdir=base) as src, \
                loop_fs("btrfs", size="8G", workdir=base) as dst, \
                loop_fs("ext4", size="4G", workdir=base) as ext:
            _fill(src / "vol", old)
            sh("btrfs", "-q", "subvolume", "snapshot", "-r", src / "vol", src / "A")
            _fill(src / "vol", new, rsync=True)
            sh("btrfs", "-q", "subvolume", "snapshot", "-r", src / "vol", src / "B")
            out.append(f"# load {os.getloadavg()[0]:.1f} at the start")
            for step in (lambda: _receive(w, src, dst, ext, out),
                         lambda: _send_delta(w, src, dst, out),
                         lambda: _images(w, old, new, out),
                         lambda: _repo(w, src, dst, out),
                         lambda: _sendshots(w, src, dst, old, new, out)):
                step()
                _clear(dst)
            out.append(f"# load {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(w, ignore_errors=True)
    return out
