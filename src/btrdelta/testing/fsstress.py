"""Upstream's random workload generator, fsstress (fstests' ``ltp/fsstress``), on a subvolume.

fsstress does seeded random operations in a directory: creat, write, direct and mapped and
io_uring writes, fallocate (preallocate, punch, zero, collapse, insert ranges), clone,
dedupe and copy ranges, link, rename (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``,
``RENAME_WHITEOUT``), mknod, symlink, xattrs, chown, truncate, mkdir and rmdir, subvolumes
and snapshots of them, ...; one process (``-p 1``) and a seed make it reproducible.
:func:`run_fsstress` runs it as upstream's btrfs/007 does: the workload's command run once
halfway (``-x``) takes snapshot A, so files made before A change after it; snapshot B
follows the last operation.

btrdelta ships no fsstress: :func:`find_fsstress` takes the program named by
``BTRDELTA_FSSTRESS``, else ``fsstress`` on ``PATH``, else
``/var/tmp/btrdelta-fsstress/fsstress`` (a build of fstests, whose ``ltp/fsstress`` is the
program), and says so in one line when there is none.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

__all__ = ["MIXES", "FsstressUnavailable", "find_fsstress", "quote", "run_fsstress"]

CACHE = Path("/var/tmp/btrdelta-fsstress/fsstress")


class FsstressUnavailable(RuntimeError):
    """No fsstress program here."""


def find_fsstress() -> Path:
    """The fsstress program to run (see the module's description)."""
    named = os.environ.get("BTRDELTA_FSSTRESS")
    if named:
        if not os.access(named, os.X_OK):
            raise FsstressUnavailable(f"BTRDELTA_FSSTRESS={named}: not an executable file")
        return Path(named)
    found = shutil.which("fsstress")
    if found:
        return Path(found)
    if os.access(CACHE, os.X_OK):
        return CACHE
    raise FsstressUnavailable(
        "no fsstress: set BTRDELTA_FSSTRESS to fstests' ltp/fsstress "
        f"(or put it on PATH or at {CACHE})")


#: operation mixes: fsstress's own frequencies, or only the operations named, each this
#: often (``-z -f NAME=FREQ``); and "writes", upstream btrfs/252's (``-w``: the operations
#: that write, without subvolumes)
MIXES: dict[str, dict[str, int]] = {
    "default": {},
    # the namespace: what an incremental stream's path computation meets (renames of all
    # kinds over a small tree, links, removals, subvolumes in the way)
    "names": {"creat": 6, "mkdir": 5, "rename": 8, "rnoreplace": 3, "rexchange": 6,
              "rwhiteout": 2, "link": 6, "unlink": 4, "rmdir": 4, "symlink": 3, "mknod": 2,
              "write": 3, "truncate": 1, "setfattr": 2, "removefattr": 1, "chown": 1,
              "clonerange": 1, "snapshot": 1, "subvol_create": 1, "subvol_delete": 1},
    # file data: extents shared, punched, shifted, preallocated, written every way
    "data": {"creat": 2, "write": 4, "writev": 2, "dwrite": 3, "mwrite": 2, "awrite": 1,
             "uring_write": 1, "truncate": 3, "punch": 3, "zero": 3, "collapse": 2,
             "insert": 2, "fallocate": 3, "resvsp": 1, "unresvsp": 1, "clonerange": 5,
             "copyrange": 3, "deduperange": 4, "splice": 1, "unshare": 1, "link": 1,
             "unlink": 1, "fsync": 1},
    "writes": {},
}


def run_fsstress(vol: Path, seed: int, ops: int, *, mix: str = "default", halfway: str = "",
                 times: int = 1, program: Path | None = None, log: Path | None = None) -> str:
    """Run ``ops`` operations of fsstress with ``seed`` in ``vol`` (one process), of the
    operation mix ``mix`` (:data:`MIXES`), the shell command ``halfway`` once in the middle
    of them (or ``times`` times, evenly spread); its output (with ``-v``: every operation
    and its result, one a line), also written to ``log``. Raises :class:`RuntimeError` when
    fsstress or the command fails."""
    cmd = [str(program or find_fsstress()), "-d", str(vol), "-s", str(seed), "-n", str(ops),
           "-p", "1", "-v"]
    if mix == "writes":
        cmd += ["-w", "-f", "subvol_create=0", "-f", "subvol_delete=0", "-f", "snapshot=0"]
    elif MIXES[mix]:
        cmd.append("-z")
        for name, freq in MIXES[mix].items():
            cmd += ["-f", f"{name}={freq}"]
    if halfway:
        cmd += ["-x", halfway, "-X", str(times)]  # (its failures: only said on stderr)
    proc = subprocess.run(cmd, capture_output=True, check=False)
    out = proc.stdout.decode("utf-8", "replace")
    if log is not None:
        log.write_text(out + proc.stderr.decode("utf-8", "replace"))
    if proc.returncode != 0 or b"execute command failed" in proc.stderr:
        raise RuntimeError(f"fsstress -s {seed} -n {ops} in {vol}: exit {proc.returncode}: "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-500:]}")
    return out


def quote(*words: str | os.PathLike[str]) -> str:
    """A shell command line of ``words``."""
    return " ".join(shlex.quote(os.fspath(w)) for w in words)
