"""Shared fixtures: clean environment, hypothesis profiles, kernel-made streams."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from btrdelta.testing.loopfs import BtrfsUnavailable, btrfs_available, loop_fs
from btrdelta.testing.scenarios import SCENARIOS, make_snapshots, send
from btrdelta.update.partial import COUNTER_PREFIX, PARTIAL_DIR, SHM, PartialTransfer
from tests.chunk.images import ImagePair, build_pair

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "deep", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

DATA = Path(__file__).parent / "data"


def _counters() -> set[str]:
    try:
        return {n for n in os.listdir(SHM) if n.startswith(COUNTER_PREFIX)}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def _no_counter_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves a partial transfer of a killed receiver in its DEST (never
    resumed) leaves its record counter in ``/dev/shm``, as a DEST deleted by hand would:
    removed with the test's temporary tree (only the counters of partial transfers under
    it)."""
    before = _counters()
    yield
    new = _counters() - before
    # pytest sets ``funcargs`` to None once an interrupted (Ctrl-C) test is torn down
    tmp = (getattr(request.node, "funcargs", None) or {}).get("tmp_path")
    if not new or not isinstance(tmp, Path):
        return
    for top, dirs, _ in os.walk(tmp):
        if PARTIAL_DIR in dirs:
            counter = PartialTransfer(Path(top), "dir").counter()
            if counter is not None and os.path.basename(counter) in new:
                os.unlink(counter)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("BTRDELTA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TZ", "UTC")


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs, close its pipes and wait for it. Left running or
    with a pipe open by a failed test, a child failed a later one: its ``ResourceWarning``
    at a garbage collection there (warnings are errors), or a loop btrfs it held busy. The
    pipes are closed, not read to their end, which a grandchild holding them would
    stop."""
    if proc.poll() is None:
        proc.kill()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with suppress(OSError, ValueError):  # (input not yet taken by a dead child)
                pipe.close()
    proc.wait()


class Children:
    """The child processes a test starts (:meth:`start`), each reaped (:func:`reap`) at
    the test's end (the :func:`children` fixture), whatever ended it: an assertion, a
    timeout of ``communicate``, pytest-timeout; or at the end of a ``with`` block (one that
    must end before a mount the children use is unmounted)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()

    def start(self, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(*args, **kwargs)``, reaped at the test's end."""
        proc = subprocess.Popen(*args, **kwargs)
        self._procs.append(proc)
        return proc

    def reap(self) -> None:
        """Reap every child started, the last one first."""
        while self._procs:
            reap(self._procs.pop())


@pytest.fixture
def children() -> Iterator[Children]:
    """:class:`Children` of the test."""
    with Children() as kids:
        yield kids


#: a TiB, and the data pieces (offset, bytes) of :func:`huge_sparse_tree`'s ``vm.img``
TIB = 1 << 40
HUGE_PIECES = ((0, b"\x01" * 4096), (300 << 30, os.urandom(65536)), (TIB + 100, b"tail!"))


def huge_sparse_tree(tree: Path) -> None:
    """A 1 TiB (+105 bytes) file with :data:`HUGE_PIECES` of data (``vm.img``), a 256 MiB
    preallocated file (unwritten extents: read as zeros, holes to SEEK_DATA and to the
    kernel's send), a 4 GiB file of holes only and a small file. Skips where the
    filesystem has no room for the preallocation (a container's /dev/shm: 64 MiB)."""
    tree.mkdir(exist_ok=True)
    st = os.statvfs(tree)
    if st.f_bavail * st.f_frsize < 320 << 20:
        pytest.skip(f"{tree}: {st.f_bavail * st.f_frsize >> 20} MiB free, where the tree "
                    "preallocates 256 MiB")
    with open(tree / "vm.img", "wb") as f:
        for off, data in HUGE_PIECES:
            f.seek(off)
            f.write(data)
    with open(tree / "prealloc", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 256 << 20)
    with open(tree / "empty.img", "wb") as f:
        f.truncate(4 << 30)
    (tree / "small").write_bytes(b"small\n")


@pytest.fixture(params=["tmp", "tmpfs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The test's directory (``make test``'s are under ``/var/tmp``: ext4 here), then one
    on tmpfs (``/dev/shm``): a test of sparse files run on both (their holes and
    ``SEEK_DATA`` differ)."""
    if request.param == "tmp":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="btrdelta-where-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def deep_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path`` for a test that makes a directory tree deeper than Python's recursion
    limit: its content is deleted with ``rm -rf`` at teardown, even when the test fails,
    because pytest's own clean-up of old temporary directories (``shutil.rmtree``) dies of
    ``RecursionError`` on such a tree in a later run."""
    try:
        yield tmp_path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(tmp_path)], check=True)
        tmp_path.mkdir()


#: run argv[2:] and write its peak RSS (bytes) to descriptor argv[1]; exit with its code
_PEAK_RSS = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
os.write(int(sys.argv[1]), b"%d" % (usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def spy_fsync(mp: pytest.MonkeyPatch) -> list[str]:
    """Make ``os.fsync`` (through ``mp``) also note what each call made durable: the
    returned list gets the path of every file or directory ``fsync``-ed, in order."""
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    mp.setattr(os, "fsync", spy)
    return synced


def read_pty(master: int) -> bytes:
    """What a pseudo-terminal's other side wrote, read from ``master`` until it has no
    more (non-blocking: nothing waiting; blocking: EIO once the writer closed it)."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # (BlockingIOError, or EIO)
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def run_peak_rss(argv: list[str], env: dict[str, str]) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (bytes) of ``argv`` (stdout discarded).

    Measured through a small intermediate process: a child of pytest itself inherits
    pytest's peak RSS (Linux keeps the pre-``exec`` high-water mark in ``ru_maxrss``),
    which after a few hundred tests is larger than any limit worth checking."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS, str(w), *argv], env=env,
                                pass_fds=(w,), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        os.close(w)
        w = -1
        _, err = proc.communicate()
        rss = os.read(r, 64)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return proc.returncode, err.decode(), int(rss or b"0")


_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_nobody_python: list[str] = []


def nobody_python() -> list[str]:
    """The command that runs this venv's Python with btrdelta as user nobody (``setpriv``,
    then the interpreter: follow it with ``-m btrdelta ...``).

    A clone under a 0700 home (Debian's ``/root``: a fresh machine's root clones there)
    has a venv nobody cannot reach; nobody then runs a venv of the base interpreter made
    for the session in a world-readable temporary directory, whose ``.pth`` names hard
    links (or copies) of this venv's packages and of the sources (removed at exit)."""
    if not _nobody_python:
        _nobody_python.append(_reachable_python())
    return [*_NOBODY, _nobody_python[0]]


def _nobody_can_run(python: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_NOBODY, python, "-c", "import btrdelta, zstandard"],
                          capture_output=True, text=True, check=False, cwd="/")


def _all_readable(top: Path) -> bool:
    """Whether every file and directory under ``top`` can be read by any user."""
    for where, dirs, files in os.walk(top):
        for name in (".", *dirs, *files):
            if os.lstat(os.path.join(where, name)).st_mode & 0o004 == 0:
                return False
    return True


def _reachable_python() -> str:
    if _nobody_can_run(sys.executable).returncode == 0:
        return sys.executable
    import atexit
    import shutil
    import sysconfig
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="btrdelta-nobody-venv-"))
    atexit.register(shutil.rmtree, top, True)
    top.chmod(0o755)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(top / "venv")], check=True)
    sources = Path(__file__).resolve().parents[1] / "src"
    paths = []
    for name, src in (("src", sources), ("site", Path(sysconfig.get_paths()["purelib"]))):
        dest = top / name
        if not _all_readable(src) or subprocess.run(
                ["cp", "-al", str(src), str(dest)], capture_output=True,
                check=False).returncode != 0:
            # (files a umask such as 077 or 027 made: copies, made readable, not hard links
            # whose mode is the clone's own)
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
            subprocess.run(["chmod", "-R", "a+rX", str(dest)], check=True)
        paths.append(str(dest))
    site = subprocess.run([str(top / "venv" / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "btrdelta-nobody.pth").write_text("\n".join(paths) + "\n")
    # (made under the session's umask: 0700 and 0600 under umask 077)
    subprocess.run(["chmod", "-R", "a+rX", str(top / "venv")], check=True)
    python = str(top / "venv" / "bin" / "python")
    probe = _nobody_can_run(python)
    if probe.returncode != 0:
        pytest.fail(f"user nobody cannot run {sys.executable} nor a venv beside it "
                    f"(exit {probe.returncode}: {probe.stderr.strip()[-160:]}): make the "
                    "venv from an interpreter every user can reach (make PY=...)",
                    pytrace=False)
    return python


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (``timeout``, ``kill``, a CI's cancel) ends the run as Ctrl-C does: pytest
    then tears its fixtures down, so loop filesystems are unmounted and detached (killed by
    the default action, a run left them mounted). A child a test forked takes the default
    action: it must not run its parent's teardown."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    runner = os.getpid()

    def terminated(signum: int, _frame: object) -> None:
        if os.getpid() != runner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)


def require_btrfs() -> None:
    """Skip (or, under CI=true, fail) when loop-mounted btrfs cannot be used here."""
    reason = btrfs_available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {reason}")
        pytest.skip(f"btrfs unavailable: {reason}")


@contextmanager
def btrfs_loop(size: str = "256M", **kwargs: Any) -> Iterator[Path]:
    """A loop-mounted btrfs (its top level) for a test or fixture; skipped where btrfs
    cannot be used, failed instead under CI=true."""
    require_btrfs()
    try:
        with loop_fs("btrfs", size=size, **kwargs) as mnt:
            yield mnt
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def btrfs_ok() -> None:
    require_btrfs()


@dataclass(frozen=True)
class KernelStream:
    """A stream the kernel made: scenario name, kind (full/incr/multi/...), file."""

    name: str
    path: Path

    def __str__(self) -> str:
        return self.name


#: the scenarios whose streams depend on how the data lies on disk (extents, holes,
#: preallocation, reflinks, inline data): also sent from a filesystem without compression,
#: as upstream's tests run nearly all of them (a plain `mount`; with compress=zstd most
#: extents are compressed and at most 128 KiB, inline data too)
_LAYOUT = {
    "hole-punch-016", "prealloc-punch-169", "write-into-prealloc-046", "shrink-grow-sparse-034",
    "reflinks-same-file-200", "reflink-deep-paths-108", "orphan-dir-early-W5",
    "compressible-data-W6", "empty-and-truncate", "unaligned-prealloc-truncate-025",
    "compressed-data-offset-038", "clone-compressed-094", "clone-lower-offset-097",
    "reflink-compressed-overwrite-109", "heavily-deduped-130", "holes-preserved-137",
    "shared-sector-at-zero-149", "eof-block-clone-189", "dedupe-same-file-191",
    "compressed-partial-share-281", "best-clone-source-283", "trailing-hole-303",
    "compressed-extent-merge-312", "unaligned-eof-clone-319", "shrunk-by-clone-322",
    "same-name-ino-replaced-105", "self-shared-hole-grow-203", "clone-source-multi-step-117",
    "fragmented-backrefs-033", "compression-property-048", "overwritten-files-misc018",
    "dir-to-subvolume-btrbk608", "unaligned-then-fallocated-progs-e3209f8",
    "encoded-write-unaligned-offset-progs-6f4a518", "dedupe-balance-snapshots-187",
    "clones-new-files-one-transaction", "many-extents-sparse", "truncate-to-zero",
    "clone-source-c-new-files", "deleted-open-file-168", "tmpfile-orphan-in-snapshot-058",
    "encoded-every-compression-holes", "nocow-clones", "truncate-extend-unaligned",
    "reflinks-across-subvolumes", "recompressed-same-content", "same-file-clones-unaligned-eof",
    "inline-extent-then-hole", "punch-whole-fill-holes", "prealloc-inside-data",
    "copy-range-unaligned", "punch-inline", "clone-into-hole", "inline-encoded-levels",
    "punch-zero-across-eof", "compressed-data-offset-clones-038",
    "write-into-prealloc-pieces-046",
}

#: (name, mount options, the scenarios it applies to or None for all); every variant's
#: streams are v2 --compressed-data, those in _V1_VARIANTS v1 too
_FS_VARIANTS: list[tuple[str, str | None, set[str] | None]] = [
    ("zstd", "compress=zstd", None),
    ("lzo", "compress=lzo", {"compressible-data-W6", "hole-punch-016", "reflinks-same-file-200",
                             "reflink-deep-paths-108", "compressed-data-offset-038",
                             "clone-compressed-094", "compressed-partial-share-281",
                             "compressed-extent-merge-312",
                             "unaligned-then-fallocated-progs-e3209f8",
                             "encoded-write-unaligned-offset-progs-6f4a518",
                             "copy-range-unaligned", "clone-into-hole",
                             "compressed-data-offset-clones-038"}),
    ("zlib", "compress-force=zlib", {"compressible-data-W6", "prealloc-punch-169",
                                     "write-into-prealloc-046", "odd-names-W8",
                                     "reflink-compressed-overwrite-109",
                                     "shared-sector-at-zero-149", "eof-block-clone-189",
                                     "shrunk-by-clone-322",
                                     "unaligned-then-fallocated-progs-e3209f8",
                                     "encoded-write-unaligned-offset-progs-6f4a518",
                                     "inline-extent-then-hole", "punch-zero-across-eof"}),
    ("plain", None, _LAYOUT),
]
_V1_VARIANTS = {"zstd", "plain"}


@pytest.fixture(scope="session")
def kernel_streams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[KernelStream]]:
    """Kernel streams of every scenario: full A and A->B, as v1 and v2 --compressed-data.

    Built once per session on loop-mounted btrfs (zstd for all scenarios; lzo and zlib for a
    few; no compression for those whose extents matter, v1 and v2 as for zstd), plus
    multi-subvolume layouts (`send A B`, `send -e A B`) and a `--no-data` stream.
    """
    require_btrfs()
    out = tmp_path_factory.mktemp("kernel-streams")
    streams: list[KernelStream] = []
    try:
        for comp, options, only in _FS_VARIANTS:
            with loop_fs("btrfs", size="3G", options=options) as mnt:
                for sc in SCENARIOS:
                    if only is not None and sc.name not in only:
                        continue
                    pair = make_snapshots(mnt, sc)
                    for tag, proto, compressed in (("v1", 1, False), ("v2", 2, True)):
                        if comp not in _V1_VARIANTS and tag == "v1":
                            continue
                        base = f"{sc.name}.{comp}.{tag}"
                        a = send(pair.a, out / f"{base}.A", proto=proto, compressed=compressed)
                        b = send(pair.b, out / f"{base}.B", parent=pair.a, proto=proto,
                                 compressed=compressed)
                        streams += [KernelStream(f"{base}.A", a), KernelStream(f"{base}.B", b)]
                        if pair.c is not None:  # B from A with C as a clone source too
                            c = send(pair.c, out / f"{base}.C", proto=proto,
                                     compressed=compressed)
                            bc = send(pair.b, out / f"{base}.Bc", parent=pair.a, proto=proto,
                                      compressed=compressed, extra=("-c", str(pair.c)))
                            streams += [KernelStream(f"{base}.C", c),
                                        KernelStream(f"{base}.Bc", bc)]
                    if comp == "zstd" and sc.name == "compressible-data-W6":
                        nd = send(pair.b, out / f"{sc.name}.nodata", parent=pair.a,
                                  extra=("--no-data",))
                        multi = send(pair.a, out / "multi.AB", extra=(str(pair.b),))
                        multi_e = send(pair.a, out / "multi-e.AB", extra=("-e", str(pair.b)))
                        streams += [KernelStream("nodata", nd), KernelStream("multi", multi),
                                    KernelStream("multi-e", multi_e)]
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))
    return streams


