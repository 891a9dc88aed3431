"""Subvolume identity: derived from the tree's content and metadata, the same in every mode."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from btrdelta.send import send_records
from btrdelta.stream.records import Snapshot, Subvol


def _uuid(tree: Path, parent: Path | None = None, **kw: object) -> tuple[object, object]:
    head = next(iter(send_records(tree, parent, **kw)))  # type: ignore[arg-type]
    if isinstance(head, Snapshot):
        return head.uuid, head.clone_uuid
    assert isinstance(head, Subvol)
    return head.uuid, None


def test_same_content_same_uuid_changed_content_other_uuid(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_bytes(b"x" * 10000)
    (a / "d").mkdir()
    os.chmod(a / "d", 0o755)  # (not the umask's: 0700 under 077, and the chmod below no change)
    os.symlink("f", a / "d" / "l")
    os.utime(a / "f", ns=(10**18, 10**18))
    subprocess.run(["cp", "-a", str(a), str(tmp_path / "b")], check=True)
    b = tmp_path / "b"
    ua = _uuid(a)[0]
    assert _uuid(b)[0] == ua  # a copy (other inodes, ctimes, atimes) is the same tree
    # a content change that keeps size and mtime (reproducible builds clamp mtimes) ...
    (b / "f").write_bytes(b"y" * 10000)
    os.utime(b / "f", ns=(10**18, 10**18))
    ub = _uuid(b)[0]
    assert ub != ua  # ... is a different tree
    # --quick (size+mtime trust for matching) names the same parent and child UUIDs
    assert _uuid(b, a) == (ub, ua)
    assert _uuid(b, a, quick=True) == (ub, ua)
    assert _uuid(b, a, workers=1) == (ub, ua)  # no child process, one thread
    # metadata counts too
    os.chmod(b / "d", 0o700)
    assert _uuid(b)[0] not in (ua, ub)
