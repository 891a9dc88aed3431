"""``btrdelta update URL DEST``: bring DEST to a version of a repository by the cheapest path.

1. Lock DEST; clean up what an interrupted run left (:func:`.holdings.cleanup`).
2. Walk the root chain from the pinned root key (:func:`btrdelta.repo.rootchain.current_root`:
   rotations, remembered in ``DEST/.btrdelta/trusted/<root key id>.root.json``), verify the
   repository's state (:func:`btrdelta.repo.metadata.load_index`: timestamp, index,
   signatures, freshness, rollback) on the first mirror that serves a good one, and
   remember it (``DEST/.btrdelta/trusted/<root key id>.json``).
3. Find the versions DEST holds: names of the index present in DEST (or left as verified
   intermediates), each checked by its content identity. An entry whose content differs
   is not held, but it seeds a full like a held version (a damaged file costs its chunks).
4. Plan (:func:`btrdelta.repo.plan.plan_update`) over every delta and every full; the
   target's full is priced with the chunks of the held versions and of the local chunk
   store. The plan (with its byte count) goes to the caller before anything is downloaded.
5. Apply hop by hop: download the artifact (resumable, every mirror in turn, hash
   checked), receive it (under a temporary name until the received tree's content
   identity checked) as ``DEST/.btrdelta-hop-<version>`` for an intermediate version, as
   ``DEST/<version>`` for the target, last. Beside each hop (:mod:`.beside`) the next
   hop's delta is downloaded, and the intermediate before it, no longer needed once this
   one is verified, removed; downloads, chunks and the last intermediate go at the end.
   A delta hop's identity is computed reading again only the files its stream
   may have changed (:mod:`btrdelta.tree.incremental`): the parent's file digests come
   from step 3 or from the hop before, in memory. The wanted version's digests are kept in
   ``DEST/.btrdelta/held/`` (:mod:`.heldsums`), so that step 3 of the next update does not
   read it again while it is the same read-only subvolume, unchanged.

State lives in ``DEST/.btrdelta/``: the pinned root key, trusted versions, a cache of
verified metadata, downloads (``*.part`` while incomplete), a chunk store for fulls.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import TYPE_CHECKING, _native, trust
from .._pool import StartedThread
from .._value import Value, field
from ..chunk.store import ChunkStore
from ..errors import BtrdeltaError, MissingBaseError
from ..fs.atomic import write_atomic
from ..fs.remove import remove_path
from ..receive.subvolumes import TMP_PREFIX
from ..repo.fullindex import FullIndex
from ..repo.metadata import (
    MetaCache,
    Verified,
    full_index,
    keep_timestamp,
    load_index,
    read_trusted,
    save_trusted,
    version_records,
)
from ..repo.mirror import Mirrors
from ..repo.model import ArtifactRef, VersionRecord, stream_uuid
from ..repo.plan import Plan, Step, plan_update
from ..repo.rootchain import current_root
from ..transport.config import HttpConfig
from ..tree.incremental import Digests
from . import heldsums, holdings
from .beside import Beside
from .fullfetch import fetch_full, fetch_solid, full_cost, solid_frames, store_stream
from .streams import receive_version, write_release_stream

if TYPE_CHECKING:
    from ..transport.client import Client

__all__ = ["UpdateResult", "update"]

STATE = ".btrdelta"
Event = Callable[[dict[str, Any]], None]


class UpdateResult(Value):
    """What an update planned and did."""

    target: str
    plan: Plan
    names: list[str]
    held: list[str] = field(default_factory=list)
    #: metadata bytes downloaded (timestamp, index, bins, full indexes)
    metadata_bytes: int = 0
    #: artifact bytes still to download when the plan was made (resumed downloads count
    #: what is missing); with ``seeded_by``, at most that
    to_download: int = 0
    #: the versions whose copies in DEST differ in content (not held) and seed the plan's
    #: full: what they hold is not downloaded, and ``to_download`` does not count it (only
    #: regenerating their streams would tell)
    seeded_by: list[str] = field(default_factory=list)
    #: every byte received from the mirrors by this run
    received: int = 0
    #: the digests of the target at ``path`` as this run checked them against the index
    #: (None: a dry run); not in the JSON
    digests: Digests | None = None
    applied: int = 0
    seconds: float = 0.0
    path: Path | None = None
    index_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "held": self.held, "index_version": self.index_version,
            "plan": self.plan.to_json(self.names), "to_download": self.to_download,
            "seeded_by": self.seeded_by,
            "metadata_bytes": self.metadata_bytes, "received": self.received,
            "hops_applied": self.applied, "seconds": round(self.seconds, 3),
            "path": str(self.path) if self.path else None,
        }


class _Dest:
    """The state directory of a destination."""

    def __init__(self, dest: Path, *, dry_run: bool = False) -> None:
        self.dest = dest
        self.state = dest / STATE
        self.downloads = self.state / "downloads"
        self.tmp = self.state / "tmp"
        self.store = ChunkStore(self.state / "chunks")
        self.meta = MetaCache(self.state / "meta", readonly=dry_run)
        #: the thread of :func:`_import_ahead` (joined before the first receive)
        self.imports: threading.Thread | None = None

    def imported(self) -> None:
        """Wait for :func:`_import_ahead`'s thread (a receive imports those modules)."""
        if self.imports is not None:
            self.imports.join()
            self.imports = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BtrdeltaError("another update of this destination is running",
                                    path=str(self.dest)) from None
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def looked_at(self) -> Iterator[None]:
        """A dry run's lock: shared, on the lock file an update made (none is made)."""
        try:
            fd = os.open(self.state / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BtrdeltaError("another update of this destination is running",
                                    path=str(self.dest)) from None
            yield
        finally:
            os.close(fd)

    def root_keys(self, key: str | None) -> list[trust.PublicKey]:
        """The root key given (pinned by :meth:`pin` once an index verified with it), or
        the one pinned before."""
        pinned = self.state / "root.pub"
        if key is not None:
            return [trust.load_root_key(key)]
        if not pinned.exists():
            raise BtrdeltaError("no root key: give --key ROOT_PUB (it is remembered in "
                                f"{pinned})")
        return [trust.load_public_key(str(pinned))]

    def pin(self, key: trust.PublicKey) -> None:
        """Remember ``key`` as DEST's root key. Called only once the index verified with
        it: a wrong ``--key`` given once (a typo, another repository's key) must not
        replace the right one, or every later update without ``--key`` fails (exit 5)."""
        write_atomic(self.state / "root.pub", (trust.public_key_text(key) + "\n").encode())


def _holdings(d: _Dest, mirrors: Mirrors, verified: Verified
              ) -> tuple[dict[int, Digests], dict[int, Path], dict[int, VersionRecord]]:
    """Versions DEST holds (checked by content; their digests, hashed now), entries named
    like a version whose content differs (seeds for a full: their chunks are checked by id
    like any seed's), and the records of both."""
    index = verified.index
    positions = index.positions()
    present = {p: path for name, p in positions.items()
               for path in (d.dest / name, d.dest / f"{holdings.HOP_PREFIX}{name}")
               if path.is_dir() and not path.is_symlink()}
    records = version_records(mirrors, index, d.meta, list(present))
    found = holdings.find_held(d.dest, {records[p].name: records[p].identity for p in present},
                               d.state, keep=not d.meta.readonly)
    held = {positions[n]: digests for n, digests in found.items()}
    return held, {p: path for p, path in present.items() if p not in held}, records


def _plan(d: _Dest, mirrors: Mirrors, verified: Verified, held: dict[int, Digests],
          records: dict[int, VersionRecord], target: int, seeded: bool) -> Plan:
    """The cheapest plan; a full the plan would use is priced given what DEST holds (the
    chunks of the held versions and of the local store) and, with nothing to seed it but
    those (``seeded``: entries whose content differs seed it too), by its solid frames
    (:func:`.fullfetch.solid_frames`), and the plan made again."""
    index = verified.index
    plan = plan_update(index, set(held), target)
    if target in held or not plan.steps:
        return plan
    records.update(version_records(mirrors, index, d.meta, [target]))
    if plan.bytes <= records[target].full.length:  # a full cannot beat it, even all reused
        return plan
    costs: dict[int, int] = {}
    fulls: list[FullIndex] | None = None
    for _ in range(3):  # (a full priced lower may make the plan take another version's)
        todo = [p for p in dict.fromkeys([target] + [s.target for s in plan.steps
                                                     if s.kind == "full"]) if p not in costs]
        records.update(version_records(mirrors, index, d.meta, todo))
        todo = [p for p in todo if held or (records[p].solid is not None and not seeded)]
        if not todo:
            break
        if fulls is None:
            fulls = [full_index(mirrors, records[p], d.meta) for p in sorted(held)]
        for p in todo:
            rec = records[p]
            if not held and rec.solid is not None:  # every frame (a resumed run's chunks
                costs[p] = rec.solid.first_install(rec.full.length)  # are `to_download`'s)
                continue
            costs[p] = full_cost(full_index(mirrors, rec, d.meta), fulls, d.store,
                                 rec.full.length, None if seeded else rec.solid)
        plan = plan_update(index, set(held), target, full_cost=costs)
    return plan


def _missing_bytes(d: _Dest, m: Mirrors, plan: Plan, records: dict[int, VersionRecord],
                   held: bool, seeded: bool) -> int:
    """What the plan still has to download: a delta less what a cut run kept of it, a full
    less the chunks the local store holds (with versions held, the plan priced the full
    with the store already; without, its price is the whole full, and a run cut during a
    full's download resumed with "58.0 MiB to download" and ended at "28.8 MiB of 58.0
    MiB, 50%")."""
    stored = False
    if not held and os.path.isdir(d.store.chunks_dir):
        with os.scandir(d.store.chunks_dir) as entries:
            stored = any(entries)
    total = 0
    for step in plan.steps:
        if step.kind == "delta":
            ref = next(x.ref for x in records[step.target].deltas if x.source == step.source)
            out = d.downloads / ref.path.split("/")[1]
            part = out.with_name(out.name + ".part")
            have = out.stat().st_size if out.exists() else (
                part.stat().st_size if part.exists() else 0)
            total += max(0, ref.length - have)
        elif stored:  # its full index fetched now (metadata): its chunks still missing
            rec = records[step.target]
            total += full_cost(full_index(m, rec, d.meta), [], d.store, 0,
                               None if seeded else rec.solid)
        else:
            total += step.bytes
    return total


def _import_ahead() -> threading.Thread:
    """Import, in a thread, what receiving a hop needs that the update has not imported
    yet: the delta expansion, the libraries of its patch codecs (those a hop applies with:
    ``hdiffpatch``, which pulls in ``attrs``, ~20 ms, only without the C applier of hdiff
    patches, ``_hpatch``, which is imported instead), the C applier, unfolder and walk. A
    fresh process spent ~55 ms
    of CPU on them inside its first delta hop (numpy's hop: 120 ms instead of 55 at the
    load of session 5); they are imported while the update downloads its index and
    hashes the versions DEST holds instead. The thread is joined before the first receive
    (:meth:`_Dest.imported`), so the two threads never import one module at once. A
    failure is left to the import that needs the module."""
    def run() -> None:
        with contextlib.suppress(Exception):
            from ..delta import codecs, events  # noqa: F401
            from . import receive  # noqa: F401

            for codec in codecs.CODECS.values():
                with contextlib.suppress(Exception):  # a missing one: the next
                    codec.require()
            for name in ("fastapply", "unfold", "treewalk", "hpatch"):
                _native.live(name)

    thread = StartedThread(run, "btrdelta-imports")
    thread.start()
    return thread


def _verified(d: _Dest, m: Mirrors, key: str | None, now: float | None,
              made: Path | None) -> Verified:
    """The repository's verified index, the root key pinned and the trusted state kept
    (not on a dry run); ``made`` is removed if it fails (under DEST's lock)."""
    dry_run = d.meta.readonly
    try:
        pinned = d.root_keys(key)
        trusted_path = d.state / "trusted" / f"{trust.key_id(pinned[0])}.json"
        keys = current_root(m, pinned, trusted_path.with_suffix(".root.json"),
                            save=not dry_run)
        verified = load_index(
            m, keys, read_trusted(trusted_path), d.meta, now=now,
            on_newer=None if dry_run else lambda v: keep_timestamp(trusted_path, v))
    except BaseException:
        if made is not None:
            remove_path(made, ignore_errors=True)
        raise
    if not dry_run:
        save_trusted(trusted_path, verified)
        if key is not None:
            d.pin(pinned[0])
    return verified


def update(
    url: str, dest: str | os.PathLike[str], *, to: str | None = None, key: str | None = None,
    mirrors: Sequence[str] = (), dry_run: bool = False, client: Client | None = None,
    on_event: Event | None = None, now: float | None = None,
    config: HttpConfig | None = None,
) -> UpdateResult:
    """Update ``dest`` from the repository at ``url`` (and ``mirrors``); see the module
    docstring. ``on_event`` receives progress events (dicts with an ``"event"`` key); the
    plan is the first (``{"event": "plan", ...}``), before any artifact is downloaded.
    ``dry_run``: the plan only, and nothing written (not DEST, its lock, the key given,
    the trusted state or the metadata cache; what is cached is used)."""
    t0 = time.monotonic()
    d = _Dest(Path(dest), dry_run=dry_run)
    #: a first update's DEST (or its state directory) is made by this run: gone again if
    #: the run ends before an index verified (a wrong key or URL leaves nothing behind)
    made = None if dry_run or d.state.exists() else \
        d.state if d.dest.exists() else d.dest
    if not dry_run:  # (a dry run writes nothing: no directory, lock, pin, cache or state)
        d.dest.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda _e: None)
    beside = Beside(d.dest, emit)
    m = Mirrors([url, *mirrors], config=config, client=client, on_bytes=beside.on_bytes)
    if not dry_run:
        d.imports = _import_ahead()
    try:
        with d.looked_at() if dry_run else d.locked():
            verified = _verified(d, m, key, now, made)
            if not dry_run:
                holdings.cleanup(d.dest)
            try:
                result = _run(d, m, verified, to, dry_run, emit, beside)
            except BaseException:
                m.stop()  # (its downloads beside it end at once: Ctrl-C waited for them)
                raise
            finally:
                beside.wait(raising=False)  # (a failed run: its threads end first)
            result.metadata_bytes += verified.downloaded
    finally:
        m.close()
    result.received = m.stats.bytes_received
    result.seconds = time.monotonic() - t0
    return result


