"""Regenerate tests/data/deltas: delta streams of format 4, frozen (the compatibility fixtures).

Run as root: ``.venv/bin/python tests/data/make_deltas.py``. It builds a small release (text
modules, a binary, a data file, a versioned directory) in a subvolume on a loop-mounted btrfs
(compress=zstd), snapshots it (A), rebuilds it as fresh files (new inodes) with some files
unchanged, some edited a little, one half rewritten (a patch above 64 KiB: PATCH + PDATA
outside the carrier), some removed, one added and the versioned directory renamed, and
snapshots it again (B). The kernel writes the A->B streams (v1, and v2 --compressed-data);
today's ``delta make`` turns them into the committed deltas. The kernel streams themselves
are not committed: MANIFEST.json keeps their size, command count and SHA-256, which is what
the expansion must reproduce. The old tree goes in ``release.A.tar.gz``.

Format 4 is frozen: do not regenerate these files to make a test pass. A new format gets
new fixtures next to these ones (see docs/formats/delta-stream.md, "Versions").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

from btrdelta.delta import MakeOptions, make_delta
from btrdelta.stream import StreamReader
from btrdelta.testing.loopfs import loop_fs, run
from btrdelta.testing.scenarios import send

OUT = Path(__file__).parent / "deltas"
_WORDS = [b"import", b"def", b"return", b"self", b"value", b"None", b"class", b"for",
          b"in", b"if", b"else", b"path", b"data", b"stream", b"\n", b"    ", b"(", b")"]


def _text(rnd: random.Random, n: int) -> bytes:
    return b" ".join(rnd.choice(_WORDS) for _ in range(n // 3))[:n]


def _edit(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(3):
        i = rnd.randrange(len(buf))
        buf[i : i + 4] = rnd.randbytes(4)
    i = rnd.randrange(len(buf))
    buf[i:i] = b"# rebuilt\n"
    return bytes(buf)


def build_a(root: Path) -> None:
    rnd = random.Random(4)
    for d in ("lib", "bin", "share", "old", "pkg-1.0.dist-info"):
        (root / d).mkdir(parents=True)
    for i in range(24):
        (root / "lib" / f"mod{i:02d}.py").write_bytes(_text(rnd, rnd.randrange(2000, 9000)))
    (root / "bin" / "tool").write_bytes(bytes(rnd.randrange(16) * 17 for _ in range(48_000)))
    (root / "share" / "big.dat").write_bytes(_text(rnd, 150_000))
    for i in range(6):
        (root / "old" / f"gone{i}.txt").write_bytes(_text(rnd, 300))
    (root / "pkg-1.0.dist-info" / "RECORD").write_bytes(
        b"".join(b"lib/mod%02d.py,sha256=%064x,%d\n" % (i, i * 7919, i) for i in range(24)))
    os.symlink("bin/tool", root / "tool")


def rebuild_b(root: Path) -> None:
    """Every file rewritten as a fresh copy (new inodes), as a rebuilt image is."""
    rnd = random.Random(5)
    fresh = root.parent / (root.name + ".new")
    shutil.copytree(root, fresh, symlinks=True)
    for path in sorted(p for p in fresh.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        rel = path.relative_to(fresh).as_posix()
        if rel == "share/big.dat":
            data = data[:75_000] + rnd.randbytes(70_000) + data[145_000:]
        elif rel.startswith(("bin/", "pkg-")) or rel.endswith(("3.py", "7.py", "1.py")):
            data = _edit(data, rnd)
        path.unlink()
        path.write_bytes(data)
    shutil.rmtree(fresh / "old")
    (fresh / "lib" / "new.py").write_bytes(_text(rnd, 4000))
    (fresh / "pkg-1.0.dist-info").rename(fresh / "pkg-1.1.dist-info")
    (fresh / "lib" / "mod05.py").chmod(0o600)
    shutil.rmtree(root)
    fresh.rename(root)


def _digest(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    commands = sum(1 for _ in StreamReader(io.BytesIO(data)))
    return {"size": len(data), "commands": commands, "sha256": hashlib.sha256(data).hexdigest()}


def _tar(src: Path, out: Path) -> None:
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 1_700_000_000
        return info

    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname=path.relative_to(src).as_posix(), recursive=False,
                    filter=clean)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    manifest: dict[str, object] = {"format": 4, "old": "release.A.tar.gz", "made_by": rev,
                                   "deltas": []}
    with loop_fs("btrfs", size="1G", options="compress=zstd") as mnt:
        vol = mnt / "vol"
        run("btrfs", "-q", "subvolume", "create", vol)
        build_a(vol / "usr")
        run("sync")
        a, b = mnt / "A", mnt / "B"
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, a)
        rebuild_b(vol / "usr")
        run("sync")
        run("btrfs", "-q", "subvolume", "snapshot", "-r", vol, b)
        _tar(a, OUT / "release.A.tar.gz")
        work = mnt / "streams"
        work.mkdir()
        variants = [("release.v1", 1, False, 19), ("release.v2c", 2, True, 19),
                    ("release.v1.level0", 1, False, 0)]
        for name, proto, compressed, level in variants:
            stream = send(b, work / f"{name}.stream", parent=a, proto=proto,
                          compressed=compressed)
            out: list[bytes] = []
            with open(stream, "rb") as f:
                stats = make_delta(f, a, out.append, MakeOptions(level=level, jobs=1))
            (OUT / f"{name}.delta").write_bytes(b"".join(bytes(p) for p in out))
            manifest["deltas"].append({  # type: ignore[attr-defined]
                "file": f"{name}.delta", "stream_proto": proto, "compressed_data": compressed,
                "level": level, "expanded": _digest(stream),
                "patched_files": stats.patched_files,
                "files_by_codec": dict(sorted(stats.files_by_codec.items())),
            })
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
