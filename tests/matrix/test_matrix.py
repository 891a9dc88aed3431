"""Every upstream scenario on the filesystems and send options upstream's tests also meet,
every path against the kernel: ``make matrix`` (not part of ``make test``).

``make test`` sends every scenario from a btrfs mounted ``compress=zstd``, and some also
from lzo, zlib and no compression (tests/conftest.py). Here each of :data:`VARIANTS` gets a
loop btrfs of its own on which all scenarios are built; for each, the kernel's v1 and v2
``--compressed-data`` streams of A and of B from A (or ``--no-data`` streams, or B with A
as a ``-c`` clone source and no ``-p``), and with the kernel as the oracle:

* ``btrdelta dump`` == ``btrfs receive --dump``, byte for byte;
* ``receive`` into btrfs, ext4 and tmpfs gives ``btrfs receive``'s trees (tree-sum; for v2
  with the hole layout; on ext4 and tmpfs without the ``btrfs.*`` properties, skipped
  there), and the atimes too (but A's off btrfs, where B is made as a copy of A, whose
  reading moves them); a
  stream ``btrfs receive`` refuses (a ``--no-data`` stream's clones:
  btrfs-progs issue 787) ours refuses as well;
* ``delta make`` then ``delta expand`` gives the incremental stream bit for bit, and the
  delta received (applied) after A into btrfs and into ext4 gives the kernel's B;
* btrdelta's send of the kernel's snapshots (A, then B from A) is received by ``btrfs
  receive`` as them.

``BTRDELTA_MATRIX=all`` (or variant names, comma-separated) enables it;
``BTRDELTA_MATRIX_ONLY`` (scenario names) narrows the scenarios. A failure lists every
difference, by scenario, stream and path.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.receive import receive
from btrdelta.send import send_stream
from btrdelta.stream import StreamReader
from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs
from btrdelta.testing.scenarios import (
    MATRIX_SCENARIOS,
    SnapshotPair,
    kernel_receive,
    make_snapshots,
)
from btrdelta.testing.scenarios import send as kernel_send
from btrdelta.tree.treesum import diff_manifests, tree_manifest
from tests.conftest import layouts_elsewhere, progs_dump, require_btrfs


@dataclass(frozen=True)
class Variant:
    """A source filesystem (mount options, mkfs options) and what is sent from it."""

    name: str
    options: str | None = None
    mkfs: tuple[str, ...] = ()
    #: "incremental" (A, B from A), "no-data" (both --no-data), "clone-source" (A; B with
    #: A as a -c clone source and no -p: btrfs send picks A as its parent too), "reverse"
    #: (B, then A from B: what was made is removed, holes punched are filled), "unrelated"
    #: (the previous scenario's B, then this one's B from it: two trees that share no
    #: history, whose inode numbers meet with other generations, types and names)
    mode: str = "incremental"
    #: scenarios this filesystem cannot hold (their recipes fail on it)
    skip: frozenset[str] = frozenset()
    #: scenarios whose trees btrfs receive does not make as the source's when sent so (only
    #: ours is compared with its), beside :data:`_KERNEL_DIFFERS`
    kernel_differs: frozenset[str] = frozenset()


VARIANTS = [
    Variant("plain"),  # upstream's mount: no compression
    Variant("zlib-no-inline", "compress,max_inline=0"),  # btrfs/149's
    Variant("lzo", "compress=lzo"),
    Variant("hole-items", mkfs=("-O", "^no-holes")),  # explicit hole extent items
    Variant("no-data", "compress=zstd", mode="no-data"),
    Variant("clone-source", "compress=zstd", mode="clone-source"),
    # 64 KiB nodes: inline extents up to a whole 4 KiB sector (4,000 bytes of random data
    # stored inline, 4,096 compressed), zstd's slowest level
    Variant("nodesize-64k", "compress-force=zstd:15,max_inline=4096", ("-n", "65536")),
    # 4 KiB nodes in mixed block groups, zlib's level 9 (xattrs past a 4 KiB leaf do not
    # fit; a metadata-only balance is refused where data and metadata share block groups)
    Variant("nodesize-4k-mixed", "compress-force=zlib:9", ("-M", "-n", "4096"),
            skip=frozenset({"xattr-max-size", "xattrs-past-path-max-053",
                            "dedupe-balance-snapshots-187"})),
    # no copy-on-write, no checksums and so no compression for every file (the compression
    # property cannot be set)
    Variant("nodatacow", "nodatacow", skip=frozenset({"compression-property-048",
                                                      "compression-property-removed-new-files",
                                                      "compression-property-root-new-files",
                                                      "encoded-every-compression-holes",
                                                      "recompressed-same-content",
                                                      "chattr-compress-flag",
                                                      "inline-encoded-levels"})),
    # sent the other way (btrfs send -p B A) and from an unrelated parent (session 25).
    # btrfs send refuses the reverse of deleted-open-file-168 (an unlinked inode in A). The
    # kernel's trees differ from the source's (docs/upstream-tests.md): a full stream sets
    # the root's btrfs.compression before it makes what is below, which inherits it
    # (compression-property-048); a file cut short in B (its extent kept) and whole in A is
    # sent as a TRUNCATE growing it, with zeros where A has data (inline-boundaries' r4096)
    Variant("reverse", "compress=zstd", mode="reverse",
            skip=frozenset({"deleted-open-file-168"}),
            kernel_differs=frozenset({"compression-property-048", "inline-boundaries"})),
    Variant("unrelated", "compress=zstd", mode="unrelated",
            kernel_differs=frozenset({"compression-property-048"})),
]
_WANTED = os.environ.get("BTRDELTA_MATRIX", "")
_ONLY = {n for n in os.environ.get("BTRDELTA_MATRIX_ONLY", "").split(",") if n}
_BTRFS_PROPERTIES = (b"btrfs.compression",)
#: scenarios where btrfs receive's tree is not the source's (6.18, btrfs-progs 6.2), so only
#: ours against it is compared: a subvolume root's default ACL, inherited by the orphans it
#: makes there (docs/upstream-tests.md); a set-user-ID file's owner changed with its mode
#: kept, whose chown (no chmod after it in the stream) clears the bit; a root's compression
#: property, inherited by what btrfs receive makes as orphans in the root
_KERNEL_DIFFERS = {"acl-default-root", "setuid-after-chown",
                   "compression-property-root-new-files"}

pytestmark = [pytest.mark.btrfs, pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(not _WANTED, reason="the matrix: make matrix")]


@dataclass
class Targets:
    src: Path
    kernel: Path
    btrfs: Path
    ext4: Path
    tmpfs: Path


@contextlib.contextmanager
def _tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3G", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@contextlib.contextmanager
def _targets(v: Variant, tmp: Path) -> Iterator[Targets]:
    require_btrfs()
    try:
        with ExitStack() as stack:
            src = stack.enter_context(loop_fs("btrfs", size="3G", options=v.options,
                                              mkfs_args=v.mkfs))
            # (the receivers hold every scenario's snapshots, 8G: sent in reverse, the holes
            # a scenario punched are data again; sparse images, only what is written is used)
            kernel, btrfs = (stack.enter_context(loop_fs("btrfs", size="8G")) for _ in "ab")
            ext4 = stack.enter_context(loop_fs("ext4", size="8G", mkfs_args=("-O", "ea_inode")))
            tmpfs = stack.enter_context(_tmpfs(tmp / "tmpfs"))
            yield Targets(src, kernel, btrfs, ext4, tmpfs)
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


def _our_dump(stream: Path) -> bytes:
    out = io.BytesIO()
    text = io.TextIOWrapper(out, encoding="utf-8", errors="surrogateescape")
    with contextlib.redirect_stdout(text):
        code = main(["dump", "-f", str(stream)])
        text.flush()
    return out.getvalue() if code == 0 else b"exit %d" % code


def _our_receive(stream: Path, dest: Path) -> None:
    with open(stream, "rb") as f:
        receive(StreamReader(f, source=stream.name).events(), dest, on_warning=lambda _: None)


def _atimes(root: Path) -> dict[str, int]:
    """atime of every entry below ``root`` (this subvolume's), read without moving any:
    directories listed through O_NOATIME descriptors."""
    out: dict[str, int] = {}
    dev = os.lstat(root).st_dev

    todo = [(str(root), ".")]  # a loop, not recursion: trees deeper than the recursion limit
    while todo:
        path, rel = todo.pop()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        try:
            out[rel + "/"] = os.fstat(fd).st_atime_ns
            with os.scandir(fd) as entries:
                names = [entry.name for entry in entries]
            for name in names:
                st = os.lstat(name, dir_fd=fd)
                if st.st_dev != dev or (stat.S_ISDIR(st.st_mode) and st.st_ino == 2):
                    continue
                out[f"{rel}/{name}"] = st.st_atime_ns
                if stat.S_ISDIR(st.st_mode):
                    todo.append((os.path.join(path, name), f"{rel}/{name}"))
        finally:
            os.close(fd)
    return out


def _compare(what: str, want: Path, got: Path, *, holes: bool, root_mtime: bool,
             props: bool = True) -> list[str]:
    """The differences; ``props`` False: ``got`` is on ext4 (no ``btrfs.*`` properties, and
    a block btrfs fills with zeros may be a hole there: ``layouts_elsewhere``)."""
    skip = () if props else _BTRFS_PROPERTIES
    have = tree_manifest(got, holes=holes, ignore_root_mtime=not root_mtime, exclude_xattrs=skip)
    wanted = tree_manifest(want, holes=holes, ignore_root_mtime=not root_mtime,
                           exclude_xattrs=skip)
    diff = diff_manifests(wanted if props else layouts_elsewhere(wanted, have), have)
    return [f"{what}: " + "; ".join(diff)] if diff else []


def _streams(v: Variant, pair: SnapshotPair, out: Path, proto: int) -> tuple[Path, Path]:
    extra: tuple[str, ...] = ("--no-data",) if v.mode == "no-data" else ()
    a = kernel_send(pair.a, out / "A", proto=proto, compressed=proto == 2, extra=extra)
    if v.mode == "clone-source":
        b = kernel_send(pair.b, out / "B", proto=proto, compressed=proto == 2,
                        extra=("-c", str(pair.a)))
    else:
        b = kernel_send(pair.b, out / "B", parent=pair.a, proto=proto, compressed=proto == 2,
                        extra=extra)
    return a, b


def _check(v: Variant, t: Targets, pair: SnapshotPair, tag: str, out: Path,
           proto: int) -> list[str]:
    a, b = _streams(v, pair, out, proto)
    problems = [f"{tag}: dump of {s.name} differs from btrfs receive --dump"
                for s in (a, b) if _our_dump(s) != progs_dump(s).stdout]
    dirs = {}
    ours = ("btrfs", "ext4", "tmpfs")
    for key, root in (("kernel", t.kernel), ("btrfs", t.btrfs), ("ext4", t.ext4),
                      ("tmpfs", t.tmpfs)):
        dirs[key] = root / tag
        dirs[key].mkdir()
    for s in (a, b):
        try:
            kernel_receive(s, dirs["kernel"])
            refused = None
        except RuntimeError as exc:
            refused = str(exc)
        for key in ours:
            try:
                _our_receive(s, dirs[key])
                if refused:
                    problems.append(f"{tag}: {key} took {s.name}, btrfs receive not: {refused}")
            except Exception as exc:  # reported with the stream and receiver
                if not refused:
                    problems.append(f"{tag}: {key} receive of {s.name}: {exc}")
        if refused:
            return problems
    # B is a snapshot of A in every mode (btrfs send -c without -p picks A as the parent)
    for snap, root_mtime in ((pair.a.name, not pair.scenario.root_mtime_lost),
                             (pair.b.name, False)):
        kernel_atimes = _atimes(dirs["kernel"] / snap)
        for key in ours:
            # A's atimes after B off btrfs: B is a copy of A there, whose reading moved them
            if key != "btrfs" and snap == pair.a.name:
                continue
            got = _atimes(dirs[key] / snap)
            moved = [p for p, ns in kernel_atimes.items() if p != "./" and got.get(p) != ns]
            if moved:
                problems.append(f"{tag}: {key} {snap}: atime of {moved[:5]}")
        if v.mode != "no-data" and pair.scenario.name not in _KERNEL_DIFFERS | v.kernel_differs:
            problems += _compare(f"{tag}: kernel {snap} vs source", pair.b.parent / snap,
                                 dirs["kernel"] / snap, holes=False, root_mtime=root_mtime)
        for key in ours:
            problems += _compare(f"{tag}: {key} {snap}", dirs["kernel"] / snap,
                                 dirs[key] / snap, holes=proto == 2, root_mtime=root_mtime,
                                 props=key == "btrfs")
    if v.mode in ("incremental", "reverse", "unrelated"):
        problems += _delta_and_send(t, pair, tag, out, proto, a, b)
    return problems


def delta_round_trip(stream: Path, old: Path, out: Path) -> bool:
    """``delta make`` of ``stream`` against ``old`` written to ``out``; whether ``delta
    expand`` of it gives the stream back bit for bit."""
    parts: list[bytes] = []
    with open(stream, "rb") as f:
        make_delta(f, old, parts.append, MakeOptions(min_file_size=1))
    delta = b"".join(bytes(p) for p in parts)
    out.write_bytes(delta)
    expanded: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), old, expanded.append)
    return b"".join(bytes(p) for p in expanded) == stream.read_bytes()


def _delta_and_send(t: Targets, pair: SnapshotPair, tag: str, out: Path, proto: int,
                    full: Path, incr: Path) -> list[str]:
    problems = []
    if not delta_round_trip(incr, pair.a, out / "B.delta"):
        problems.append(f"{tag}: delta make + expand is not the stream")
    for key, root in (("btrfs", t.btrfs), ("ext4", t.ext4)):
        dest = root / (tag + ".delta")
        dest.mkdir()
        _our_receive(full, dest)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(["receive", "-q", "-f", str(out / "B.delta"), str(dest)])
        if code:
            problems.append(f"{tag}: {key} receive of the delta: exit {code}: "
                            f"{err.getvalue().strip()}")
            continue
        problems += _compare(f"{tag}: {key} delta applied", t.kernel / tag / pair.b.name,
                             dest / pair.b.name, holes=proto == 2, root_mtime=False,
                             props=key == "btrfs")
    ours = (out / "our-A", out / "our-B")
    for path, (new, parent) in zip(ours, ((pair.a, None), (pair.b, pair.a)), strict=True):
        with open(path, "wb") as f:
            if proto == 2:
                send_stream(f.write, new, parent, version=2, compress="zstd")
            else:
                send_stream(f.write, new, parent)
    dest = t.kernel / (tag + ".our-send")
    dest.mkdir()
    for path in ours:
        kernel_receive(path, dest)
    for snap, root_mtime in ((pair.a, True), (pair.b, False)):
        problems += _compare(f"{tag}: our send of {snap.name}, btrfs receive", snap,
                             dest / snap.name, holes=False, root_mtime=root_mtime)
    return problems


def _has_subvolumes(root: Path) -> bool:
    """Whether a subvolume (or a snapshot's stub of one) lies below ``root``."""
    todo = [str(root)]  # a loop, not recursion: trees deeper than the recursion limit
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if os.lstat(entry.path).st_ino in (2, 256):
                        return True
                    todo.append(entry.path)
    return False


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_every_scenario(variant: Variant, tmp_path: Path) -> None:
    if _WANTED != "all" and variant.name not in _WANTED.split(","):
        pytest.skip(f"not in BTRDELTA_MATRIX={_WANTED}")
    problems: list[str] = []
    previous: SnapshotPair | None = None
    with _targets(variant, tmp_path) as t:
        for sc in MATRIX_SCENARIOS:
            if (_ONLY and sc.name not in _ONLY) or sc.name in variant.skip:
                continue
            try:
                pair = made = make_snapshots(t.src, sc)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                problems.append(f"{sc.name}: recipe: {exc}")
                continue
            if variant.mode == "reverse":
                pair = SnapshotPair(sc, made.b, made.a)
            elif variant.mode == "unrelated":
                # B from the previous scenario's A: each snapshot is received once (btrfs
                # receive finds a parent by its UUID in the whole filesystem). Not from an A
                # with subvolumes inside: btrfs send leaves a directory of them that B does
                # not have as an orphan (its entries are subvolumes it never names), with the
                # time of the receive as its mtime
                before, previous = previous, made
                if before is None or before.scenario.name in _KERNEL_DIFFERS | \
                        variant.kernel_differs or _has_subvolumes(before.a):
                    continue
                pair = SnapshotPair(sc, before.a, made.b)
            for proto in (1, 2):
                tag = f"{sc.name}.v{proto}"
                out = tmp_path / tag
                out.mkdir()
                try:
                    problems += _check(variant, t, pair, tag, out, proto)
                except Exception as exc:  # one scenario's failure does not hide the rest
                    problems.append(f"{tag}: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems)