def _made_here(dest: Path, name: str) -> bool:
    """:meth:`~..receive.registry.Registry.made` (its module imported on this rare path
    only: the update's start makes no dataclass)."""
    from ..receive.registry import Registry

    return Registry(dest).made(name)


def _run(d: _Dest, m: Mirrors, verified: Verified, to: str | None, dry_run: bool,
         emit: Event, beside: Beside) -> UpdateResult:
    index = verified.index
    names = [v.name for v in index.versions]
    if not names:
        raise MissingBaseError("the repository has no versions")
    target = index.positions().get(to) if to is not None else len(names)
    if target is None:
        raise MissingBaseError(f"version {to!r} is not in the repository (newest: "
                               f"{names[-1]!r})")
    before = m.stats.bytes_received
    held, unverified, records = _holdings(d, m, verified)
    plan = _plan(d, m, verified, held, records, target, bool(unverified))
    records.update(version_records(m, index, d.meta, [s.target for s in plan.steps]))
    res = UpdateResult(names[target - 1], plan, names, [names[p - 1] for p in sorted(held)],
                       index_version=index.version)
    res.to_download = _missing_bytes(d, m, plan, records, bool(held), bool(unverified))
    if any(s.kind == "full" for s in plan.steps):
        res.seeded_by = [names[p - 1] for p in sorted(unverified)]
    res.metadata_bytes = m.stats.bytes_received - before
    final = d.dest / names[target - 1]
    aside = d.dest / f"{TMP_PREFIX}broken-{os.getpid()}"
    # (a version held only as an intermediate of a run that stopped gets the name below)
    broken = os.path.lexists(final) and (target not in held or held[target].root != final)
    if broken and not _made_here(d.dest, final.name):
        raise BtrdeltaError(f"{final} exists and is not version {names[target - 1]!r} "
                            "(its content identity differs); not touching it")
    emit({"event": "plan", **res.to_json()})
    if broken:
        # made by an update of this DEST (its registry entry owns the directory), then no
        # longer the version: data a power cut lost after its rename (no received tree is
        # synced). Moved aside (a run that dies leaves a name the next one's cleanup
        # removes), made again, removed after the last hop; --dry-run only says so
        emit({"event": "replace", "path": str(final), "version": names[target - 1],
              "dry_run": dry_run})
        if not dry_run:  # (still a seed of a full's chunks: removed after the last hop)
            os.rename(final, aside)
            unverified = {p: aside if path == final else path for p, path in unverified.items()}
    if dry_run or not plan.steps:
        res.path = held[target].root if target in held else None
        if not dry_run and res.path is not None:  # (no steps: the target is held)
            if res.path != final:
                res.path = holdings.promote(d.dest, held[target], final.name)
            res.digests = held[target]
            if broken:
                beside.remove(aside.name)
            _finish(d, beside)  # (what a stopped run left: downloads, intermediates)
        return res
    current = held.get(plan.start) if plan.start is not None else None
    seedable = {**unverified, **{p: h.root for p, h in held.items()}}
    # (the solid frames of a full are chosen knowing the chunks of the versions held; not
    # with entries whose content differs: what they hold is known only once regenerated)
    solid_held = None if unverified else sorted(held)
    steps = plan.steps
    for i, step in enumerate(steps, 1):
        start = current
        current = _apply(d, m, step, records, seedable, solid_held, current,
                         last=i == len(steps),
                         hop=(i, len(steps)), emit=emit, beside=beside,
                         after=steps[i] if i < len(steps) else None, made=i > 1)
        res.applied += 1
        if start is not None and start.root.name.startswith(holdings.HOP_PREFIX):
            beside.remove(start.root.name)  # (the newer one is verified: resumed from)
    assert current is not None
    res.path, res.digests = current.root, current
    if broken:
        beside.remove(aside.name)
    _finish(d, beside)
    emit({"event": "done", "path": str(current.root)})
    heldsums.save(d.state, current)  # the next update does not hash it again
    return res


