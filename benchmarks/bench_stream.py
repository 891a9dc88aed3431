"""Send-stream codec: read speed, metadata decode rate, dump vs ``btrfs receive --dump``.

Targets (issue 2): >= 2 GB/s reading a 2 GB stream of large writes (records typed, every CRC
checked, data untouched); >= 400k commands/s decoding a metadata-heavy stream (>= 500k
commands); `btrdelta dump` within 1.5x of `btrfs receive --dump`; peak memory bounded by the
largest command, not the stream size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from btrdelta.stream import BACKEND, StreamReader, StreamWriter
from btrdelta.stream.records import (
    Chmod,
    Chown,
    End,
    Mkdir,
    Mkfile,
    Rename,
    Subvol,
    Utimes,
    Write,
)
from btrdelta.testing.loopfs import btrfs_available, loop_fs

from .trees import CACHE

LARGE = CACHE / "large-2g.stream"
META = CACHE / "meta-500k.stream"


def _large_stream() -> Path:
    if LARGE.exists():
        return LARGE
    CACHE.mkdir(parents=True, exist_ok=True)
    block = os.urandom(131072)
    tmp = LARGE.with_suffix(".tmp")
    with tmp.open("wb") as f:
        w = StreamWriter(f.write, 2)
        w.write(Subvol(b"big", uuid.UUID(int=1), 1))
        for i in range(16384):  # 2 GiB in 128 KiB writes, 16 files of 128 MiB
            name = b"file%02d" % (i // 1024)
            if i % 1024 == 0:
                w.write(Mkfile(name, 257 + i // 1024))
            w.write(Write(name, (i % 1024) * 131072, block))
        w.write(End())
    tmp.rename(LARGE)
    return LARGE


def _meta_stream() -> tuple[Path, str]:
    """A kernel-made full stream of 100k files (created, renamed, chmodded), else synthetic."""
    if META.exists():
        return META, META.with_suffix(".origin").read_text()
    CACHE.mkdir(parents=True, exist_ok=True)
    if btrfs_available() is None:
        with loop_fs("btrfs", size="4G") as m:
            vol = m / "vol"
            subprocess.run(["btrfs", "-q", "subvolume", "create", str(vol)], check=True)
            for j in range(100):
                os.mkdir(vol / f"d{j}")
                for i in range(1000):
                    os.close(os.open(vol / f"d{j}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
                    os.rename(vol / f"d{j}/f{i}", vol / f"d{j}/file-{i}")
                    os.chmod(vol / f"d{j}/file-{i}", 0o600)
            subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol),
                            str(m / "snap")], check=True)
            subprocess.run(["btrfs", "-q", "send", "-f", str(META), str(m / "snap")], check=True)
        origin = "kernel btrfs send of 100k files"
    else:
        with META.open("wb") as f:
            w = StreamWriter(f.write, 1)
            w.write(Subvol(b"snap", uuid.UUID(int=2), 7))
            for j in range(100):
                w.write(Mkdir(b"d%d" % j, 1000 + j))
                for i in range(1000):
                    tmp, name = b"o%d-7-0" % (300 + i), b"d%d/file-%d" % (j, i)
                    w.write(Mkfile(tmp, 300 + i))
                    w.write(Rename(tmp, name))
                    w.write(Chown(name, 0, 0))
                    w.write(Chmod(name, 0o600))
                    w.write(Utimes(name, 10**18, 10**18, 10**18))
            w.write(End())
        origin = "synthetic (no btrfs here)"
    META.with_suffix(".origin").write_text(origin)
    return META, origin


def _read_all(path: Path) -> tuple[int, float]:
    best = float("inf")
    n = 0
    for _ in range(3):
        with path.open("rb", buffering=0) as f:
            t = time.perf_counter()
            n = sum(1 for _ in StreamReader(f))
            best = min(best, time.perf_counter() - t)
    return n, best


def _wall(cmd: list[str], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return best


def _peak_rss_reading(path: Path) -> int:
    code = ("import sys,resource\nfrom btrdelta.stream import StreamReader\n"
            "f=open(sys.argv[1],'rb',buffering=0)\nfor r in StreamReader(f): pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip()) * 1024


def _backend() -> str:
    if BACKEND != "c":
        return "python (pure; BTRDELTA_PURE_PYTHON set or the C accelerator not built)"
    from btrdelta.stream import _speedups  # type: ignore[attr-defined]
    return f"c (btrdelta.stream._speedups, CRC32C {_speedups.CRC_IMPL})"


def run() -> list[str]:
    lines = [f"backend: {_backend()}"]
    large = _large_stream()
    size = large.stat().st_size
    subprocess.run(["cat", str(large)], stdout=subprocess.DEVNULL, check=True)  # page cache
    n, t = _read_all(large)
    cat = _wall(["cat", str(large)])
    lines.append(f"large writes: {size / 1e9:.2f} GB, {n} commands in {t:.2f} s = "
                 f"{size / t / 1e9:.2f} GB/s (target >= 2); cat: {size / cat / 1e9:.2f} GB/s")
    have_progs = subprocess.run(["which", "btrfs"], capture_output=True).returncode == 0
    if have_progs:
        progs = _wall(["btrfs", "receive", "--dump", "-f", str(large)])
        lines.append(f"  vs btrfs receive --dump (C, CRC checked): {size / progs / 1e9:.2f} GB/s,"
                     f" ratio ours/progs time = {t / progs:.2f}")
    meta, origin = _meta_stream()
    n, t = _read_all(meta)
    lines.append(f"metadata: {n} commands ({origin}) decoded in {t:.2f} s = "
                 f"{n / t / 1e3:.0f}k commands/s (target >= 400k)")
    if have_progs:
        ours = _wall([sys.executable, "-m", "btrdelta", "dump", "-f", str(meta)])
        progs = _wall(["btrfs", "receive", "--dump", "-f", str(meta)])
        lines.append(f"dump of it: btrdelta {ours:.2f} s, btrfs receive --dump {progs:.2f} s, "
                     f"ratio {ours / progs:.2f} (target <= 1.5)")
    rss_large = _peak_rss_reading(large)
    rss_meta = _peak_rss_reading(meta)
    lines.append(f"peak RSS reading: {rss_large / 2**20:.0f} MiB for {size / 2**30:.1f} GiB "
                 f"stream, {rss_meta / 2**20:.0f} MiB for the metadata stream "
                 "(bounded by block + largest command)")
    return lines
