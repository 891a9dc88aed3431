"""Publishing releases into a versions repository: ``repo init`` and ``repo add``.

A repository is a plain directory (``docs/formats/repository.md``); the publisher's own
state lives in ``REPO/.btrdelta/`` (the catalog, the chunk map, trees kept for future
deltas, delta jobs, temporary files; mirrors need none of it). ``repo add`` of release
``p``:

1. materializes SOURCE (a directory, a read-only snapshot, or a full send stream) as a
   tree, takes its content identity (``tree-sum``), writes its normalized plain stream
   (:mod:`.streams`) and stores the stream's new chunks in packs (:mod:`.packs`);
2. receives that stream into ``.btrdelta/trees/<version>`` and checks the received tree
   has the same identity (the full is what clients get, proven on the spot);
3. records the version with its delta jobs pending (catalog written atomically), then makes
   one delta from each release of :func:`btrdelta.repo.layout.delta_sources` (in
   ``--parallel`` processes, or on other machines: :mod:`.jobs`), each checked by applying
   it, and records them; then tries the measured extra deltas that pay
   (:func:`btrdelta.repo.layout.next_trial`, made here, after the others);
4. drops the trees no future delta needs.

Every artifact is written under a temporary name and renamed to its content-addressed
name; the catalog names an artifact only after it is in place. Signing is :mod:`.sign`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..chunk.chunker import ChunkerParams
from ..errors import BtrdeltaError, ChecksumError, MissingBaseError, MissingParentError, warn
from ..fs.atomic import write_atomic
from ..fs.remove import remove_path
from ..repo.canonical import parse_json
from ..repo.catalog import Catalog, CatalogVersion, decode_chunk_map
from ..repo.fullindex import decode_full_index
from ..repo.layout import delta_sources, future_sources
from ..repo.model import check_version_name
from ..repo.solid import DEFAULT_SOLID_LEVEL, Solid
from ..tree import Entry, diff_manifests, tree_manifest, tree_sum
from .packs import pack_stream
from .solids import write_solid
from .streams import receive_release, write_release_stream

__all__ = ["AddReport", "Repo", "add_release", "init_repo"]

META = ".btrdelta"
DEFAULT_LEVEL = 12


class Repo:
    """A repository directory on the publisher's side."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.meta = self.root / META
        self.trees = self.meta / "trees"
        self.tmp = self.meta / "tmp"
        self.jobs = self.meta / "jobs"
        self.catalog_path = self.meta / "catalog.json"
        self.chunks_path = self.meta / "chunks.bin"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the repository's lock (one writer at a time)."""
        if not self.catalog_path.exists():
            raise BtrdeltaError("not a repository (run `btrdelta repo init` first)",
                                path=str(self.root))
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BtrdeltaError("repository is busy (another repo add/sign runs)",
                                    path=str(self.root)) from None
            yield
        finally:
            os.close(fd)

    def load(self) -> Catalog:
        """The catalog."""
        with open(self.catalog_path, "rb") as f:
            data = f.read()
        return Catalog.decode(parse_json(data, str(self.catalog_path)), str(self.catalog_path))

    def save(self, catalog: Catalog) -> None:
        """Write the catalog atomically."""
        write_atomic(self.catalog_path, catalog.encode())

    def chunk_map(self, catalog: Catalog) -> dict[bytes, tuple[int, int, int]]:
        """The chunk map, cut back to the catalog's pack space."""
        try:
            data = self.chunks_path.read_bytes()
        except FileNotFoundError:
            return {}
        out, valid = decode_chunk_map(data, catalog.pack_end)
        if valid != len(data):
            os.truncate(self.chunks_path, valid)
        return out

    def write_html(self, catalog: Catalog) -> None:
        """Write ``index.html`` for the catalog."""
        from ..repo.html import render_html

        write_atomic(self.root / "index.html", render_html(catalog).encode())

    def write_artifact(self, kind: str, digest_hex: str, ext: str, data: bytes) -> None:
        """Put a content-addressed file in place (tmp + rename)."""
        d = self.root / kind
        d.mkdir(exist_ok=True)
        write_atomic(d / f"{digest_hex}.{ext}", data)