def _delta_file(d: _Dest, m: Mirrors, step: Step, records: dict[int, VersionRecord]
                ) -> tuple[Path, Callable[[], Path], ArtifactRef]:
    """Where delta step ``step``'s artifact goes, the call that downloads it, its
    reference in the index."""
    ref = next(x.ref for x in records[step.target].deltas if x.source == step.source)
    out = d.downloads / ref.path.split("/")[1]

    def download() -> Path:
        d.downloads.mkdir(parents=True, exist_ok=True)
        return m.download(ref.path, out, length=ref.length, digest=ref.blake3)

    return out, download, ref


def _apply(d: _Dest, m: Mirrors, step: Step, records: dict[int, VersionRecord],
           seedable: dict[int, Path], solid_held: list[int] | None, parent: Digests | None,
           *, last: bool,
           hop: tuple[int, int], emit: Event, beside: Beside, after: Step | None,
           made: bool) -> Digests:
    """Apply one step of the plan to ``parent`` (the digests of the version it starts from,
    hashed by this run: only the files the delta may change are read again to check the
    result's identity); returns the new version's digests. The step ``after`` it, a delta,
    is downloaded meanwhile (:meth:`.beside.Beside.fetch`). ``made``: ``parent`` is the
    hop before, received by this run with the repository's UUID of its version (it needs
    no alias or registry entry to be found: it is given to the receive as it is). An
    intermediate gets no registry entry (directories): a run that resumes from it finds
    it by content, as any held version, and :func:`.holdings.ensure_parent` registers it
    then."""
    def fetch_after() -> None:
        if after is not None and after.kind == "delta":
            out, download, ref = _delta_file(d, m, after, records)
            beside.fetch(out, ref.length, download)

    rec = records[step.target]
    name = rec.name if last else f"{holdings.HOP_PREFIX}{rec.name}"
    if not last:  # an unverified leftover of an earlier run
        holdings.remove_entry(d.dest, name)
    info = {"hop": hop[0], "hops": hop[1], "kind": step.kind, "to": rec.name,
            "from": records[step.source].name if step.source else None, "bytes": step.bytes}
    emit({"event": "fetch", **info})
    if step.kind == "delta":
        if parent is None or step.source is None:
            raise MissingBaseError("a delta hop without its parent version")
        src = records[step.source]
        parent_dir = parent.root if made else holdings.ensure_parent(d.dest, parent, src.name)
        out, download, ref = _delta_file(d, m, step, records)
        path = beside.take(out, download)
        fetch_after()
        emit({"event": "apply", **info})
        d.imported()
        with open(path, "rb") as f:
            return receive_version(f, d.dest, name, source=ref.path, delta=True,
                                   identity=rec.identity, parent=parent,
                                   parent_at=(stream_uuid(parent.identity), parent_dir),
                                   verified=True, register=last)[1]
    else:
        full = full_index(m, rec, d.meta)
        def progress(phase: str, done: int, total: int) -> None:
            emit({"event": "progress", "phase": phase, "done": done, "total": total, **info})

        if rec.solid is not None and solid_held is not None:
            have: set[bytes] = set()
            for p in solid_held:
                have.update(full_index(m, records[p], d.meta).index.digests)
            frames = solid_frames(full, rec.solid, have, d.store)[0]
            if frames:
                fetch_solid(full, rec.solid, frames, m, d.store, on_progress=progress)
        if all(d.store.has(x) for x in full.index.digests):
            seedable = {}  # (every chunk is here: no stream to regenerate)
        seeds = _seeds(d, seedable, records, emit)
        try:
            fetch_full(full, m, d.store, rec.name, seeds, on_progress=progress)
        finally:
            for s in seeds:
                s.unlink(missing_ok=True)
        fetch_after()
        emit({"event": "apply", **info})
        d.imported()
        with store_stream(full.index, full.header.image_digest, d.store,
                          source=rec.full.path) as stream:
            return receive_version(stream, d.dest, name,  # type: ignore[arg-type]
                                   source=rec.full.path, delta=False,
                                   identity=rec.identity, register=last)[1]


