"""Receive of a delta of a ``--compressed-data`` stream vs ``btrfs receive`` of that stream
(issue 12: goal 1.2x the kernel's receive, wall time on this machine's cores, CPU alongside).

For each pair of :mod:`.bench_delta` (Debian upgrade, install of 27 packages, scipy): the
kernel's incremental ``--compressed-data`` stream (``btrfs send --proto 2``, compress=zstd
source) and the full stream of its parent; ``btrdelta delta make`` of the compressed stream
(default options); then ``ROUNDS`` rounds (``BTRDELTA_BENCH_REPEAT``, at least 5) in
alternating order of ``btrfs receive`` of the compressed stream and ``btrdelta receive`` of
its delta, each into a fresh directory of a loop btrfs (image on tmpfs when there is room)
whose parent the kernel received, every receive at ``nice -n -15``, wall time and CPU (user +
system, every thread: ``wait4``), the load average printed before each round. The first
round's trees are compared with ``btrdelta tree-sum --holes --ignore-root-mtime``. Printed:
the medians and the ratios ours / kernel, wall and CPU. ``btrdelta receive`` is run as a
user runs it: the console script beside the interpreter where there is one (as
:mod:`.bench_sendshot` runs ``send``; ``python -m`` also imports ``runpy`` and
``importlib``), else ``python -m btrdelta``.

Run one pair at a time (``BTRDELTA_BENCH_PAIRS`` takes words of the pair's name:
``upgrade``, ``install``, ``scipy``)::

    BTRDELTA_BENCH_CACHE=/work/bench-cache BTRDELTA_BENCH_PAIRS=upgrade \\
        .venv/bin/python -m benchmarks cdreceive

``BTRDELTA_BENCH_FS_SIZE=32G`` makes the loop btrfs at least that large (sparse; default:
1 GiB plus room for every round's streams, ~2.7 GB for scipy). On that small file system
``btrdelta receive`` waits for btrfs's metadata reservations (tickets: 0-65 ms a scipy
receive, in about half of them), ``btrfs receive`` never: see docs/performance.md, issue 12,
session 15. ``BTRDELTA_BENCH_CDKEEP=DIR`` keeps (and reuses) the streams and deltas in ``DIR``
(a kept delta of another format version than ``delta make`` writes is made again);
``BTRDELTA_BENCH_BEFORE=CHECKOUT`` adds, in the same rounds, ``btrdelta receive`` of
another checkout (its ``.venv``: the code before a change). Both packages' byte code is
compiled first, as it is in an installed package.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from btrdelta.delta.format import DELTA_HEADER, DELTA_HEADER_SIZE, DELTA_VERSION_WRITTEN
from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.loopfs import run as sh

from .bench_delta import SCIPY, _kernel_streams, _wheel_trees
from .bench_receive import REPEAT, WORKDIR
from .trees import debian_install_pair, real_pair

PY = sys.executable
ROUNDS = max(5, REPEAT)
BEFORE = os.environ.get("BTRDELTA_BENCH_BEFORE")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _fs_size(default: int) -> int:
    """``BTRDELTA_BENCH_FS_SIZE`` (bytes, or with a K/M/G/T suffix), if larger."""
    text = os.environ.get("BTRDELTA_BENCH_FS_SIZE", "").strip().upper()
    if not text:
        return default
    unit = text[-1] if text[-1] in _UNITS else ""
    return max(default, int(text.removesuffix(unit)) * _UNITS[unit])


def _compile(py: str, src: Path) -> None:
    """Byte code compiled, as in an installed package (a source tree run with
    PYTHONDONTWRITEBYTECODE=1 compiles every module it imports at every start)."""
    subprocess.run([py, "-m", "compileall", "-q", str(src)], stdout=subprocess.DEVNULL,
                   check=False)


def _pairs() -> list[tuple[str, Path, Path, bool]]:
    """(name, OLD, NEW, written in place), filtered by ``BTRDELTA_BENCH_PAIRS``."""
    _name, old, new = real_pair()
    pairs = [("upgrade", old, new, False),
             ("install", *debian_install_pair(), True)]
    wheel = _wheel_trees("scipy", SCIPY)
    if wheel is not None:
        pairs.append(("scipy", *wheel, False))
    only = os.environ.get("BTRDELTA_BENCH_PAIRS")
    return [p for p in pairs if not only or any(w in p[0] for w in only.split(","))]


def _streams(name: str, old: Path, new: Path, in_place: bool, work: Path) -> dict[str, Path]:
    """The compressed stream, the parent's full stream and the delta (made once, kept)."""
    d = work / name
    delta = d / "c.delta"
    if delta.exists() and not _current(delta):
        delta.unlink()  # kept from another format version: made again, as delta make writes
    if not delta.exists():
        d.mkdir(parents=True, exist_ok=True)
        got = _kernel_streams(old, new, d, in_place)
        got["plain"].unlink()
        subprocess.run([PY, "-m", "btrdelta", "delta", "make", "-f", got["compressed"],
                        "--old", old, "-o", d / "c.delta.tmp"], check=True,
                       stdout=subprocess.DEVNULL)
        (d / "c.delta.tmp").rename(delta)
    return {"compressed": d / "AB.cstream", "full-A": d / "A.full", "delta": delta}


def _current(delta: Path) -> bool:
    """Whether a kept delta is of the format ``delta make`` writes now (an older one is
    still read, but it is not what a receive of a delta made today has to do)."""
    with open(delta, "rb") as f:
        head = f.read(DELTA_HEADER_SIZE)
    return len(head) == DELTA_HEADER_SIZE and DELTA_HEADER.unpack(head)[1] == (
        DELTA_VERSION_WRITTEN)


