"""``btrdelta send`` vs the kernel's ``btrfs send -p`` and ``rsync --only-write-batch``.

Trees: ``benchmarks.trees.real_pair()`` (a Debian bookworm minbase before and after
``apt-get upgrade``, cached; else a real tree of this machine). On a loop-mounted btrfs:

* ``A``: OLD as a read-only snapshot;
* ``B-rsync``: a snapshot of A with NEW rsynced in place (``rsync -aHAX --delete``): what the
  kernel handles best, it sends only changed extents;
* ``B-rebuilt``: NEW copied into a fresh subvolume (every file new, as a release pipeline
  rebuilds its image from scratch): the kernel resends everything.

For both, the incremental stream of the kernel (``btrfs send -p A B``) is compared with
``btrdelta send B --parent A`` (same snapshots read as plain directories; default exact
content comparison and ``--quick`` size+mtime trust like rsync), and the generation time with
``rsync -aHAX --only-write-batch`` (B -> A). Peak RSS of each process from ``os.wait4``.
Each btrdelta stream is received by the kernel and checked with tree-sum. Times are the
best of ``BTRDELTA_BENCH_REPEAT`` (default 3) runs.

Then :func:`run_many`: a tree of ``$BTRDELTA_BENCH_SEND_FILES`` (default 100,000; 0 skips
it) tiny files, 1,000 a directory, as a read-only snapshot ``A`` and ``B`` (a snapshot of A
with 1% of the files changed, 1% renamed across directories and two directories swapped).
Full (``btrfs send A``) and incremental (``-p A B``) streams of the kernel and of btrdelta
(``A``/``B`` read as plain directories), plus the whole-tree models the full and the
incremental send used before (``Sender``; with a ``TreeScan``), with peak RSS (bytes a file)
and CPU time against the kernel; btrdelta's full and incremental streams are received by the
kernel and checked with tree-sum.

Run: ``.venv/bin/python -m benchmarks send`` (needs root and loop devices; the loop image
goes to ``$BTRDELTA_BENCH_WORKDIR``, default the system temp dir, e.g. ``/dev/shm`` when the
disk is short of space). ``python -m benchmarks.bench_send many`` runs only the second part.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.trees import real_pair
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh
from btrdelta.tree.treesum import tree_sum

PY = sys.executable


#: timings are the best of this many rounds (the machine is shared and noisy); in each
#: round every tool runs once, interleaved, so load spikes hit all of them alike
REPEAT = int(os.environ.get("BTRDELTA_BENCH_REPEAT", "3"))


def _timed_once(cmd: list[str]) -> tuple[float, int, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in KiB, CPU seconds incl. children)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - t0
    err = proc.stderr.read() if proc.stderr else b""
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {err.decode(errors='replace')[-500:]}")
    return elapsed, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def _timed_rounds(cmds: dict[str, list[str]]) -> dict[str, tuple[float, int, float]]:
    """Best wall time, peak RSS and least CPU time of each command over REPEAT interleaved
    rounds (CPU time is what decides when the other engineers' jobs fill both cores)."""
    best: dict[str, tuple[float, int, float]] = {k: (float("inf"), 0, float("inf")) for k in cmds}
    for _ in range(REPEAT):
        for key, cmd in cmds.items():
            t, rss, cpu = _timed_once(cmd)
            b = best[key]
            best[key] = (min(b[0], t), max(b[1], rss), min(b[2], cpu))
    return best


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def run() -> list[str]:
    """Run the benchmark; return (and print) the result lines."""
    return _run_pair() + run_many()


#: the old full-send path (the whole-tree model, as before send/full.py) for comparison
_MODEL = ("import sys; from btrdelta.send.emit import Sender; "
          "from btrdelta.stream.writer import StreamWriter; "
          "f = open(sys.argv[2], 'wb'); w = StreamWriter(f.write, 1)\n"
          "for r in Sender(sys.argv[1]).records(): w.write(r)")


#: the incremental send as it was before send/changes.py: both trees scanned and held whole
#: (an explicit TreeScan keeps Sender on that path)
_MODEL_INC = ("import sys; from btrdelta.send.emit import Sender; "
              "from btrdelta.send.scan import TreeScan; "
              "from btrdelta.stream.writer import StreamWriter; "
              "f = open(sys.argv[3], 'wb'); w = StreamWriter(f.write, 1)\n"
              "s = TreeScan(sys.argv[1], sys.argv[2])\n"
              "for r in Sender(sys.argv[1], sys.argv[2], scan=s).records(): w.write(r)")


def _make_many(root: Path, files: int) -> None:
    """``files`` tiny files, 1,000 a directory (a few bytes each, as fast as Python goes)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(0, files, 1000):
        d = root / f"d{i // 1000:05d}"
        d.mkdir()
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for j in range(i, min(files, i + 1000)):
                fd = os.open(f"f{j:07d}", flags, 0o644, dir_fd=dfd)
                os.write(fd, b"%d\n" % j)
                os.close(fd)
        finally:
            os.close(dfd)


def _change_many(root: Path, files: int) -> None:
    """1% of the files rewritten, 1% moved to another directory, two directories swapped."""
    dirs = max(1, (files + 999) // 1000)
    for j in range(0, files, 100):
        (root / f"d{j // 1000:05d}" / f"f{j:07d}").write_bytes(b"changed %d\n" % j)
    for j in range(50, files, 100):
        src = root / f"d{j // 1000:05d}" / f"f{j:07d}"
        src.rename(root / f"d{(j // 1000 + 1) % dirs:05d}" / f"moved-{j:07d}")
    if dirs > 2:
        (root / "d00000").rename(root / "swap")
        (root / "d00001").rename(root / "d00000")
        (root / "swap").rename(root / "d00001")


def run_many(files: int | None = None) -> list[str]:
    """Full and incremental sends of a tree of many tiny files; the result lines."""
    n = int(os.environ.get("BTRDELTA_BENCH_SEND_FILES", "100000")) if files is None else files
    lines: list[str] = []
    if n <= 0:
        return lines

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    size = f"{max(2, n * 6 // 1_000_000 + 2)}G"
    with loop_fs("btrfs", size=size, workdir=os.environ.get("BTRDELTA_BENCH_WORKDIR")) as mnt:
        sh("btrfs", "-q", "subvolume", "create", mnt / "vol")
        t0 = time.monotonic()
        _make_many(mnt / "vol", n)
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "vol", mnt / "A")
        _change_many(mnt / "vol", n)
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "vol", mnt / "B")
        sh("sync")
        out(f"# many files: {n} files made in {time.monotonic() - t0:.0f}s")
        a, b = mnt / "A", mnt / "B"
        cmds = {
            "kernel full": ["btrfs", "-q", "send", "-f", str(mnt / "k.full"), str(a)],
            "btrdelta full": [PY, "-m", "btrdelta", "send", str(a), "-o", str(mnt / "o.full")],
            "model full (before)": [PY, "-c", _MODEL, str(a), str(mnt / "m.full")],
            "kernel -p": ["btrfs", "-q", "send", "-p", str(a), "-f", str(mnt / "k.inc"),
                          str(b)],
            "btrdelta -p": [PY, "-m", "btrdelta", "send", str(b), "-p", str(a), "-o",
                            str(mnt / "o.inc")],
            "model -p (before)": [PY, "-c", _MODEL_INC, str(b), str(a), str(mnt / "m.inc")],
        }
        results = {key: _timed_rounds({key: cmd})[key] for key, cmd in cmds.items()}
        base = _timed_once([PY, "-c", "import btrdelta.cli.send_cmd, btrdelta.send.full, "
                            "btrdelta.send.emit"])[1]
        out(f"# python with btrdelta's send imported: {base / 1024:.1f} MB (B/file: above it)")
        for kind in ("full", "-p"):
            kt, krss, kcpu = results[f"kernel {kind}"]
            out(f"{kind:5s} kernel btrfs send       {kt:7.2f}s cpu {kcpu:7.2f}s"
                f" rss {krss / 1024:8.1f} MB")
            for key in (f"btrdelta {kind}", f"model {kind} (before)"):
                if key not in results:
                    continue
                t, rss, cpu = results[key]
                out(f"{kind:5s} {key:22s} {t:7.2f}s cpu {cpu:7.2f}s rss {rss / 1024:8.1f} MB"
                    f"  {(rss - base) * 1024 / n:7.0f} B/file  rss/kernel {rss / krss:6.1f}"
                    f"  time/kernel {t / kt:6.1f}  cpu/kernel {cpu / max(kcpu, 1e-3):6.1f}")
        dest = mnt / "recv"
        dest.mkdir()
        sh("btrfs", "receive", "-f", mnt / "o.full", dest)
        ok = tree_sum(dest / "A") == tree_sum(a)
        out(f"full  kernel receive of btrdelta's full stream == A: {ok}")
        sh("btrfs", "receive", "-f", mnt / "o.inc", dest)
        ok = tree_sum(dest / "B") == tree_sum(b)
        out(f"-p    kernel receive of btrdelta's -p stream == B: {ok}")
    return lines


def _run_pair() -> list[str]:
    """The real tree pair (see the module docstring); the result lines."""
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    name, old, new = real_pair()
    out(f"# bench_send on {name}")
    with loop_fs("btrfs", size="4G", workdir=os.environ.get("BTRDELTA_BENCH_WORKDIR")) as mnt:
        sh("btrfs", "-q", "subvolume", "create", mnt / "vol")
        sh("cp", "-a", f"{old}/.", str(mnt / "vol"))
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "vol", mnt / "A")
        sh("rsync", "-aHAX", "--delete", f"{new}/", f"{mnt / 'vol'}/")
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "vol", mnt / "B-rsync")
        sh("btrfs", "-q", "subvolume", "create", mnt / "vol2")
        sh("cp", "-a", "--reflink=never", f"{new}/.", str(mnt / "vol2"))
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "vol2", mnt / "B-rebuilt")
        sh("sync")
        a = mnt / "A"
        for case in ("B-rsync", "B-rebuilt"):
            b = mnt / case
            ks = mnt / f"{case}.kernel"
            rs = mnt / f"{case}.rsync"
            variants: list[list[str]] = [[], ["--quick"], ["--proto", "2", "--compress", "zstd"]]
            cmds = {
                "kernel": ["btrfs", "-q", "send", "-p", str(a), "-f", str(ks), str(b)],
                "rsync": ["rsync", "-aHAX", "--delete", f"--only-write-batch={rs}",
                          f"{b}/", f"{a}/"],
            }
            for flags in variants:
                cmds[" ".join(flags) or "(exact)"] = [
                    PY, "-m", "btrdelta", "send", str(b), "--parent", str(a),
                    "-o", str(mnt / f"{case}.btrdelta{''.join(flags)}"), *flags,
                ]
            best = _timed_rounds(cmds)
            kt, krss, kcpu = best["kernel"]
            ksize = ks.stat().st_size
            out(f"{case:10s} kernel btrfs send -p      {_mib(ksize)}  {kt:6.2f}s"
                f" {krss // 1024:4d} MB  cpu {kcpu:5.2f}s")
            bt, brss, bcpu = best["rsync"]
            out(f"{case:10s} rsync --only-write-batch  {_mib(rs.stat().st_size)}  {bt:6.2f}s"
                f" {brss // 1024:4d} MB  cpu {bcpu:5.2f}s")
            for flags in variants:
                label = " ".join(flags) or "(exact)"
                t, rss, cpu = best[label]
                size = (mnt / f"{case}.btrdelta{''.join(flags)}").stat().st_size
                out(f"{case:10s} btrdelta send {label:12s} {_mib(size)}  {t:6.2f}s"
                    f" {rss // 1024:4d} MB  cpu {cpu:5.2f}s   size/kernel {size / ksize:6.3f}"
                    f"  time/rsync {t / bt:5.2f}  cpu/rsync {cpu / bcpu:5.2f}")
            # correctness: the kernel receives btrdelta's streams
            dest = mnt / f"recv-{case}"
            dest.mkdir()
            full = mnt / "A.full"
            sh(PY, "-m", "btrdelta", "send", str(a), "-o", str(full))
            sh("btrfs", "receive", "-f", full, dest)
            sh("btrfs", "receive", "-f", mnt / f"{case}.btrdelta", dest)
            ok = tree_sum(dest / case) == tree_sum(b)
            out(f"{case:10s} kernel receive of btrdelta's streams == {case}: {ok}")
    return lines


if __name__ == "__main__":
    if sys.argv[1:] == ["many"]:
        run_many()
    else:
        run()
