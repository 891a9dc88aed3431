"""Sendshots vs keeping the old snapshot (``btrfs send -p``), and replication throughput.

Workloads on a loop-mounted btrfs, each over ``ROUNDS`` rounds of changes to one live
subvolume (``BTRDELTA_BENCH_ROUNDS``, default 3; ``BTRDELTA_BENCH_WORKLOADS``: a comma-separated
subset of the names below and ``replicate``, default all):

* ``in-place``: a tree of the Debian bookworm files of ``benchmarks.trees.real_pair()``
  changed in place (appends, overwrites in the middle, truncations, renames, hard links,
  deletions, xattrs, punched holes);
* ``in-place-large``: the same changes to the same files in a tree 7 times as large
  (beside them :data:`LARGE_COPIES` copies of ``debian-install-new`` of
  ``benchmarks.trees.debian_install_pair()``: 42,401 inodes, ~800 MB, against 5,965 and
  110 MiB), which none of the changes touch: the kernel's ``send -p`` costs what changed,
  and the time of ours beside it says how much of it grows with the tree (issue 15: 3-5x
  the kernel's here, session 23, against ~2x on the small tree);
* ``in-place-read``, ``in-place-large-du`` and ``in-place-large-read``: the changes of
  ``in-place`` (``in-place-large``), then a read of the live subvolume as a user checking it
  does (issue 15, session 28): ``du`` (every directory listed: what ``find``, ``du`` or a
  daily ``updatedb`` do) or ``find -type f -exec cat`` (every directory listed and every
  file read: ``diff -r``, a backup). The subvolume is mounted ``strictatime`` for these (on
  the default ``relatime`` a read moves an atime once a day or after a change: every round
  here is such a first read): each directory's and file's inode item is written again for
  its atime alone, so its transid moves (the kernel's ``send -p`` sends their ``utimes``);
* ``sqlite``: a SQLite database under a write load between rounds;
* ``rebuilt``: a directory removed and written again with mostly the same content.

Each round, side by side: the kernel (a read-only snapshot per round, the previous one kept,
``btrfs send -p``) and ``btrdelta send LIVE --from-sendshot latest --record`` (no snapshot
kept): stream bytes (goal <= 1.05x the kernel's, smaller where content moved), time (goal
<= 2x, unchanged files never read), the record's size against the subvolume's data (goal
<= 1 %; since session 24 a patch record, shown with the records it is read with: its chain
of bases, what the store keeps for the next send). What each time includes:

* kernel ``send -p``: ``btrfs send -p PREV SNAP -f FILE`` alone (the process, the stream
  written, no fsync). Its workflow also makes SNAP each round (``btrfs subvolume snapshot
  -r``, a transaction commit), timed apart as "snapshot". It also deletes PREV once SNAP
  was sent, which is not timed: the benchmark's own tree-sum and ``du`` of each snapshot
  leave its inodes cached, which made that ``btrfs subvolume delete`` take 30-40 ms of CPU
  (session 21; under 5 ms for a snapshot nothing read), more than a user's workflow pays;
* ours (live): the whole ``btrdelta send LIVE -o FILE --from-sendshot latest --record``
  process: interpreter start and imports, a temporary read-only snapshot made and deleted,
  the record loaded, the change sweep, the stream, the next record written (not
  ``fsync``-ed, as the stream is not); compared with snapshot + ``send -p`` (its temporary
  snapshot's deletion, ~1 ms of its process, has no counterpart there);
* ours (read-only): the same command on the kernel's read-only SNAP (no temporary snapshot;
  a store of its own, so the base is the record of PREV): like for like with ``send -p``.
  Its ``--json`` says how many bytes of files were read (unchanged files are not).

Each time is printed with its CPU time (user + system, every thread): a round that another
process or the kernel's own threads (writeback, the loop devices' workers) slowed shows a
longer wall time for the same CPU (session 21: the rounds that missed 2x near idle).

All three streams are received by ``btrfs receive`` and compared with tree-sum. After the
rounds: what the kernel's kept snapshot pins (``btrfs filesystem du``), and, on the files
that changed, the bytes a diff by fixed 4 KiB blocks finds against content-defined chunks
(FastCDC, 16 KiB average), with the size of their digests.

Then ``btrdelta replicate LIVE DEST`` (a local ``--serve`` child over a pipe) against
``btrfs send S | btrfs receive`` for a full stream (goal >= 0.9x the throughput), and the wire
bytes of an incremental with ``--compress zstd`` against without.

Run: ``.venv/bin/python -m benchmarks sendshot`` (root, loop devices).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
from pyfastcdc.cy import FastCDC

from benchmarks.trees import debian_install_pair, real_pair
from btrdelta.send.store import SendshotStore
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh
from btrdelta.tree.treesum import tree_sum

PY = sys.executable
#: the ``btrdelta`` command as a user runs it: the console script installed beside the
#: interpreter (``python -m btrdelta`` also imports ``runpy`` and ``importlib``: ~3.5 M
#: instructions more, ~0.7 ms of a small send's ~55), else ``python -m btrdelta``
_SCRIPT = Path(PY).parent / "btrdelta"
BTRDELTA = [str(_SCRIPT)] if os.access(_SCRIPT, os.X_OK) else [PY, "-m", "btrdelta"]
ROUNDS = int(os.environ.get("BTRDELTA_BENCH_ROUNDS", "3"))
WORKDIR = os.environ.get("BTRDELTA_BENCH_WORKDIR")
#: copies of the Debian tree with packages installed beside the in-place tree's files
#: (``in-place-large``)
LARGE_COPIES = 4


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, standard output) of ``cmd``; raises on failure. The CPU
    time (user + system of every thread, from the children's rusage: the benchmark runs
    one command at a time) tells a round slowed by other work on the machine from one
    that did more work."""
    c0, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, check=False)
    wall, c1 = time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr.decode(errors='replace')[-400:]}")
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return wall, cpu, proc.stdout.decode(errors="replace")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- workloads ---------------------------------------------------------------------------