def _seeds(d: _Dest, trees: dict[int, Path], records: dict[int, VersionRecord],
           emit: Event) -> list[Path]:
    """Regenerated plain streams of the versions DEST holds, and of entries named like a
    version whose content differs (a damaged file costs its own chunks, not the full)."""
    d.tmp.mkdir(parents=True, exist_ok=True)
    out = []
    for p, path in sorted(trees.items()):
        rec = records[p]
        emit({"event": "seed", "version": rec.name})
        seed = d.tmp / f"seed-{p}.stream"
        with open(seed, "wb") as f:
            write_release_stream(f.write, path, rec.name, rec.identity)
        out.append(seed)
    return out


def _finish(d: _Dest, beside: Beside) -> None:
    """Drop what only this update needed: downloads, chunks and temporary files while the
    last intermediate is removed (by ``beside``'s thread: the two overlap), then any
    intermediate or alias left (of an earlier run)."""
    beside.wait(removals=False)  # (every download taken: none is written any more)
    for sub in (d.downloads, d.tmp, d.store.root):
        remove_path(sub, ignore_errors=True)
    beside.wait()
    for entry in os.listdir(d.dest):
        if entry.startswith((holdings.HOP_PREFIX, holdings.BASE_PREFIX)):
            holdings.remove_entry(d.dest, entry)
