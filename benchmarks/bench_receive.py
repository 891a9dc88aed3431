"""``btrdelta receive`` vs ``btrfs receive``, same streams, same machine, one run.

Streams (made by the kernel on a loop-mounted btrfs):

* a real tree: ``benchmarks.trees.real_pair()`` (a Debian minbase root and the same after
  ``apt-get upgrade``, applied with ``rsync``) when it can be built, else a copy of
  real directories of this machine (/usr/bin, /usr/share/doc, /usr/include, /usr/lib/python3,
  /usr/share/zoneinfo, /usr/share/perl: ~20k files, ~600 MB) as snapshot A, and B = A after
  an "upgrade" (10% of the files rewritten, some removed, new files, a renamed directory);
  full A and incremental A->B, v1, plus v2 ``--compressed-data`` on a zstd-mounted source;
* a large-file stream: one 2 GB file (half random, half compressible text), v1.

Each stream is received by ``btrfs receive`` and by ``btrdelta receive`` (as a command, into
btrfs, fresh destination per run, best of ``REPEAT`` rounds with the order of the tools
alternating) and also by
``btrdelta receive`` into ext4 (directory backend, for information). Wall time and the peak
RSS of each receiving process (``os.wait4`` rusage) are reported with the ratio.

Run: ``.venv/bin/python -m benchmarks.bench_receive`` (needs root and loop devices;
``BTRDELTA_BENCH_LARGE`` sets the large file's size, ``BTRDELTA_BENCH_WORKDIR`` where the
loop images live (default /dev/shm when it has 16 GiB free), ``BTRDELTA_BENCH_REPEAT`` the
rounds (default 3; at least 5 for the large file), ``BTRDELTA_BENCH_LOCAL_TREE=1`` forces
the local-directories tree). The package's byte code is compiled first, as it is in an
installed package.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh

PY = sys.executable
REPEAT = int(os.environ.get("BTRDELTA_BENCH_REPEAT", "3"))
TREE_DIRS = ["/usr/bin", "/usr/share/doc", "/usr/include", "/usr/lib/python3",
             "/usr/share/zoneinfo", "/usr/share/perl"]
LARGE = int(os.environ.get("BTRDELTA_BENCH_LARGE", str(2 << 30)))
def _workdir() -> str | None:
    """Where the loop images live: ``BTRDELTA_BENCH_WORKDIR``, else /dev/shm when it has
    room (the loop device's writeback to the root disk made rounds vary by ±20%), else the
    default temporary directory."""
    if os.environ.get("BTRDELTA_BENCH_WORKDIR"):
        return os.environ["BTRDELTA_BENCH_WORKDIR"]
    try:
        if shutil.disk_usage("/dev/shm").free > 16 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return None


WORKDIR = _workdir()
#: rounds of the large-file stream (its times vary most)
LARGE_REPEAT = max(REPEAT, 5)


def _timed(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return (seconds, peak RSS in KiB of that process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err}")
    return elapsed, usage.ru_maxrss


def _real_pair() -> tuple[Path, Path] | None:
    """The cached Debian minbase pair (``benchmarks.trees.real_pair``), if available."""
    if os.environ.get("BTRDELTA_BENCH_LOCAL_TREE"):
        return None
    try:
        from benchmarks import trees

        _name, old, new = trees.real_pair()
        return old, new
    except (ImportError, AttributeError, OSError, subprocess.CalledProcessError):
        return None


def _fill_tree(vol: Path, pair: tuple[Path, Path] | None) -> None:
    if pair is not None:
        sh("cp", "-a", "--", f"{pair[0]}/.", str(vol))
        return
    for d in TREE_DIRS:
        if os.path.isdir(d):
            dst = vol / d.strip("/").replace("/", "_")
            sh("cp", "-a", "--", d, str(dst))


def _upgrade(vol: Path, pair: tuple[Path, Path] | None) -> None:
    if pair is not None:  # the real upgrade: rsync writes new files and renames them
        sh("rsync", "-a", "--delete", f"{pair[1]}/", f"{vol}/")
        return
    rng = random.Random(42)
    files = sorted(p for p in vol.rglob("*") if p.is_file() and not p.is_symlink())
    for p in rng.sample(files, len(files) // 10):
        data = p.read_bytes()
        p.unlink()  # new inode, as a package manager writes it
        p.write_bytes(data[: len(data) // 2] + b"upgraded\n" + data[len(data) // 2 :])
    for p in rng.sample(files, len(files) // 50):
        if p.exists():
            p.unlink()
    new = vol / "usr_share_newpkg"
    new.mkdir()
    for i in range(300):
        (new / f"f{i}").write_bytes(os.urandom(rng.randrange(100, 20000)))
    dirs = sorted(p for p in vol.iterdir() if p.is_dir())
    dirs[0].rename(vol / (dirs[0].name + "-renamed"))


def _large(vol: Path) -> None:
    half = LARGE // 2
    path = vol / "disk.img"
    with open(path, "wb") as f:
        f.truncate(0)
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=4M", f"count={half >> 22}", "status=none")
    text = b"".join(b"%08d some text of a large file\n" % i for i in range(100000))
    with open(path, "ab") as f:
        left = LARGE - half
        while left > 0:
            n = min(left, len(text))
            f.write(text[:n])
            left -= n


def _make_streams(src: Path, out: Path, v2: bool) -> dict[str, Path]:
    streams: dict[str, Path] = {}
    tag = "v2" if v2 else "v1"
    vol = src / f"vol-{tag}"
    sh("btrfs", "-q", "subvolume", "create", str(vol))
    pair = _real_pair()
    _fill_tree(vol, pair)
    sh("sync")
    sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(src / f"A-{tag}"))
    _upgrade(vol, pair)
    sh("sync")
    sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(src / f"B-{tag}"))
    extra = ["--proto", "2", "--compressed-data"] if v2 else []
    streams[f"tree-full-{tag}"] = out / f"A-{tag}.stream"
    sh("btrfs", "-q", "send", *extra, "-f", str(streams[f"tree-full-{tag}"]),
       str(src / f"A-{tag}"))
    streams[f"tree-incr-{tag}"] = out / f"B-{tag}.stream"
    sh("btrfs", "-q", "send", *extra, "-p", str(src / f"A-{tag}"), "-f",
       str(streams[f"tree-incr-{tag}"]), str(src / f"B-{tag}"))
    return streams


def _receive_pair(kind: str, full: Path, incr: Path | None, dests: dict[str, Path],
                  round_: int) -> dict[str, tuple[float, int]]:
    """Receive full (+ incr) with each tool; time the last stream received."""
    results: dict[str, tuple[float, int]] = {}
    tools: dict[str, Callable[[Path, Path], list[str]]] = {
        "btrfs": lambda s, d: ["btrfs", "receive", "-f", str(s), str(d)],
        "btrdelta": lambda s, d: [PY, "-m", "btrdelta", "receive", "-f", str(s), str(d)],
        "btrdelta-ext4": lambda s, d: [PY, "-m", "btrdelta", "receive", "-f", str(s), str(d)],
    }
    order = list(tools.items())
    if round_ % 2:  # alternate who goes first (page cache, writeback, allocator state)
        order.reverse()
    for tool, mk in order:
        d = dests[tool] / f"{kind}-{round_}"
        d.mkdir()
        if incr is not None:
            _timed(mk(full, d))
            sh("sync")
            results[tool] = _timed(mk(incr, d))
        else:
            results[tool] = _timed(mk(full, d))
        sh("sync")
    for root in dests.values():  # free the space before the next round
        _remove(root / f"{kind}-{round_}")
    return results


def _remove(d: Path) -> None:
    subs = [str(p) for p in d.iterdir()] if d.exists() else []
    if subs:
        subprocess.run(["btrfs", "-q", "subvolume", "delete", *subs], capture_output=True,
                       check=False)
    shutil.rmtree(d, ignore_errors=True)
    subprocess.run(["btrfs", "subvolume", "sync", str(d.parent)], capture_output=True,
                   check=False)


def run() -> list[str]:
    """Run the benchmark; return (and print) the result lines."""
    lines: list[str] = []

    def report(name: str, res: dict[str, tuple[float, int]], size: int) -> None:
        kt, krss = res["btrfs"]
        ot, orss = res["btrdelta"]
        et, erss = res["btrdelta-ext4"]
        line = (f"{name:18s} {size / 2**20:8.1f} MiB  btrfs receive {kt:6.2f}s {krss // 1024:4d} MB"
                f" | btrdelta {ot:6.2f}s {orss // 1024:4d} MB  ratio {ot / kt:4.2f}"
                f" | btrdelta->ext4 {et:6.2f}s {erss // 1024:4d} MB")
        print(line, flush=True)
        lines.append(line)

    # an installed package has its byte code compiled; a source tree run with
    # PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every run (~60 ms)
    subprocess.run([PY, "-m", "compileall", "-q", str(Path(__file__).parents[1] / "src")],
                   stdout=subprocess.DEVNULL, check=False)
    w = WORKDIR
    with loop_fs("btrfs", size="8G", workdir=w) as src, \
            loop_fs("btrfs", size="8G", workdir=w) as kdst, \
            loop_fs("btrfs", size="8G", workdir=w) as odst, \
            loop_fs("ext4", size="8G", workdir=w) as edst:
        out = src / "streams"
        out.mkdir()
        streams = _make_streams(src, out, v2=False)
        sh("mount", "-o", "remount,compress=zstd", str(src))
        streams.update(_make_streams(src, out, v2=True))
        dests = {"btrfs": kdst, "btrdelta": odst, "btrdelta-ext4": edst}
        for tag in ("v1", "v2"):
            full, incr = streams[f"tree-full-{tag}"], streams[f"tree-incr-{tag}"]
            best_f: dict[str, tuple[float, int]] = {}
            best_i: dict[str, tuple[float, int]] = {}
            for r in range(REPEAT):
                for best, args in ((best_f, (full, None)), (best_i, (full, incr))):
                    res = _receive_pair(f"{tag}-{'f' if args[1] is None else 'i'}",
                                        args[0], args[1], dests, r)
                    for k, v in res.items():
                        if k not in best or v[0] < best[k][0]:
                            best[k] = v
            report(f"tree full {tag}", best_f, full.stat().st_size)
            report(f"tree incr {tag}", best_i, incr.stat().st_size)
        for d in (kdst, odst, edst):
            for p in list(d.iterdir()):
                if p.name != "lost+found":
                    subprocess.run(["btrfs", "-q", "subvolume", "delete", *map(str, p.iterdir())],
                                   capture_output=True, check=False)
                    shutil.rmtree(p, ignore_errors=True)
            if d != edst:
                subprocess.run(["btrfs", "subvolume", "sync", str(d)], capture_output=True,
                               check=False)
        for p in out.glob("*.stream"):
            p.unlink()
        sh("mount", "-o", "remount,compress=no", str(src))
        vol = src / "vol-large"
        sh("btrfs", "-q", "subvolume", "create", str(vol))
        _large(vol)
        sh("sync")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(src / "L"))
        large = out / "large.stream"
        sh("btrfs", "-q", "send", "-f", str(large), str(src / "L"))
        shutil.rmtree(vol, ignore_errors=True)
        best_l: dict[str, tuple[float, int]] = {}
        for r in range(LARGE_REPEAT):
            for k, v in _receive_pair("large", large, None, dests, r).items():
                if k not in best_l or v[0] < best_l[k][0]:
                    best_l[k] = v
        report("large file v1", best_l, large.stat().st_size)
    return lines


if __name__ == "__main__":
    run()