def _in_place(live: Path, rng: random.Random) -> Callable[[int], None]:
    _name, _old, new = real_pair()
    sh("cp", "-a", "--reflink=never", f"{new}/usr", str(live / "usr"))
    files = sorted(p for p in (live / "usr").rglob("*") if p.is_file() and not p.is_symlink()
                   and p.stat().st_size > 8192)

    def change(i: int) -> None:
        for p in rng.sample(files, 40):
            if not p.exists():
                continue
            size = p.stat().st_size
            with open(p, "r+b") as f:
                f.seek(rng.randrange(size // 2))
                f.write(rng.randbytes(4096))
        for p in rng.sample(files, 20):
            if p.exists():
                with open(p, "ab") as f:
                    f.write(rng.randbytes(3000))
        for n, p in enumerate(rng.sample(files, 10)):
            if p.exists():
                p.rename(live / f"moved-{i}-{n}")
        for n, p in enumerate(rng.sample(files, 10)):
            if p.exists():
                os.link(p, live / f"link-{i}-{n}")
        for p in rng.sample(files, 10):
            if p.exists():
                os.truncate(p, p.stat().st_size // 2)
        for p in rng.sample(files, 10):
            if p.exists() and p.stat().st_nlink == 1:
                p.unlink()
        for p in rng.sample(files, 10):
            if p.exists():
                os.setxattr(p, "user.round", str(i).encode())
        for p in rng.sample(files, 5):
            if p.exists() and p.stat().st_size > 65536:
                subprocess.run(["fallocate", "-p", "-o", "16384", "-l", "16384", str(p)],
                               check=True)

    return change


def _in_place_large(live: Path, rng: random.Random) -> Callable[[int], None]:
    _old, extra = debian_install_pair()
    for c in range(LARGE_COPIES):
        sh("cp", "-a", "--reflink=never", str(extra), str(live / f"copy{c}"))
    return _in_place(live, rng)


def _reading(setup: Callable[[Path, random.Random], Callable[[int], None]], files: bool
             ) -> Callable[[Path, random.Random], Callable[[int], None]]:
    """``setup``'s workload, each round's changes followed by a read of the live tree (its
    directories listed, and ``files``: every file read), on a ``strictatime`` mount."""
    def reading(live: Path, rng: random.Random) -> Callable[[int], None]:
        change = setup(live, rng)
        sh("mount", "-o", "remount,strictatime", str(live.parent))
        read = (f"find '{live}' -type f -exec cat {{}} + > /dev/null" if files
                else f"du -s '{live}' > /dev/null")

        def change_and_read(i: int) -> None:
            change(i)
            sh("sh", "-c", read)

        return change_and_read

    return reading


def _sqlite(live: Path, rng: random.Random) -> Callable[[int], None]:
    con = sqlite3.connect(live / "app.db")
    con.execute("create table t (k integer primary key, v blob)")
    con.executemany("insert into t values (?, ?)", [(k, rng.randbytes(600))
                                                    for k in range(150_000)])
    con.commit()
    con.close()

    def change(i: int) -> None:
        c = sqlite3.connect(live / "app.db")
        for _ in range(2000):
            c.execute("update t set v = ? where k = ?", (rng.randbytes(600),
                                                         rng.randrange(150_000)))
        c.executemany("insert into t (v) values (?)", [(rng.randbytes(400),)
                                                       for _ in range(3000)])
        c.execute("delete from t where k % 211 = ?", (i,))
        c.commit()
        c.close()

    return change


def _rebuilt(live: Path, rng: random.Random) -> Callable[[int], None]:
    _name, _old, new = real_pair()
    src = new / "usr" / "share"

    def build(i: int) -> None:
        shutil.rmtree(live / "share", ignore_errors=True)
        sh("cp", "-a", "--reflink=never", str(src), str(live / "share"))
        for p in sorted((live / "share").rglob("*.gz"))[i * 7:(i + 1) * 7]:
            p.write_bytes(p.read_bytes() + b"rebuilt")

    build(0)
    return build


# -- one workload --------------------------------------------------------------------------


def _diff_stats(old: Path, new: Path) -> tuple[int, int, int, int]:
    """(bytes a fixed-block diff sends, bytes a CDC diff sends, block digests, CDC digests)
    over the regular files of ``new`` that differ from ``old`` at the same path."""
    fixed = cdc_bytes = nblocks = nchunks = 0
    cdc = FastCDC(16384, min_size=4096, max_size=65536)
    for p in new.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        q = old / p.relative_to(new)
        b = p.read_bytes()
        a = q.read_bytes() if q.is_file() and not q.is_symlink() else b""
        nblocks += -(-len(b) // 4096)
        chunks = list(cdc.cut_buf(b)) if b else []
        nchunks += len(chunks)
        if a == b:
            continue
        old_blocks = {xxhash.xxh3_128_digest(a[i:i + 4096]) for i in range(0, len(a), 4096)}
        fixed += sum(min(4096, len(b) - i) for i in range(0, len(b), 4096)
                     if xxhash.xxh3_128_digest(b[i:i + 4096]) not in old_blocks)
        old_chunks = {xxhash.xxh3_128_digest(c.data) for c in cdc.cut_buf(a)} if a else set()
        cdc_bytes += sum(c.length for c in chunks
                         if xxhash.xxh3_128_digest(c.data) not in old_chunks)
    return fixed, cdc_bytes, nblocks, nchunks


def _workload(name: str, setup: Callable[[Path, random.Random], Callable[[int], None]],
              out: Callable[[str], None]) -> None:
    rng = random.Random(11)
    with loop_fs("btrfs", size="6G", workdir=WORKDIR) as mnt, \
            loop_fs("btrfs", size="6G", workdir=WORKDIR) as rcv:
        live, store = mnt / "live", mnt / "store"
        sh("btrfs", "subvolume", "create", str(live))
        change = setup(live, rng)
        for d in ("k", "b", "r"):
            (rcv / d).mkdir()
        # wall and CPU seconds summed over the rounds: k kernel send -p, s its snapshot, b
        # ours of the live subvolume, r ours read-only
        wall = dict.fromkeys("ksbr", 0.0)
        cpu = dict.fromkeys("ksbr", 0.0)
        sums = {"k": 0, "b": 0, "read": 0}
        prev = None
        for i in range(ROUNDS + 1):
            if i:
                change(i)
            sh("sync")
            snap = mnt / f"snap{i}"
            # the kernel's workflow makes a snapshot each round too (btrdelta's time holds its
            # temporary one): shown beside the send-only ratio
            t = {"s": _timed(["btrfs", "subvolume", "snapshot", "-r", str(live), str(snap)])}
            kfile, bfile = mnt / f"k{i}", mnt / f"b{i}"
            kcmd = ["btrfs", "-q", "send", "-f", str(kfile), str(snap)]
            if prev is not None:
                kcmd[3:3] = ["-p", str(prev)]
            t["k"] = _timed(kcmd)
            bcmd = [*BTRDELTA, "send", str(live), "-o", str(bfile), "--record",
                    "--store", str(store), "--name", f"live.{i}", "--proto", "2"]
            if i:
                bcmd += ["--from-sendshot", "latest"]
            t["b"] = _timed(bcmd)
            rfile = mnt / f"r{i}"
            rcmd = [*BTRDELTA, "send", str(snap), "-o", str(rfile), "--record",
                    "--store", str(mnt / "store-ro"), "--name", f"ro.{i}", "--proto", "2",
                    "--json", *(["--from-sendshot", "latest"] if i else [])]
            t["r"] = _timed(rcmd)
            report = json.loads(t["r"][2])
            for f, d in ((kfile, "k"), (bfile, "b"), (rfile, "r")):
                sh("btrfs", "receive", "-f", str(f), str(rcv / d))
            want = tree_sum(snap)
            ok = tree_sum(rcv / "b" / f"live.{i}") == want == tree_sum(rcv / "r" / f"ro.{i}")
            ks, bs = kfile.stat().st_size, bfile.stat().st_size
            data = sum(f.stat().st_size for f in live.rglob("*") if f.is_file()
                       and not f.is_symlink())
            rec, chain = _chain(store)  # this round's record, with its bases
            if prev is not None:  # what the kernel's kept snapshot pins now
                du = sh("btrfs", "filesystem", "du", "-s", "--raw", str(prev))
                sums["pinned"] = max(sums.get("pinned", 0), int(du.splitlines()[-1].split()[1]))
            if i:
                _round(name, i, t, out, bs, ks, report, data, rec, chain, ok)
                sums["k"] += ks
                sums["b"] += bs
                sums["read"] += int(report["bytes_read"] or 0)
                for k, (w, c, _out) in t.items():
                    wall[k] += w
                    cpu[k] += c
            else:
                out(f"{name} full: {_mib(bs)} vs kernel {_mib(ks)}, {t['b'][0]:.2f} s vs "
                    f"{t['k'][0]:.2f} s, tree-sum {'equal' if ok else 'DIFFERENT'}")
            if prev is not None and i == ROUNDS:
                fixed, cdc, nb, nc = _diff_stats(prev, snap)
                out(f"{name} blocks vs chunks (last round): fixed 4 KiB sends {_mib(fixed)} "
                    f"({nb} digests), FastCDC 16 KiB sends {_mib(cdc)} ({nc} digests)")
            if prev is not None and i < ROUNDS:
                sh("btrfs", "subvolume", "delete", str(prev))
            prev = snap
            for f in (kfile, bfile, rfile):
                f.unlink()
        listing = sh("btrfs", "subvolume", "list", str(mnt)).split()
        kw, kc = wall["k"] + wall["s"], cpu["k"] + cpu["s"]
        out(f"{name} total: {sums['b'] / max(sums['k'], 1):.2f}x kernel bytes; time "
            f"read-only {wall['r']:.2f} s vs send -p {wall['k']:.2f} s "
            f"({wall['r'] / max(wall['k'], 1e-3):.2f}x; CPU {cpu['r']:.2f} vs {cpu['k']:.2f} s, "
            f"{cpu['r'] / max(cpu['k'], 1e-3):.2f}x), live {wall['b']:.2f} s vs snapshot + "
            f"send -p {kw:.2f} s ({wall['b'] / max(kw, 1e-3):.2f}x; CPU "
            f"{cpu['b'] / max(kc, 1e-3):.2f}x); files read {_mib(sums['read'])}; sender holds "
            f"{'only the live subvolume' if listing.count('live') == 1 else listing} + "
            f"sendshots {_mib(_du(store / 'records'))} (all rounds' records); the kernel's "
            f"kept snapshot pins up to {_mib(sums.get('pinned', 0))} (exclusive)")


def _chain(store: Path) -> tuple[int, tuple[int, int]]:
    """The size of the newest record of ``store``, and (records, bytes) of it with the
    records it is read with (a patch record's bases, ``docs/formats/sendshot.md`` §2b):
    what the store must keep for the next send."""
    every = {s.digest: s for s in SendshotStore(store).records_list()}
    cur = max(every.values(), key=lambda s: s.head.created_ns)
    newest, n, total = cur.size, 1, cur.size
    while cur.head.base is not None:
        cur = every[cur.head.base]
        n, total = n + 1, total + cur.size
    return newest, (n, total)


def _round(name: str, i: int, t: dict[str, tuple[float, float, str]],
           out: Callable[[str], None], bs: int, ks: int, report: dict[str, Any], data: int,
           rec: int, chain: tuple[int, int], ok: bool) -> None:
    """One round's line: each side's wall time with its CPU time (user + system) beside it;
    a round slowed by other work on the machine shows a longer wall time, not more CPU."""
    def secs(*keys: str) -> tuple[float, float]:
        return sum(t[k][0] for k in keys), sum(t[k][1] for k in keys)

    (rw, rc), (kw, kc) = secs("r"), secs("k")
    (bw, bc), (aw, ac) = secs("b"), secs("s", "k")
    read = int(report["bytes_read"] or 0)
    out(f"{name} round {i}: stream {_mib(bs)} vs kernel -p {_mib(ks)} ({bs / max(ks, 1):.2f}x); "
        f"time read-only {rw:.3f} s (CPU {rc:.3f}) vs send -p {kw:.3f} s (CPU {kc:.3f}) "
        f"({rw / max(kw, 1e-3):.2f}x), live {bw:.3f} s (CPU {bc:.3f}) vs snapshot + send -p "
        f"{aw:.3f} s (CPU {ac:.3f}) ({bw / max(aw, 1e-3):.2f}x); "
        f"files read {_mib(read)} of {_mib(data)}; record {_mib(rec)}, with its chain "
        f"({chain[0]} records) {_mib(chain[1])} = {100 * chain[1] / max(data, 1):.2f} "
        f"% of the data, tree-sum {'equal' if ok else 'DIFFERENT'}")


def _replication(out: Callable[[str], None]) -> None:
    _name, _old, new = real_pair()
    with loop_fs("btrfs", size="6G", workdir=WORKDIR) as mnt, \
            loop_fs("btrfs", size="6G", workdir=WORKDIR) as rcv:
        live = mnt / "live"
        sh("btrfs", "subvolume", "create", str(live))
        sh("cp", "-a", "--reflink=never", f"{new}/usr", str(live / "usr"))
        sh("sync")
        sh("btrfs", "subvolume", "snapshot", "-r", str(live), str(mnt / "S"))
        (rcv / "k").mkdir()
        (rcv / "b").mkdir()
        size = sum(f.stat().st_size for f in live.rglob("*") if f.is_file()
                   and not f.is_symlink())
        kt = _timed(["sh", "-c",
                     f"btrfs -q send {mnt / 'S'} | btrfs -q receive {rcv / 'k'}"])[0]
        bt = _timed([*BTRDELTA, "replicate", str(live), str(rcv / "b"), "--store",
                     str(mnt / "store"), "-q"])[0]
        out(f"replicate full over a pipe: {_mib(size)} in {bt:.2f} s = {size / bt / 2**20:.0f} "
            f"MiB/s vs btrfs send | btrfs receive {kt:.2f} s = {size / kt / 2**20:.0f} MiB/s "
            f"({kt / bt:.2f}x throughput)")
        rng = random.Random(2)
        for p in sorted((live / "usr").rglob("*.so*"))[:200]:
            if p.is_file() and not p.is_symlink():
                p.write_bytes(p.read_bytes()[:100] + rng.randbytes(200) + p.read_bytes()[300:])
        wire = {}
        for comp in ("none", "zstd"):
            store = mnt / f"store-{comp}"
            shutil.copytree(mnt / "store", store)
            sh(PY, "-m", "btrdelta", "send", str(live), "-o", str(mnt / f"inc-{comp}"),
               "--from-sendshot", "latest", "--store", str(store), "--proto", "2",
               *(["--compress", "zstd"] if comp == "zstd" else []))
            wire[comp] = (mnt / f"inc-{comp}").stat().st_size
        out(f"incremental on the wire: {_mib(wire['none'])} plain, {_mib(wire['zstd'])} with "
            f"--compress zstd ({wire['zstd'] / max(wire['none'], 1):.2f}x)")


def run() -> list[str]:
    """Run the benchmark; return (and print) the result lines."""
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    # an installed package has its byte code compiled; a source tree run with
    # PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every run
    subprocess.run([PY, "-m", "compileall", "-q", str(Path(__file__).parents[1] / "src")],
                   stdout=subprocess.DEVNULL, check=False)
    workloads = {"in-place": _in_place, "in-place-large": _in_place_large,
                 "in-place-read": _reading(_in_place, True),
                 "in-place-large-du": _reading(_in_place_large, False),
                 "in-place-large-read": _reading(_in_place_large, True),
                 "sqlite": _sqlite, "rebuilt": _rebuilt}
    chosen = os.environ.get("BTRDELTA_BENCH_WORKLOADS")
    names = chosen.split(",") if chosen else [*workloads, "replicate"]
    for name in names:
        if name == "replicate":
            _replication(out)
        else:
            _workload(name, workloads[name], out)
    return lines
