"""The subvolume registry of a non-btrfs destination: ``DEST/.btrdelta-subvols.json``.

On a filesystem without subvolumes a received subvolume is a directory of DEST, and this
small JSON file takes the place of the btrfs UUID tree: one entry per received subvolume
with its directory name (one component, inside DEST), the stream's UUID and ctransid (the
"received UUID" an incremental stream names as its parent or clone source), the local
parent it was based on and the directory's inode number.

Concurrent writers: every read-modify-write holds an exclusive ``flock`` on DEST itself (no
lock file), and the file is replaced atomically (:func:`~btrdelta.fs.atomic.write_atomic`:
unnamed temporary file, fsync, rename), so concurrent receives never lose each other's
entries and a crash leaves the old or the new registry.

A receive registers its subvolume *before* renaming it into place (the rename keeps the
inode), so a crash or a full disk at the last step leaves either nothing under the final
name or a registered subvolume. An entry is valid while its directory exists, and, when
the entry records an inode, while no other entry of the same name records the
directory's actual inode (the leftover of a receiver killed between registering and
renaming never takes over the directory another receive put there; a registry copied
with its DEST to another filesystem, where every inode differs, keeps working). Entries
whose directory has been gone for an hour are dropped when the registry is next written.

Layout (version 1; ``ino`` optional, absent in registries of older versions)::

    {"version": 1,
     "subvols": [{"name": "snapA", "uuid": "f580cab8-...", "ctransid": 7,
                  "parent_uuid": null, "received_at": 1700000000.0, "ino": 1311}]}
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from uuid import UUID

from ..errors import StreamFormatError
from ..fs.atomic import remove_stale_temps, write_atomic
from ..fs.sandbox import check_name

__all__ = ["REGISTRY_NAME", "Registry", "RegistryEntry"]

REGISTRY_NAME = ".btrdelta-subvols.json"
_MAX_SIZE = 64 << 20
#: an entry whose directory is missing for this long is dropped (a registration whose rename
#: is still to come is milliseconds old)
_STALE_AFTER = 3600.0
#: an entry whose directory is missing and that a newer one of its name followed by this
#: long is dropped (two receives of one name at once: one of them fails at its rename)
_REPLACED_AFTER = 60.0


@dataclass(frozen=True)
class RegistryEntry:
    """One received subvolume directory."""

    name: str
    uuid: UUID
    ctransid: int
    parent_uuid: UUID | None = None
    received_at: float = 0.0
    #: inode number of the directory (``None``: not recorded)
    ino: int | None = None


class Registry:
    """Read and update the registry of directory ``dest``."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.path = dest / REGISTRY_NAME

    def entries(self) -> list[RegistryEntry]:
        """All entries (empty when there is no registry yet).

        Raises:
            StreamFormatError: the registry file is not valid.
        """
        try:
            # never through a symlink, never blocked by a FIFO planted under its name
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StreamFormatError("invalid subvolume registry: a symlink",
                                    source=str(self.path)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # (before open(): a directory's fd)
            os.close(fd)
            raise StreamFormatError("invalid subvolume registry: not a regular file",
                                    source=str(self.path))
        with open(fd, "rb") as f:
            raw = f.read(_MAX_SIZE + 1)
        if len(raw) > _MAX_SIZE:
            raise StreamFormatError("invalid subvolume registry: too large",
                                    source=str(self.path))
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # (json's messages are one line)
            raise StreamFormatError(f"invalid subvolume registry: {exc}",
                                    source=str(self.path)) from exc
        items = doc.get("subvols") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise StreamFormatError('invalid subvolume registry: not an object with a '
                                    '"subvols" list', source=str(self.path))
        return [self._entry(i, item) for i, item in enumerate(items)]

    def _entry(self, i: int, item: object) -> RegistryEntry:
        """Entry ``i`` of the file, checked field by field."""
        field = ""
        try:
            if not isinstance(item, dict):
                raise TypeError("not an object")
            field = "name"
            name = item["name"]
            if not isinstance(name, str):
                raise TypeError("not a string")
            check_name(os.fsencode(name), "registry entry")
            field = "uuid"
            uuid = UUID(_text(item["uuid"]))
            field = "ctransid"
            ctransid = _integer(item["ctransid"])
            field = "parent_uuid"
            parent = item.get("parent_uuid")
            parent_uuid = UUID(_text(parent)) if parent else None
            field = "received_at"
            received = item.get("received_at", 0.0)
            if isinstance(received, bool) or not isinstance(received, int | float):
                raise TypeError("not a number")
            field = "ino"
            ino = item.get("ino")
            return RegistryEntry(name=name, uuid=uuid, ctransid=ctransid,
                                 parent_uuid=parent_uuid, received_at=float(received),
                                 ino=_integer(ino) if ino is not None else None)
        except KeyError:
            raise StreamFormatError(f"invalid subvolume registry: entry {i}: no {field!r}",
                                    source=str(self.path)) from None
        except (ValueError, TypeError, OverflowError) as exc:
            where = f"entry {i}, {field}" if field else f"entry {i}"
            raise StreamFormatError(f"invalid subvolume registry: {where}: {exc}",
                source=str(self.path)) from exc

    def find(self, wanted: UUID) -> Path | None:
        """Directory of the newest valid subvolume received with UUID ``wanted``."""
        entries = self.entries()
        for entry in reversed(entries):
            if entry.uuid == wanted and self._valid(entry, entries):
                return self.dest / entry.name
        return None

    def made(self, name: str) -> bool:
        """Whether directory ``DEST/name`` is one a receive here made: an entry of its name
        owns its inode (not a directory someone put there under that name); False where
        the registry cannot be read."""
        ino = _ino(self.dest / name)
        try:
            return ino is not None and any(e.name == name and e.ino == ino
                                           for e in self.entries())
        except (OSError, StreamFormatError):
            return False

    def _valid(self, entry: RegistryEntry, entries: list[RegistryEntry]) -> bool:
        ino = _ino(self.dest / entry.name)
        return ino is not None and _owns(entry, ino, entries)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the registry's exclusive lock (``flock`` on DEST) for a read-modify-write."""
        fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def add(self, entry: RegistryEntry) -> None:
        """Add an entry (its inode taken from its directory if it has none yet), replacing
        those of the same name and inode (or of the same name, without inode)."""
        if entry.ino is None:
            entry = replace(entry, ino=_ino(self.dest / entry.name))
        if not entry.received_at:
            entry = replace(entry, received_at=time.time())
        with self._locked():
            kept = [e for e in self.entries()
                    if e.name != entry.name or e.ino not in (entry.ino, None)]
            self._write([*kept, entry])

    def remove(self, name: str, uuid: UUID) -> None:
        """Drop the entries of ``name`` received as ``uuid`` (an undone registration)."""
        with self._locked():
            entries = self.entries()
            kept = [e for e in entries if e.name != name or e.uuid != uuid]
            if len(kept) != len(entries):
                self._write(kept)

    def _write(self, entries: list[RegistryEntry]) -> None:
        now = time.time()
        entries = _without_superseded(self.dest, entries, now)
        doc = {
            "version": 1,
            "subvols": [
                {
                    "name": e.name,
                    "uuid": str(e.uuid),
                    "ctransid": e.ctransid,
                    "parent_uuid": str(e.parent_uuid) if e.parent_uuid else None,
                    "received_at": e.received_at,
                    **({"ino": e.ino} if e.ino is not None else {}),
                }
                for e in entries
                if now - e.received_at < _STALE_AFTER or self._valid(e, entries)
            ],
        }
        write_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode())
        remove_stale_temps(self.path)  # (a writer killed between its link and its rename)


