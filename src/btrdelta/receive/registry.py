"""The subvolume registry of a non-btrfs destination: ``DEST/.btrdelta-subvols.json``.

On a filesystem without subvolumes a received subvolume is a directory of DEST, and this
small JSON file takes the place of the btrfs UUID tree: one entry per received subvolume
with its directory name (one component, inside DEST), the stream's UUID and ctransid (the
"received UUID" an incremental stream names as its parent or clone source) and the local
parent it was based on. It is rewritten atomically (temporary file, fsync, rename), so a
crash leaves either the old or the new registry. Entries whose directory has gone are
ignored on lookup.

Layout (version 1)::

    {"version": 1,
     "subvols": [{"name": "snapA", "uuid": "f580cab8-...", "ctransid": 7,
                  "parent_uuid": null, "received_at": 1700000000.0}]}
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from ..errors import StreamFormatError
from ..fs.sandbox import check_name

__all__ = ["REGISTRY_NAME", "Registry", "RegistryEntry"]

REGISTRY_NAME = ".btrdelta-subvols.json"
_MAX_SIZE = 64 << 20


@dataclass(frozen=True)
class RegistryEntry:
    """One received subvolume directory."""

    name: str
    uuid: UUID
    ctransid: int
    parent_uuid: UUID | None = None
    received_at: float = 0.0


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
            with open(self.path, "rb") as f:
                raw = f.read(_MAX_SIZE + 1)
        except FileNotFoundError:
            return []
        try:
            if len(raw) > _MAX_SIZE:
                raise ValueError("too large")
            doc = json.loads(raw)
            out = []
            for item in doc["subvols"]:
                name = str(item["name"])
                check_name(os.fsencode(name), "registry entry")
                parent = item.get("parent_uuid")
                out.append(
                    RegistryEntry(
                        name=name,
                        uuid=UUID(item["uuid"]),
                        ctransid=int(item["ctransid"]),
                        parent_uuid=UUID(parent) if parent else None,
                        received_at=float(item.get("received_at", 0.0)),
                    )
                )
            return out
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamFormatError(f"invalid subvolume registry: {exc}",
                                    source=str(self.path)) from exc

    def find(self, wanted: UUID) -> Path | None:
        """Directory of the newest existing subvolume received with UUID ``wanted``."""
        for entry in reversed(self.entries()):
            if entry.uuid == wanted:
                p = self.dest / entry.name
                if p.is_dir() and not p.is_symlink():
                    return p
        return None

    def add(self, entry: RegistryEntry) -> None:
        """Add (or replace, by name) an entry and rewrite the file atomically."""
        entries = [e for e in self.entries() if e.name != entry.name]
        entries.append(entry)
        doc = {
            "version": 1,
            "subvols": [
                {
                    "name": e.name,
                    "uuid": str(e.uuid),
                    "ctransid": e.ctransid,
                    "parent_uuid": str(e.parent_uuid) if e.parent_uuid else None,
                    "received_at": e.received_at or time.time(),
                }
                for e in entries
                if (self.dest / e.name).is_dir() or e.name == entry.name
            ],
        }
        tmp = self.path.with_name(f"{REGISTRY_NAME}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