def init_repo(root: str | os.PathLike[str], *, avg_chunk: int = 64 << 10,
              level: int = DEFAULT_LEVEL, solid_level: int = DEFAULT_SOLID_LEVEL) -> Repo:
    """Create an empty repository (the directory may exist, empty)."""
    repo = Repo(root)
    if repo.catalog_path.exists():
        raise BtrdeltaError("already a repository (`btrdelta repo add` adds releases to it)",
                            path=str(repo.root))
    if repo.root.exists() and any(repo.root.iterdir()):
        raise BtrdeltaError("directory is not empty", path=str(repo.root))
    params = ChunkerParams.from_avg(avg_chunk)
    made = None if repo.root.exists() else repo.root.absolute()  # the first dir made
    while made is not None and not made.parent.exists():
        made = made.parent
    try:
        repo.meta.mkdir(parents=True)
        cat = Catalog(params, level, solid_level=solid_level)
        repo.save(cat)
        repo.write_html(cat)
    except BaseException:  # (a full disk, Ctrl-C): leave no half-made repository behind
        for entry in [made] if made else list(repo.root.iterdir()):  # (or empty it again)
            remove_path(entry, ignore_errors=True)
        raise
    return repo


@dataclass(slots=True)
class AddReport:
    """What ``repo add`` did."""

    version: str
    position: int
    identity: str = ""
    stream_size: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_chunk_bytes: int = 0
    full_bytes: int = 0
    #: bytes of the solid full (0: none made)
    solid_bytes: int = 0
    #: (source version, delta bytes, seconds)
    deltas: list[tuple[str, int, float]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    seconds: float = 0.0


Progress = Callable[[str], None]


def _remove_tree(path: Path) -> None:
    """Remove a tree of the publisher's cache (a btrfs subvolume or a directory)."""
    if not os.path.lexists(path):
        return
    from ..fs import btrfs as sv

    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if sv.is_btrfs(parent):
            with contextlib.suppress(OSError):
                sv.delete_subvolume(parent, os.fsencode(path.name))
                return
    finally:
        os.close(parent)
    remove_path(path)


def _check_same(received: Path, source: Path, identity: str) -> None:
    if tree_sum(received) != identity:
        want, got = tree_manifest(source), tree_manifest(received)
        diffs = _lost_properties(want, got, source) \
            or diff_manifests(want, got, limit=3)
        raise ChecksumError(
            "the release tree does not survive a send stream round trip: "
            + "; ".join(diffs), path=str(source))


def _lost_properties(want: list[Entry], got: list[Entry], source: Path) -> list[str]:
    """What to do about the btrfs properties (``btrfs.*`` extended attributes, e.g.
    ``btrfs property set F compression zstd``) of ``want`` that the receive into the
    repository did not keep (not btrfs there): one line naming the first path, or none."""
    kept = {e.path: {name for name, _ in e.xattrs} for e in got}
    lost = [(e.path, name, value) for e in want for name, value in e.xattrs
            if name.startswith(b"btrfs.") and name not in kept.get(e.path, ())]
    if not lost:
        return []
    path, name, value = lost[0]
    prop = name[6:].decode(errors="replace")
    where = shlex.quote(os.fsdecode(source / os.fsdecode(path)))  # (a command to paste)
    more = f" (and {len(lost) - 1} more path(s))" if len(lost) > 1 else ""
    return [f"{os.fsdecode(path)!r} has the btrfs property {prop}="
            f"{value.decode(errors='replace')}{more}, which the repository's filesystem (not "
            f"btrfs) cannot keep: clear it (btrfs property set {where} {prop} '') or keep "
            "the repository on btrfs"]


def _source_tree(repo: Repo, name: str, source: Path) -> tuple[Path, bool]:
    """A directory with the release: SOURCE itself, or a full stream received (True)."""
    if source.is_dir():
        return source, False
    stage = f".incoming-{name}"
    _remove_tree(repo.trees / stage)
    try:
        with open(source, "rb") as f:
            receive_release(f, repo.trees, stage, source=str(source), delta=False)
    except MissingParentError as exc:
        raise MissingBaseError(f"an incremental stream (its parent {exc.uuid} is no release "
                               "here): repo add takes a directory, a read-only snapshot or a "
                               "full stream", source=str(source)) from None
    return repo.trees / stage, True


def _ingest(repo: Repo, cat: Catalog, name: str, source: Path, report: AddReport,
            say: Progress, threads: int) -> CatalogVersion:
    """Steps 1-2 of the module docstring; returns the new catalog entry."""
    repo.trees.mkdir(exist_ok=True)
    repo.tmp.mkdir(exist_ok=True)
    tree, temporary = _source_tree(repo, name, source)
    stream = repo.tmp / f"full-{os.getpid()}.stream"
    try:
        say(f"{name}: content identity")
        identity = tree_sum(tree)
        say(f"{name}: full stream")
        with open(stream, "wb") as f:
            write_release_stream(f.write, tree, name, identity)
        say(f"{name}: chunks")
        chunk_map = repo.chunk_map(cat)
        packed = pack_stream(stream, repo.root, repo.tmp, params=cat.params, level=cat.level,
                             chunk_map=chunk_map, packs=cat.packs)
        say(f"{name}: receiving the full")
        _remove_tree(repo.trees / name)
        # the receive's warnings (a btrfs property skipped off btrfs) only where the tree
        # survived the round trip: else the check's error says what was lost, and how to
        # proceed, in its one line
        warned: list[str] = []
        with open(stream, "rb") as f:
            receive_release(f, repo.trees, name, source=str(stream), delta=False,
                            on_warning=warned.append)
        _check_same(repo.trees / name, tree, identity)
        for msg in warned:
            warn(msg)
        solid: Solid | None = None
        if cat.solid_level:
            say(f"{name}: solid full")
            idx = decode_full_index(packed.full_index, source=str(stream)).index
            solid = write_solid(stream, idx.order, idx.raw_sizes, repo.root, repo.tmp,
                                level=cat.solid_level, threads=threads)
    finally:
        stream.unlink(missing_ok=True)
        if temporary:
            _remove_tree(tree)
    import blake3

    full_hex = blake3.blake3(packed.full_index).hexdigest()
    repo.write_artifact("fulls", full_hex, "fidx", packed.full_index)
    with open(repo.chunks_path, "ab") as f:
        f.write(packed.new_records)
        f.flush()
        os.fsync(f.fileno())
    report.identity, report.stream_size = identity, packed.stream_size
    report.chunks, report.new_chunks = packed.chunks, packed.new_chunks
    report.new_chunk_bytes = packed.new_bytes
    cat.packs.extend(packed.new_packs)
    entry = CatalogVersion(
        name, identity, packed.stream_size, full_hex, len(packed.full_index),
        len(packed.full_index) + packed.chunk_bytes, [p.id for p in packed.new_packs],
        pending=delta_sources(len(cat.versions) + 1), measured=False, solid=solid)
    report.full_bytes = entry.full_bytes
    report.solid_bytes = solid.length if solid is not None else 0
    return entry


def add_release(
    root: str | os.PathLike[str], name: str, source: str | os.PathLike[str] | None, *,
    parallel: int = 1, plan_only: bool = False, verify: bool = True,
    on_progress: Progress | None = None,
) -> AddReport:
    """Add release ``name`` from ``source`` (see the module docstring).

    Re-running it for a version whose delta jobs are pending (``plan_only``, or an
    interrupted run) picks up the job results that exist and runs the rest; ``source`` is
    then not needed.
    """
    from .jobs import plan_jobs, run_pending

    try:
        check_version_name(name)
    except ValueError as exc:
        raise BtrdeltaError(str(exc)) from None
    repo = Repo(root)
    say = on_progress or (lambda _msg: None)
    t0 = time.monotonic()
    with repo.locked():
        cat = repo.load()
        pos = cat.position(name)
        if pos is None:
            if source is None:
                raise BtrdeltaError(f"version {name!r} is new: give its SOURCE")
            report = AddReport(name, len(cat.versions) + 1)
            # (the solid full's frames on as many threads, at least 2: level 19 is ~0.4 s
            # of CPU per MB; each thread's compressor holds ~100 MiB)
            threads = min(max(2, parallel), os.cpu_count() or 1)
            entry = _ingest(repo, cat, name, Path(source), report, say, threads)
            cat.versions.append(entry)
            repo.save(cat)
            pos = len(cat.versions)
        else:
            entry = cat.versions[pos - 1]
            if not entry.pending and entry.measured:
                raise BtrdeltaError(f"version {name!r} is already in the repository "
                                    "(published artifacts never change)")
            report = AddReport(name, pos, entry.identity, entry.stream_size,
                               full_bytes=entry.full_bytes,
                               solid_bytes=entry.solid.length if entry.solid else 0)
        if plan_only:
            report.pending = [cat.versions[a - 1].name for a in entry.pending]
            plan_jobs(repo, cat, pos)
        else:
            run_pending(repo, cat, pos, report, parallel=parallel, verify=verify, say=say)
            keep = {cat.versions[a - 1].name for a in future_sources(
                len(cat.versions), range(1, len(cat.versions) + 1))}
            for child in repo.trees.iterdir() if repo.trees.exists() else ():
                if not child.name.startswith(".") and child.name not in keep:
                    _remove_tree(child)
        repo.write_html(cat)
    report.seconds = time.monotonic() - t0
    return report
