"""Regenerate tests/data/streams: small kernel-made streams committed for tests without root.

Run as root: ``.venv/bin/python tests/data/make_streams.py``. Each scenario's A (full) and
A->B (incremental) streams are written as v1 and as v2 --compressed-data from a btrfs mounted
with compress=zstd, next to the ``btrfs receive --dump`` output of each (TZ=UTC).
"""

import os
import subprocess
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs
from btrdelta.testing.scenarios import SCENARIOS, make_snapshots, send

# Streams over 200 KB are deleted after generation to keep the repository small.
KEEP = {"inversion-030", "dir-rotation-083", "name-rotation-links-144", "xattrs",
        "special-files", "odd-names-W8", "compressible-data-W6", "hole-punch-016",
        "reflink-deep-paths-108", "metadata-changes", "fileattr-chattr"}
OUT = Path(__file__).parent / "streams"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with loop_fs("btrfs", size="1G", options="compress=zstd") as mnt:
        for sc in SCENARIOS:
            if sc.name not in KEEP:
                continue
            pair = make_snapshots(mnt, sc)
            for tag, proto, comp in (("v1", 1, False), ("v2", 2, True)):
                for which, parent in (("A", None), ("B", pair.a)):
                    path = OUT / f"{sc.name}.{which}.{tag}.stream"
                    snap = pair.a if which == "A" else pair.b
                    send(snap, path, parent=parent, proto=proto, compressed=comp)
                    dump = subprocess.run(["btrfs", "receive", "--dump", "-f", str(path)],
                                          capture_output=True, check=True,
                                          env={**os.environ, "TZ": "UTC"}).stdout
                    path.with_suffix(".dump").write_bytes(dump)
                    if path.stat().st_size > 200_000:
                        path.unlink()
                        path.with_suffix(".dump").unlink()


if __name__ == "__main__":
    main()