def _blocks(layout: tuple[tuple[int, int], ...]) -> set[int]:
    return {b for off, n in layout for b in range(off // 4096, -(-(off + n) // 4096))}


def _one_block_less(btrfs: tuple[tuple[int, int], ...] | None,
                    other: tuple[tuple[int, int], ...] | None) -> bool:
    """``other`` is ``btrfs``'s layout with one 4 KiB block of it a hole."""
    if btrfs is None or other is None or btrfs == other:
        return False
    have, want = _blocks(other), _blocks(btrfs)
    return have < want and len(want - have) == 1


def layouts_elsewhere(want: list[Any], have: list[Any]) -> list[Any]:
    """``want`` (tree-sum entries of ``btrfs receive``'s tree, with holes) with the layout
    of ``have`` (a receive into another filesystem than btrfs) for the files where that
    layout is btrfs's with one 4 KiB block a hole: btrfs fills the block that held a file's
    end with zeros when the file grows past it or a hole is punched past it, where the same
    system calls leave that block a hole on ext4 (randwork seeds 19, 42, 52; scenario
    truncate-extend-unaligned: a file cut, then grown past its old end in a hole)."""
    layouts = {e.path: e.layout for e in have}
    return [replace(e, layout=layouts[e.path])
            if _one_block_less(e.layout, layouts.get(e.path)) else e for e in want]


def committed_streams() -> list[Path]:
    """Small kernel-made streams committed in tests/data/streams (usable without root)."""
    return sorted((DATA / "streams").glob("*.stream"))


#: the two formats of ``btrfs receive --dump`` (btrdelta.stream.dump): btrfs-progs up to 6.9
#: (Debian 12's 6.2) and from 6.9.1 (Debian 13's 6.14)
DUMP_FORMATS = ((6, 2), (6, 14))


def committed_dump(stream: Path, progs: tuple[int, ...]) -> bytes:
    """What btrfs-progs ``progs`` printed for the committed ``stream`` (TZ=UTC): its
    ``.dump`` (6.2's), or for 6.9.1 and later its ``.dump-6.14`` where the two differ
    (xattrs, clones, encoded writes; printed by Debian 13's btrfs-progs 6.14)."""
    newer = stream.with_suffix(".dump-6.14")
    if progs >= (6, 9, 1) and newer.exists():
        return newer.read_bytes()
    return stream.with_suffix(".dump").read_bytes()


def progs_dump(path: Path) -> subprocess.CompletedProcess[bytes]:
    """`btrfs receive --dump -f path` (the oracle for dump text)."""
    return subprocess.run(["btrfs", "receive", "--dump", "-f", str(path)], capture_output=True,
                          check=False, env={**os.environ, "TZ": "UTC"})


@pytest.fixture(scope="session")
def image_pair(tmp_path_factory: pytest.TempPathFactory) -> ImagePair:
    """Two versions of a real tree as ext4 images and their chunk archives (tests.chunk.images)."""
    return build_pair(tmp_path_factory.mktemp("images"))
