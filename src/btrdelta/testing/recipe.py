"""The shape of a send/receive scenario (:mod:`btrdelta.testing.scenarios` runs them), and
shell commands the recipes of several modules use."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXCHANGE", "PROP", "Scenario", "renameat2"]


def renameat2(flags: int) -> str:
    """A command renaming its arguments pairwise with renameat2(``flags``)."""
    return ("python3 -c 'import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "for a, b in zip(sys.argv[1::2], sys.argv[2::2]):\n"
            f"    if libc.renameat2(-100, a.encode(), -100, b.encode(), {flags}):\n"
            "        raise OSError(ctypes.get_errno(), a)'")


#: exchange names pairwise with renameat2(RENAME_EXCHANGE): ``$EXCHANGE a b c d``
EXCHANGE = renameat2(2)
#: set a file's btrfs.compression property (zlib, lzo, zstd; ``no``: none)
PROP = "btrfs property set"


@dataclass(frozen=True)
class Scenario:
    """One A -> B recipe."""

    name: str
    a: str
    b: str
    #: only meaningful on btrfs (uses subvolumes), not buildable in plain directories
    btrfs_only: bool = False
    #: xattrs past one 4 KiB block, which ext4 holds only with ``-O ea_inode`` (ENOSPC else)
    large_xattrs: bool = False
    #: run in snapshot A once B exists, the snapshot made writable for it; the descriptors
    #: it opens (``exec 71<path``) stay open until the filesystem is unmounted, so what it
    #: unlinks stays in the read-only snapshot as inodes without links (plain dirs: removed)
    a_held: str = ""
    #: the same for snapshot B
    b_held: str = ""
    #: run in the live subvolume after ``a``, before snapshot A is taken, and kept running
    #: until the filesystem is unmounted (upstream's btrfs/058: an O_TMPFILE open while the
    #: snapshot is taken is in it as an orphan inode). It may ``exec`` a program that
    #: prints ``ready`` once its files are open and exits at the end of its standard input.
    a_open: str = ""
    #: also take snapshot C (upstream's ``clones_snap``: the state of B) just before B; B is
    #: then also sent from A with C as a clone source (``send -p A -c C``), a third stream
    #: received after A and C (upstream's btrfs/117)
    clones: bool = False
    #: run in the filesystem's top directory once the snapshots exist (read-only), with
    #: ``$A`` and ``$B`` their paths: changes that keep every file's content but not where
    #: it lies, as upstream's btrfs/187 dedupes between two snapshots and balances while it
    #: sends them (run before the sends here). Not run in plain directories.
    after: str = ""
    #: the kernel's full stream of A leaves the root's mtime to the receiver: since Linux
    #: 6.3 send caches the UTIMES of up to 64 directories and sends the root's when it is
    #: pushed out, and the orphans the stream makes in the root after that change it again
    #: (more than 64 directories that get entries after the root's last one). ``btrfs
    #: receive`` and ours alike give the root the time of the receive; A's root mtime is
    #: then not compared with the kernel's tree (ours is still compared with the source)
    root_mtime_lost: bool = False