def _without_superseded(dest: Path, entries: list[RegistryEntry],
                        now: float) -> list[RegistryEntry]:
    """``entries`` without those a newer entry of the same name replaced: the name now holds
    another inode, which the newer entry owns; or the directory is gone and the newer entry
    came more than :data:`_REPLACED_AFTER` after it (a version deleted with ``rm -rf`` and
    received again: each such entry was read by every later ``find`` and ``add``, 276 in a
    benchmark's DEST, ``find`` 1.1 ms instead of 0.14). A missing directory with no newer
    entry of its name stays for :data:`_STALE_AFTER` (its rename may be still to come), as
    does every entry of a copied DEST (no entry owns the new inodes)."""
    current: dict[str, int | None] = {}
    owner: dict[str, float] = {}
    newest: dict[str, float] = {}
    for e in entries:
        if e.name not in current:
            current[e.name] = _ino(dest / e.name)
        newest[e.name] = max(newest.get(e.name, 0.0), e.received_at)
        if e.ino is not None and e.ino == current[e.name]:
            owner[e.name] = max(owner.get(e.name, 0.0), e.received_at)

    def superseded(e: RegistryEntry) -> bool:
        ino = current[e.name]
        if e.ino is None or e.ino == ino:
            return False
        if ino is not None:
            return owner.get(e.name, 0.0) > e.received_at
        return newest[e.name] > e.received_at + _REPLACED_AFTER

    return [e for e in entries if not superseded(e)]


def _ino(path: Path) -> int | None:
    """Inode number of directory ``path`` (not a symlink), or ``None``."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISDIR(st.st_mode) else None


def _owns(entry: RegistryEntry, ino: int, entries: list[RegistryEntry]) -> bool:
    """Whether ``entry`` stands for its directory, whose inode is ``ino``."""
    if entry.ino is None or entry.ino == ino:
        return True
    return not any(e.name == entry.name and e.ino == ino for e in entries)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{value} is out of range")
    return value