def _timed(cmd: list[str | os.PathLike[str]]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``cmd`` run at ``nice -n -15``; raises on failure."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["nice", "-n", "-15", *(os.fspath(c) for c in cmd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd}: {err.decode(errors='replace')[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def _tree_sum(path: Path) -> str:
    # (the root's mtime left out: an incremental stream cannot set it where the kernel
    # sent no UTIMES after its last change, and btrfs receive leaves it as it comes)
    return subprocess.run([PY, "-m", "btrdelta", "tree-sum", "--holes", "--ignore-root-mtime",
                           str(path)],
                          check=True, capture_output=True, text=True).stdout.split()[0]


def _btrdelta(py: str) -> list[str | os.PathLike[str]]:
    """The ``btrdelta`` command of the venv of interpreter ``py``: its console script, else
    ``py -m btrdelta``."""
    script = Path(py).parent / "btrdelta"
    return [script] if os.access(script, os.X_OK) else [py, "-m", "btrdelta"]


def _rounds(s: dict[str, Path]) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    tools: dict[str, list[str | os.PathLike[str]]] = {
        "kernel": ["btrfs", "receive", "-f", s["compressed"]],
        "ours": [*_btrdelta(PY), "receive", "-f", s["delta"]],
    }
    if BEFORE:
        tools["before"] = [*_btrdelta(f"{BEFORE}/.venv/bin/python"), "receive", "-f",
                           s["delta"]]
    size = _fs_size((1 << 30) + len(tools) * ROUNDS * (s["full-A"].stat().st_size
                                              + s["compressed"].stat().st_size))
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    notes: list[str] = []
    with loop_fs("btrfs", size=str(size), workdir=WORKDIR) as mnt:
        for i in range(ROUNDS):
            loads = " ".join(f"{x:.1f}" for x in os.getloadavg())
            names = list(tools)
            order = names[i % len(names):] + names[:i % len(names)]
            if i // len(names) % 2:
                order.reverse()
            got = []
            for tool in order:
                dest = mnt / f"{tool}-{i}"
                dest.mkdir()
                sh("btrfs", "receive", "-f", s["full-A"], dest)
                sh("sync")
                runs[tool].append(_timed([*tools[tool], dest]))
                sh("sync")
                got.append(f"{tool} {runs[tool][-1][0]:.2f} s, {runs[tool][-1][1]:.2f} s CPU")
            if i == 0:
                sums = {tool: _tree_sum(next(p for p in (mnt / f"{tool}-0").iterdir()
                                             if p.name != "A"
                                             and p.name != _parent_name(s["full-A"])))
                        for tool in tools}
                same = [f"{t} {sums[t] == sums['kernel']}" for t in tools if t != "kernel"]
                notes.append("trees equal to the kernel's (tree-sum --holes "
                             "--ignore-root-mtime): " + ", ".join(same))
            notes.append(f"round {i + 1}: load {loads}: " + "; ".join(got))
            for tool in order:
                for sub in (mnt / f"{tool}-{i}").iterdir():
                    sh("btrfs", "-q", "subvolume", "delete", sub)
    return runs, notes


def _parent_name(full: Path) -> str:
    """The subvolume name a full stream creates (its first record)."""
    out = subprocess.run(["btrfs", "receive", "--dump", "-f", str(full)], check=True,
                         capture_output=True, text=True).stdout
    first = out.split("\n", 1)[0].split()
    return first[1].strip("./")


def measure(s: dict[str, Path]) -> list[str]:
    """The rounds of one pair (``s``: its ``compressed`` stream, the ``full-A`` stream of
    its parent, the ``delta``) and their medians, as printable lines (``bench_delta``
    reports its compressed-data case with them)."""
    runs, notes = _rounds(s)
    med = {t: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
           for t, r in runs.items()}
    (kw, kc), (ow, oc) = med["kernel"], med["ours"]
    prior = ""
    if "before" in med:
        bw, bc = med["before"]
        prior = (f"; before: {bw:.2f} s, {bc:.2f} s CPU, wall {bw / kw:.2f}x, "
                 f"CPU {bc / kc:.2f}x")
    return [*(f"  {n}" for n in notes),
            f"  median of {ROUNDS}: btrfs receive {kw:.2f} s, {kc:.2f} s CPU; "
            f"btrdelta receive of the delta {ow:.2f} s, {oc:.2f} s CPU; "
            f"ours / kernel: wall {ow / kw:.2f}x, CPU {oc / kc:.2f}x (goal 1.2x)" + prior]


def compile_sources() -> None:
    """Byte code of this checkout (and of ``BTRDELTA_BENCH_BEFORE``'s) compiled."""
    _compile(PY, Path(__file__).parents[1] / "src")
    if BEFORE:
        _compile(f"{BEFORE}/.venv/bin/python", Path(BEFORE) / "src")


def run() -> list[str]:
    lines: list[str] = []
    if os.environ.get("BTRDELTA_BENCH_FS_SIZE"):
        lines.append(f"   (loop btrfs of at least {os.environ['BTRDELTA_BENCH_FS_SIZE']})")
    keep = os.environ.get("BTRDELTA_BENCH_CDKEEP")
    tmp = None if keep else tempfile.mkdtemp(prefix="bench-cdreceive-", dir="/var/tmp")
    work = Path(keep or tmp or ".")
    compile_sources()
    try:
        for name, old, new, in_place in _pairs():
            s = _streams(name, old, new, in_place, work)
            lines += [f"-- {name}: compressed stream {s['compressed'].stat().st_size:,} B, "
                      f"delta {s['delta'].stat().st_size:,} B", *measure(s)]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return lines

if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
