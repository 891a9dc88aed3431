"""Committed fixture archives (``tests/data``) unpacked the same way on every Python 3.11.

``tarfile.extractall(filter=...)`` (PEP 706) came in 3.11.4: Debian 12's python3 is 3.11.2,
where extraction has no filter. There the ``"tar"`` filter's rules are applied here: no
member named outside the destination, no set-id, sticky or group/other write bits.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

__all__ = ["extract_tar"]


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` as ``extractall(dest, filter="tar")`` does.

    Raises:
        ValueError: a member is named by an absolute path or one with ``..``.
    """
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "tar_filter"):  # 3.11.4 and later
            tar.extractall(dest, filter="tar")
            return
        members = tar.getmembers()
        for member in members:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts:
                raise ValueError(f"{archive}: member {member.name!r} is outside {dest}")
            if not member.issym():
                member.mode &= ~0o7022
        tar.extractall(dest, members=members)
