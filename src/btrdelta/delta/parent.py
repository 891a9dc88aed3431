"""Is ``--old`` the stream's parent? What ``delta make`` can tell before a device can.

A delta is only as good as the old tree it was made against: made against the wrong one,
it expands nowhere. Two checks, by what ``--old`` is:

* **the root of a btrfs subvolume**: its UUID and received UUID (``GET_SUBVOL_INFO``,
  :func:`btrdelta.fs.btrfs.subvol_info`) must contain the parent UUID of the stream's
  ``SNAPSHOT`` (the kernel sends the parent's received UUID when it has one, else its
  UUID); otherwise :class:`~btrdelta.errors.MissingBaseError` names both (exit code 6);
* **a plain directory** (no identity to compare): :class:`PlainDirHints` notes paths of the
  parent that the stream unlinks, removes or renames (they must exist there) and whether
  any written file found an old file to diff against; :meth:`PlainDirHints.warnings` says
  what looks wrong, for ``delta make`` to print.

Owns only these checks; reading the stream and diffing are :mod:`.make`'s.
"""

from __future__ import annotations

import os
from uuid import UUID

from ..errors import MissingBaseError
from ..fs.btrfs import SubvolInfo, is_btrfs, subvol_info
from ..fs.sandbox import list_dir

__all__ = ["PlainDirHints", "check_parent", "old_subvolume"]

#: inode number of a btrfs subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID)
_SUBVOL_ROOT_INO = 256


def old_subvolume(old_root: str | os.PathLike[str]) -> SubvolInfo | None:
    """The identity of ``old_root`` if it is the root of a btrfs subvolume, else ``None``
    (a plain directory, or a directory inside a subvolume)."""
    try:
        fd = os.open(old_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not is_btrfs(fd) or os.fstat(fd).st_ino != _SUBVOL_ROOT_INO:
            return None
        return subvol_info(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def check_parent(info: SubvolInfo, clone_uuid: UUID, old_root: str | os.PathLike[str]) -> None:
    """Refuse an ``--old`` subvolume that is not the parent (``clone_uuid``) of the stream.

    Raises:
        MissingBaseError: neither its UUID nor its received UUID is ``clone_uuid``.
    """
    if clone_uuid in (info.uuid, info.received_uuid):
        return
    received = f", received UUID {info.received_uuid}" if info.received_uuid else ""
    raise MissingBaseError(
        f"--old is subvolume UUID {info.uuid}{received}, but the stream's parent is "
        f"{clone_uuid}: give the stream's parent snapshot as --old",
        path=os.fsdecode(old_root),
    )


class PlainDirHints:
    """What a plain-directory ``--old`` looks like from the stream (bounded: at most
    ``limit`` parent paths are looked up, one listing per directory)."""

    def __init__(self, old_root: str | os.PathLike[str], limit: int = 256) -> None:
        self.root = old_root
        self.limit = limit
        self.checked = 0
        self.missing: list[bytes] = []
        self._listings: dict[bytes, frozenset[bytes] | None] = {}

    def parent_path(self, origin: bytes) -> None:
        """The stream removes or renames ``origin``, a path of its parent: it must be in
        ``--old``."""
        if self.checked >= self.limit:
            return
        self.checked += 1
        cut = origin.rfind(b"/")
        d, name = (origin[:cut], origin[cut + 1 :]) if cut >= 0 else (b"", origin)
        if d not in self._listings:
            found = list_dir(self.root, d)
            self._listings[d] = None if found is None else frozenset(found)
        listing = self._listings[d]
        if listing is None or name not in listing:
            self.missing.append(origin)

    def warnings(self, written: int, candidates: int) -> list[str]:
        """Lines to show: ``written`` files got data, ``candidates`` had an old file."""
        root = os.fsdecode(self.root)
        out = []
        if self.missing:
            first = self.missing[0].decode("utf-8", "backslashreplace")
            out.append(
                f"{len(self.missing)} of {self.checked} paths the stream removes or renames "
                f"from its parent are not in --old {root} (first: {first}): is it the "
                "stream's parent?"
            )
        if written and not candidates:
            out.append(
                f"none of the {written} files the stream writes has an old file in --old "
                f"{root} to diff against: is it the stream's parent?"
            )
        return out
