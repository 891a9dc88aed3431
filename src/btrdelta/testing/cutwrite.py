"""Files written through :mod:`btrdelta.fs.atomic`, then a power cut at once (``make
vmtest``; in the VM of :mod:`btrdelta.testing.vm`, as ``btrdelta.module=``).

``python -m btrdelta.testing.cutwrite write``: mounts ``/dev/vda`` (a btrfs), writes
``meta/state.json`` and ``meta/kept.json`` (``write_atomic``) and ``meta/created``
(``create_file``), ``sync``; then replaces ``state.json``, writes ``fresh.json`` and creates
``created-2`` the same ways and cuts the power with ``sysrq b`` (no sync, no unmount) as
soon as the calls returned. ``read``: mounts it again (the kernel replays its log) and
prints ``READ NAME SIZE CONTENT`` for each file. Every file must have the content of its
last write: each call returned after its ``fsync``\\ s.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..fs.atomic import create_file, fsync_dir, write_atomic

#: what each file holds once the writes returned
EXPECTED = {"state.json": b"new state\n", "kept.json": b"kept\n", "created": b"created\n",
            "fresh.json": b"fresh\n", "created-2": b"created 2\n"}


def main(argv: list[str]) -> int:
    top = "/tmp/top"
    os.makedirs(top, exist_ok=True)
    subprocess.run(["mount", "-t", "btrfs", "/dev/vda", top], check=True)
    meta = os.path.join(top, "meta")
    if argv[:1] == ["read"]:
        for name in sorted(os.listdir(meta)):
            with open(os.path.join(meta, name), "rb") as f:
                print("READ", name, f.read().hex(), flush=True)
        return 0
    os.makedirs(meta, exist_ok=True)
    fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY)
    write_atomic(os.path.join(meta, "state.json"), b"old state\n")
    write_atomic(os.path.join(meta, "kept.json"), EXPECTED["kept.json"])
    create_file(fd, "created", EXPECTED["created"], mode=0o644)
    fsync_dir(fd)
    os.sync()
    write_atomic(os.path.join(meta, "state.json"), EXPECTED["state.json"])
    write_atomic(os.path.join(meta, "fresh.json"), EXPECTED["fresh.json"])
    create_file(fd, "created-2", EXPECTED["created-2"], mode=0o644)
    fsync_dir(fd)
    print("WRITTEN", flush=True)
    with open("/proc/sysrq-trigger", "w") as f:  # the power cut
        f.write("b")
    return 1  # (not reached)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
