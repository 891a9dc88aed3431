"""Committed fixture archives (``tests/data``) unpacked the same way on every Python 3.11.

``tarfile.extractall(filter=...)`` (PEP 706) came in 3.11.4: Debian 12's python3 is 3.11.2,
where extraction has no filter. There the ``"tar"`` filter's rules are applied here: a
leading ``/`` stripped, no member named outside the destination by ``..``, no set-id, sticky
or group/other write bits.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

__all__ = ["extract_tar"]


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` as ``extractall(dest, filter="tar")`` does.

    Raises:
        tarfile.TarError: a member is named outside ``dest`` (3.11.4's ``FilterError`` is
            one).
    """
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "tar_filter"):  # 3.11.4 and later
            tar.extractall(dest, filter="tar")
            return
        members = tar.getmembers()
        for member in members:
            member.name = member.name.lstrip("/")
            if ".." in PurePosixPath(member.name).parts:
                raise tarfile.TarError(f"{archive}: member {member.name!r} is outside {dest}")
            if not member.issym():
                member.mode &= ~0o7022
        tar.extractall(dest, members=members)
