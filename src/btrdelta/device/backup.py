"""``device backup`` / ``device restore``: state subvolumes as chains of send streams.

A backup of ``state/NAME`` is a read-only snapshot ``.btrdelta/backups/NAME/NAME.N`` sent
by the kernel (``btrfs send``): the first one whole (``NAME.N.stream``), the next ones
incremental against the newest snapshot whose backup that destination holds (kept on the
device for that: one per destination, the :data:`KEEP_DESTINATIONS` used last, named in
``NAME/destinations.json``), and delta-compressed against its files (``NAME.N.delta``,
``btrdelta delta make``). The files
and an index ``NAME.backups.json`` go to a directory (any filesystem) or an HTTP location
that takes ``PUT``, ``MOVE`` and ``DELETE`` (WebDAV: the lock, :mod:`.backuplock`). Restore
reads the index, receives the chain from the last full stream on (a delta's old files are
verified against the subvolume restored before it) and puts a writable snapshot of the
result in place of ``state/NAME``, or leaves the received tree in any directory.

Index (version 1)::

    {"format": "btrdelta-backups", "version": 1, "name": "home",
     "backups": [{"n": 1, "file": "home.1.stream", "parent": null,
                  "uuid": "...", "tree_sum": "...", "bytes": 1234, "time": 1700000000.0}]}
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..chunk.source import file_url_path
from ..errors import StreamFormatError, TransportError, UsageError
from ..fs import btrfs as sv
from ..fs.atomic import atomic_output, write_atomic
from ..receive import ReceivedSubvol
from ..tree import tree_sum
from .layout import DeviceError, Layout, open_device
from .state import load_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ..transport.client import Client

__all__ = ["BACKUP_WORK", "KEEP_DESTINATIONS", "RESTORED", "RESTORE_WORK", "backup", "restore",
           "restore_to_dir", "restored_in_use"]

_FORMAT = "btrdelta-backups"
#: a restore's work directory in ``.btrdelta/``, the prefix of its new subvolume in ``state/``
#: (after the swap: the old one); recovery removes both when a restore was cut short
RESTORE_WORK = "restore"
RESTORED = ".restored-"
#: a backup's work directory in ``.btrdelta/`` (its stream and delta before they are put):
#: recovery removes it when a backup was cut short
BACKUP_WORK = "backup-work"
#: destinations (directories, URLs) whose last backup's snapshot stays on the device as the
#: parent of their next incremental backup: the ones used last (an older one's next backup
#: is whole); each kept snapshot holds the data changed since on the device
KEEP_DESTINATIONS = 4
_DESTINATIONS = "destinations.json"
#: in ``.btrdelta/``: the HTTP locks of backup names this device takes (:mod:`.backuplock`)
LOCK_NOTES = "backup-locks.json"
#: the largest index read (an index of 1 MiB lists thousands of backups)
_INDEX_LIMIT = 1 << 20


def _client() -> Client:
    """An HTTP client for one request to the backup location; a proxy variable that cannot
    be used (``https_proxy=socks5://...``) is a usage error (exit 2), as for ``update``,
    not a failed transfer."""
    from ..transport.client import Client, InvalidURL

    try:
        return Client(timeout=60, follow_redirects=False)
    except InvalidURL as exc:
        raise UsageError(str(exc)) from None


class _Store:
    """A backup location: a directory (or a ``file://`` URL), or an ``http(s)://`` URL
    taking PUT and GET."""

    def __init__(self, where: str, *, create: bool = False) -> None:
        """``create``: a directory that does not exist is made (a backup's destination);
        else it must exist (a restore's source: a mistyped name was made, empty)."""
        where = file_url_path(where)
        self.where = where.rstrip("/") or "/"
        self.http = where.startswith(("http://", "https://"))
        #: the destination's name in ``destinations.json``
        self.key = self.where if self.http else os.path.realpath(self.where)
        if self.http:
            return
        if os.path.exists(where) and not os.path.isdir(where):
            raise DeviceError(f"{where} is not a directory (backups are files in a "
                              "directory, or at an http(s) URL)")
        if create:
            Path(where).mkdir(parents=True, exist_ok=True)
        elif not os.path.isdir(where):
            raise DeviceError(f"{where}: no such directory")

    def put(self, name: str, path: Path, *, replace: bool = True) -> None:
        """Write file ``name`` whole from ``path``. Over HTTP with ``replace`` false (a
        backup's file) it is put under a name of its own and ``MOVE``-d to ``name`` with
        ``Overwrite: F``: a backup whose lock was broken while it sent (its number chosen
        before the other device put its file of that number) fails instead of replacing
        the other's file."""
        if not self.http:
            with open(path, "rb") as src, atomic_output(Path(self.where) / name) as out:
                shutil.copyfileobj(src, out, 1 << 20)
            return
        from .backuplock import call

        url = f"{self.where}/{name}"
        part = url if replace else f"{url}.{os.urandom(8).hex()}.part"
        with open(path, "rb") as f:
            status, _ = call(_client, "PUT", part, body=f)
        if status not in (200, 201, 204):
            raise TransportError(f"PUT answered {status}", url=part, status=status)
        if replace:
            return
        status, _ = call(_client, "MOVE", part, headers={"Destination": url, "Overwrite": "F"})
        if status in (201, 204):
            return
        with contextlib.suppress(TransportError):
            call(_client, "DELETE", part)
        if status == 412:  # (Precondition Failed: the name exists)
            raise DeviceError(f"{url}: another backup put a file of this number meanwhile "
                              "(this backup's lock was broken or removed while it sent): "
                              "left as it is, nothing more written")
        raise TransportError(f"MOVE answered {status}", url=part, status=status)

    def get(self, name: str, dest: BinaryIO, *, limit: int | None = None) -> None:
        """Copy backup file ``name`` into ``dest``: a regular file of the directory (never
        through a symlink, a FIFO or a device: a USB stick is untrusted too), or the body
        of a GET; with ``limit``, refused once it is larger (an index: never an endless
        download into a temporary file)."""
        copied = 0

        def put(chunk: bytes) -> None:
            nonlocal copied
            copied += len(chunk)
            if limit is not None and copied > limit:
                raise StreamFormatError(f"larger than {limit} bytes",
                                        source=f"{self.where}/{name}")
            dest.write(chunk)

        if not self.http:
            path = Path(self.where) / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise DeviceError(f"{self.where}: no backup file {name}") from exc
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise StreamFormatError("a symlink, not a backup file", source=str(path)) \
                    from None
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StreamFormatError("not a regular file", source=str(path))
                while chunk := f.read(1 << 20):
                    put(chunk)
            return
        from ..transport.client import HTTPError

        url = f"{self.where}/{name}"
        try:
            with _client() as client, \
                    client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise TransportError(f"GET answered {resp.status_code}", url=url,
                                         status=resp.status_code)
                for chunk in resp.iter_raw(1 << 20):
                    put(chunk)
        except HTTPError as exc:
            raise TransportError(f"GET failed: {exc}", url=url) from exc

    def index(self, name: str) -> list[dict[str, Any]]:
        with tempfile.TemporaryFile() as f:
            try:
                self.get(f"{name}.backups.json", f, limit=_INDEX_LIMIT)
            except DeviceError:
                return []
            except TransportError as exc:
                if exc.status == 404:
                    return []
                raise
            f.seek(0)
            raw = f.read()
        try:
            doc = json.loads(raw)
            if doc.get("format") != _FORMAT or doc.get("version") != 1:
                raise ValueError("not a btrdelta backup index")
            return _entries(doc["backups"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise StreamFormatError(f"invalid backup index: {exc}",
                                    source=f"{self.where}/{name}.backups.json") from exc

    @contextlib.contextmanager
    def lock(self, name: str, notes: Path, on_wait: Callable[[str], None],
             break_lock: bool = False) -> Iterator[Callable[[], None]]:
        """Hold ``NAME.backups.lock`` (:mod:`.backuplock`: waited for, said in ``on_wait``)
        from the index read to the removal of unlisted files: two devices backing up NAME
        to one place at once took the same number, one's file replaced the other's, and
        one index entry was lost. ``notes``: the device's note of its HTTP locks;
        ``break_lock``: an HTTP lock not renewed for its lease is taken. Yields the check
        that the lock is still held (:func:`.backuplock.held_over_http`)."""
        from .backuplock import held_in_directory, held_over_http

        if self.http:
            with held_over_http(f"{self.where}/{name}.backups.lock", _client, notes,
                                on_wait, break_lock=break_lock) as check:
                yield check
        else:
            with held_in_directory(Path(self.where) / f"{name}.backups.lock",
                                   on_wait) as check:
                yield check

    def taken(self, name: str, n: int) -> bool:
        """Whether the location holds an entry of any type named like backup ``n``'s file
        (a directory ``NAME.N.stream`` made a backup numbered N fail, its file not put;
        over HTTP, a file a backup cut short put before its index, which a backup's
        ``MOVE`` does not replace)."""
        if not self.http:
            return any(os.path.lexists(Path(self.where) / f"{name}.{n}.{kind}")
                       for kind in ("stream", "delta"))
        from .backuplock import call

        for kind in ("stream", "delta"):
            url = f"{self.where}/{name}.{n}.{kind}"
            status, _ = call(_client, "HEAD", url)
            if status == 200:
                return True
            if status != 404:
                raise TransportError(f"HEAD answered {status}", url=url, status=status)
        return False

    def drop_unlisted(self, name: str, entries: list[dict[str, Any]]) -> list[str]:
        """Remove the backup files of ``name`` (``NAME.N.stream``, ``NAME.N.delta``: regular
        files; a directory or symlink of that name is not one) in a directory that
        ``entries`` (its index) does not list: a backup cut short after its file was put,
        before the index named it, left it. Returns their names. (Over HTTP nothing is
        listed or removed.)"""
        if self.http:
            return []
        listed = {e["file"] for e in entries}
        dropped = []
        for entry in sorted(os.listdir(self.where)):
            head, _, kind = entry.rpartition(".")
            stem, _, num = head.rpartition(".")
            if stem != name or not num.isdigit() or kind not in ("stream", "delta") or \
                    entry in listed:
                continue
            path = Path(self.where) / entry
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
                    dropped.append(entry)
        return dropped

    def put_index(self, name: str, entries: list[dict[str, Any]]) -> None:
        doc = {"format": _FORMAT, "version": 1, "name": name, "backups": entries}
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            f.write(json.dumps(doc, indent=1).encode() + b"\n")
            f.flush()
            if self.http:
                self.put(f"{name}.backups.json", Path(f.name))
            else:
                write_atomic(Path(self.where) / f"{name}.backups.json",
                             Path(f.name).read_bytes())


def _entries(backups: Any) -> list[dict[str, Any]]:
    """The entries of an index's ``backups``, each checked: ``n`` a number from 1 on, once;
    ``file`` one plain name (never a path out of the location); ``parent`` none or an
    earlier backup (so a chain ends: a parent naming itself or a later one made restore loop
    forever, its memory growing); ``uuid`` and ``tree_sum`` strings.

    Raises:
        ValueError: what is wrong, naming the entry.
    """
    if not isinstance(backups, list):
        raise ValueError("'backups' is not a list")
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i, b in enumerate(backups):
        if not isinstance(b, dict):
            raise ValueError(f"backups[{i}] is not an object")
        n, file, parent = b.get("n"), b.get("file"), b.get("parent")
        if type(n) is not int or n < 1 or n in seen:
            raise ValueError(f"backups[{i}]: 'n' {n!r} is not a new number from 1 on")
        if not isinstance(file, str) or file in ("", ".", "..") or "/" in file \
                or "\0" in file:
            raise ValueError(f"backups[{i}]: 'file' {str(file)[:80]!r} is not a plain name")
        if parent is not None and (type(parent) is not int or not 1 <= parent < n):
            raise ValueError(f"backups[{i}]: 'parent' {parent!r} is not an earlier backup")
        for key in ("uuid", "tree_sum"):
            if not isinstance(b.get(key), str):
                raise ValueError(f"backups[{i}]: {key!r} missing or not a string")
        seen.add(n)
        out.append(dict(b))
    return out


def _snapshots(layout: Layout, name: str) -> list[tuple[int, Path]]:
    base = layout.backups / name
    out = []
    for entry in os.listdir(base) if base.is_dir() else []:
        head, _, num = entry.rpartition(".")
        if head == name and num.isdigit():
            out.append((int(num), base / entry))
    return sorted(out)


def backup(fs: str | os.PathLike[str], name: str, dest: str, *, full: bool = False,
           on_wait: Callable[[str], None] | None = None,
           break_lock: bool = False) -> dict[str, Any]:
    """Back up state subvolume ``name`` to ``dest`` (directory or URL): incremental against
    the previous backup when it is both on the device and in ``dest``'s index, as a delta
    stream against its files; else a whole stream. Returns the new index entry, and in
    ``removed`` the files of backups cut short it removed from a directory ``dest``
    (:meth:`_Store.drop_unlisted`). ``on_wait`` is told in one line when the backup waits
    for another one's lock of ``name`` at ``dest`` (:mod:`.backuplock`); ``break_lock``
    takes an HTTP lock its holder has not renewed for :data:`.backuplock.LEASE` seconds
    (without it such a lock ends the wait with an error)."""
    from ..delta import make_delta
    from ..send import kernel_send
    from .control import recover

    store = _Store(dest, create=True)
    with open_device(fs) as layout, layout.lock(), \
            store.lock(name, layout.meta / LOCK_NOTES, on_wait or (lambda line: None),
                       break_lock) as still_held:
        st = load_state(layout)
        recover(layout, st)
        if name not in {s.name for s in st.state} or not layout.is_subvolume(layout.state(name)):
            raise DeviceError(f"no state subvolume {name!r} (the device's: "
                              f"{', '.join(s.name for s in st.state) or 'none'})")
        entries = store.index(name)
        local = _snapshots(layout, name)
        known = {int(e["n"]): e.get("uuid") for e in entries}
        prev = None if full else _parent(layout, local, known)
        n = max([0, *known, *(k for k, _ in local)]) + 1
        while store.taken(name, n):
            n += 1
        (layout.backups / name).mkdir(parents=True, exist_ok=True)
        snap = layout.backups / name / f"{name}.{n}"
        layout.snapshot(layout.state(name), snap, readonly=True)
        try:
            entry = _send(layout, snap, prev, store, name, n, kernel_send, make_delta)
        except BaseException:
            layout.delete(snap)
            raise
        still_held()  # (else another backup may have written the index meanwhile)
        store.put_index(name, [*entries, entry])
        keep = _remember(layout.backups / name, store.key, n)
        for k, old in local:  # only each destination's newest one is a next parent
            if k not in keep:
                layout.delete(old)
        return {**entry, "removed": store.drop_unlisted(name, [*entries, entry])}


def _parent(layout: Layout, local: list[tuple[int, Path]],
            known: dict[int, object]) -> tuple[int, Path] | None:
    """The newest snapshot on the device whose backup the destination's index holds (same
    number and subvolume UUID: another device's backup of that name is no parent)."""
    for k, snap in reversed(local):
        if k in known:
            with layout.fd(snap) as fd:
                if str(sv.subvol_info(fd).uuid) == known[k]:
                    return k, snap
    return None


def _remember(base: Path, key: str, n: int) -> set[int]:
    """Note that destination ``key`` holds backup ``n``; the snapshots to keep: each of
    the :data:`KEEP_DESTINATIONS` destinations used last, its newest backup's."""
    try:
        doc = json.loads((base / _DESTINATIONS).read_bytes())
        held = {str(k): int(v) for k, v in doc["destinations"].items()}
    # (a damaged file's json RecursionError, a number past a float's OverflowError too)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError,
            RecursionError):
        held = {}  # none yet, or damaged: the other destinations' next backups are whole
    held.pop(key, None)
    held = dict(list({key: n, **held}.items())[:KEEP_DESTINATIONS])
    write_atomic(base / _DESTINATIONS,
                 json.dumps({"destinations": held}, indent=1).encode() + b"\n")
    return set(held.values())


def _send(layout: Layout, snap: Path, prev: tuple[int, Path] | None, store: _Store,
          name: str, n: int, kernel_send: Any, make_delta: Any) -> dict[str, Any]:
    tmp = layout.meta / BACKUP_WORK
    shutil.rmtree(tmp, ignore_errors=True)  # (recover removed a cut backup's already)
    tmp.mkdir(mode=0o700)
    try:
        stream = tmp / "stream"
        with open(stream, "wb") as f:
            kernel_send(f.write, snap, prev[1] if prev else None, version=2,
                        compressed=True)
        _end_with_root_times(stream, snap, 2)
        if prev is None:
            file, out = f"{name}.{n}.stream", stream
        else:
            file, out = f"{name}.{n}.delta", tmp / "delta"
            with open(stream, "rb") as src, open(out, "wb") as dst:
                make_delta(src, prev[1], dst.write, source=str(snap))
        store.put(file, out, replace=False)
        with layout.fd(snap) as fd:
            uuid = sv.subvol_info(fd).uuid
        return {"n": n, "file": file, "parent": prev[0] if prev else None, "uuid": str(uuid),
                "tree_sum": tree_sum(snap), "bytes": out.stat().st_size,
                "time": round(time.time(), 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _end_with_root_times(stream: Path, snap: Path, version: int) -> None:
    """Put a UTIMES of the subvolume's root before the END of kernel stream ``stream``.

    The kernel sends no utimes for the root after an incremental send renamed or removed
    an entry of it (orphans), so the receiver left the root's mtime at the time of the
    receive and the restored tree-sum differed from the backup's (exit 5). With the root's
    times as the last command any receiver (``btrfs receive`` too) sets them.
    """
    from ..stream.codec import encode_record
    from ..stream.records import End, Utimes

    end = b"".join(bytes(p) for p in encode_record(End(), version))
    st = os.lstat(snap)
    root = Utimes(b"", st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
    with open(stream, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - len(end)))
        if f.read(len(end)) != end:
            raise StreamFormatError("btrfs send's stream does not end with END",
                                    source=str(snap))
        f.seek(size - len(end))
        for piece in (*encode_record(root, version), end):
            f.write(piece)


def _chain(entries: list[dict[str, Any]], upto: int | None, index: str
           ) -> list[dict[str, Any]]:
    """The backups to receive in turn for backup ``upto`` (default: the last) of the
    ``entries`` of ``index`` (the index file, for the errors)."""
    by_n = {int(e["n"]): e for e in entries}
    if not by_n:
        raise DeviceError(f"{index}: no such backup index (no backups of that name there)")
    n: int | None = upto if upto is not None else max(by_n)
    chain = []
    while n is not None:
        if n not in by_n:
            listed = ", ".join(str(k) for k in sorted(by_n))
            raise DeviceError(f"{index}: no backup {n} (it lists {listed})")
        chain.append(by_n[n])
        parent = by_n[n].get("parent")
        n = None if parent is None else int(parent)
    return list(reversed(chain))


def restore_to_dir(src: str, name: str, dest: str | os.PathLike[str], *,
                   upto: int | None = None) -> Path:
    """Receive backup chain ``name`` from ``src`` below directory ``dest`` (any filesystem;
    subvolumes on btrfs); returns the directory of the restored tree, checked against the
    backup's tree-sum."""
    from ..update.receive import receive_any

    store = _Store(src)
    chain = _chain(store.index(name), upto, f"{store.where}/{name}.backups.json")
    dest = Path(dest)
    got: list[ReceivedSubvol] = []
    try:
        for entry in chain:
            with tempfile.TemporaryFile() as f:
                store.get(str(entry["file"]), f)
                f.seek(0)
                got.append(receive_any(f, dest, source=f"{src}/{entry['file']}")[-1])
        digest = tree_sum(got[-1].path)
        if digest != chain[-1]["tree_sum"]:
            from ..errors import ChecksumError

            raise ChecksumError(f"restored tree-sum {digest} differs from the backup's",
                                expected=chain[-1]["tree_sum"], actual=digest, source=src)
    except BaseException:
        for done in reversed(got):  # a failed restore leaves nothing behind
            _remove(done)
        raise
    for done in got[:-1]:  # the chain's earlier backups were only parents of the last
        _remove(done)
    return got[-1].path


def _on_btrfs(path: str | os.PathLike[str]) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return sv.is_btrfs(fd)
    finally:
        os.close(fd)


def _remove(got: ReceivedSubvol) -> None:
    """Delete a received tree: a subvolume on btrfs, else a plain directory."""
    if not got.btrfs:
        from ..receive.registry import Registry

        shutil.rmtree(got.path)
        Registry(got.path.parent).remove(got.path.name, got.uuid)
        return
    fd = os.open(got.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sv.delete_subvolume(fd, os.fsencode(got.path.name))
    finally:
        os.close(fd)


def restore(fs: str | os.PathLike[str], name: str, src: str, *, upto: int | None = None,
            as_name: str | None = None) -> dict[str, Any]:
    """Restore backup chain ``name`` from ``src`` as state subvolume ``as_name`` (default
    ``name``) of device ``fs``: received in a hidden directory, then a writable snapshot
    swapped in place of the state subvolume in one rename. The one it replaced is deleted,
    or kept as ``state/.restored-NAME`` until the next boot when the running system booted
    from this device (its bind mount or overlay uses it: deleted under them, /home became
    an empty directory where writes failed); the report's ``old_kept`` says which."""
    from .control import recover

    target = as_name or name
    if os.path.isdir(fs) and not _on_btrfs(fs):
        raise DeviceError(f"{fs} is not on btrfs: a device's state subvolume is restored "
                          "(into a plain directory: --to-dir)")
    with open_device(fs) as layout, layout.lock():
        st = load_state(layout)
        recover(layout, st)
        if target not in {s.name for s in st.state}:
            raise DeviceError(f"the device has no state subvolume {target!r} (its: "
                              f"{', '.join(s.name for s in st.state) or 'none'})")
        if restored_in_use(layout, target):
            raise DeviceError(f"the running system still uses state/{target} as it was "
                              f"before the last restore (state/{RESTORED}{target}): "
                              "reboot first")
        work = layout.meta / RESTORE_WORK
        layout.delete(work, wait=True)
        work.mkdir()
        try:
            kept = _swap_in(layout, target, restore_to_dir(src, name, work, upto=upto))
        finally:
            layout.delete(work, wait=True)
        st.note("restore", subvol=target, source=src, old_kept=kept)
        from .state import save_state

        save_state(layout, st)
        return {"subvol": target, "tree_sum": tree_sum(layout.state(target)),
                "old_kept": kept}


def _swap_in(layout: Layout, target: str, got: Path) -> bool:
    """A writable snapshot of ``got`` in place of ``state/TARGET`` (one exchange); the old
    one deleted, or kept when the running system uses it (returns True then)."""
    from ..update.partial import boot_id
    from .boot import booted_root

    fresh = layout.state_dir / f"{RESTORED}{target}"
    layout.delete(fresh)
    layout.snapshot(got, fresh, readonly=False)
    live = layout.state(target)
    if not os.path.lexists(live):
        layout.rename(fresh, live)
        layout.sync()
        return False
    in_use = booted_root(layout) is not None
    if in_use:  # before the swap: it names the subvolume that leaves, so a cut is safe
        write_atomic(_in_use_mark(layout, target),
                     f"{boot_id()} {layout.subvol_id(live)}\n".encode())
    layout.exchange(fresh, live)
    layout.sync()
    if not in_use:
        layout.delete(fresh)  # the old one, after the swap
    return in_use


def _in_use_mark(layout: Layout, target: str) -> Path:
    return layout.meta / f"restored-{target}.in-use"


def restored_in_use(layout: Layout, target: str) -> bool:
    """Whether ``state/.restored-TARGET`` is the subvolume a restore in this boot swapped
    out while the running system, booted from this device, used it (its mark names the
    boot and the subvolume); a mark that does not hold any more is removed."""
    from ..update.partial import boot_id
    from .boot import booted_root

    mark = _in_use_mark(layout, target)
    try:
        boot, sid = mark.read_text().split()
    except (OSError, ValueError):
        return False
    old = layout.state_dir / f"{RESTORED}{target}"
    if (boot == boot_id() and booted_root(layout) is not None
            and layout.is_subvolume(old) and str(layout.subvol_id(old)) == sid):
        return True
    mark.unlink(missing_ok=True)
    return False
