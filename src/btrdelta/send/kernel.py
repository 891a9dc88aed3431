"""Handing the job to the kernel: ``btrfs send`` for read-only btrfs snapshots.

When both trees are read-only subvolumes on btrfs, the kernel knows exactly which extents
changed and ``btrfs send`` is the fastest sender. :func:`kernel_send` runs it and copies its
output to a ``write`` callable.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import BtrdeltaError

__all__ = ["is_readonly_snapshot", "kernel_send"]

_BTRFS_SUPER_MAGIC = 0x9123683E
_FIRST_FREE_OBJECTID = 256


def is_readonly_snapshot(path: str | bytes | os.PathLike[str]) -> bool:
    """True if ``path`` is the root of a read-only btrfs subvolume."""
    p = os.fsencode(path)
    try:
        st = os.stat(p)
    except OSError:
        return False
    if st.st_ino != _FIRST_FREE_OBJECTID:
        return False
    proc = subprocess.run(
        ["btrfs", "property", "get", "-ts", p, "ro"], capture_output=True, check=False
    )
    return proc.returncode == 0 and proc.stdout.strip() == b"ro=true"


def kernel_send(
    write: Callable[[Any], object],
    new_dir: str | bytes | os.PathLike[str],
    parent_dir: str | bytes | os.PathLike[str] | None = None,
    *,
    version: int = 1,
    compressed: bool = False,
    clone_sources: Sequence[str | bytes | os.PathLike[str]] = (),
    no_data: bool = False,
) -> int:
    """Run ``btrfs send`` and pass its stream to ``write``; returns the bytes written.

    ``clone_sources`` (``-c``) and ``no_data`` (``--no-data``) are passed through; so is
    ``version`` (``--proto``; 0: the highest the kernel supports).

    Raises:
        BtrdeltaError: a tree is not a read-only btrfs snapshot, or ``btrfs send`` failed.
    """
    for what in (new_dir, parent_dir, *clone_sources):
        if what is not None and not is_readonly_snapshot(what):
            raise BtrdeltaError(
                "--kernel needs read-only btrfs snapshots", path=os.fsencode(what)
            )
    cmd: list[bytes | str] = ["btrfs", "-q", "send", "--proto", str(version)]
    if compressed:
        cmd.append("--compressed-data")
    if no_data:
        cmd.append("--no-data")
    for src in clone_sources:
        cmd += ["-c", os.fsencode(src)]
    if parent_dir is not None:
        cmd += ["-p", os.fsencode(parent_dir)]
    cmd.append(os.fsencode(new_dir))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    total = 0
    try:
        while True:
            chunk = proc.stdout.read(1 << 20)
            if not chunk:
                break
            write(chunk)
            total += len(chunk)
    finally:
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        rc = proc.wait()
    if rc != 0:
        msg = err.decode("utf-8", "replace").strip().splitlines()
        raise BtrdeltaError(f"btrfs send failed ({rc}): {msg[-1] if msg else ''}")
    return total
