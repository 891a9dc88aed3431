"""Real ext4 test images: two versions of a real tree from this machine, made by mkfs.ext4 -d."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from btrdelta.chunk.chunker import ChunkerParams
from btrdelta.chunk.compress import compress_image

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PARTS = ("email", "json", "asyncio", "unittest", "xml", "http", "concurrent", "logging",
         "lib-dynload")
PARAMS = ChunkerParams.from_avg(16 << 10)


@dataclass(frozen=True)
class ImagePair:
    tree1: Path
    tree2: Path
    img1: Path
    img2: Path
    arc1: Path
    arc2: Path


def make_ext4(tree: Path, image: Path, size: str | None = None) -> None:
    """mkfs.ext4 -d, made reproducible (fixed UUID, hash seed, time). The default size
    leaves at least half the image free whatever the interpreter's stdlib weighs (Debian's
    lib-dynload 5 MB; pyenv's unstripped 3.11 15 MB, 3.12 19 MB, 3.13 21 MB: in 24 MiB
    that left too little free space for tests that ask for a quarter of zero blocks)."""
    if size is None:
        data = sum(os.lstat(os.path.join(top, f)).st_size
                   for top, _dirs, files in os.walk(tree) for f in files)
        size = f"{max(24, 2 * (data >> 20) + 8)}M"
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    uuid = "6a1c0f5e-1d2b-4c3d-8e4f-5a6b7c8d9e0f"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-U", uuid, "-E", f"hash_seed={uuid},root_owner=0:0",
         "-d", str(tree), str(image), size],
        check=True, env=env, capture_output=True,
    )


def make_trees(base: Path) -> tuple[Path, Path]:
    """v1: a copy of part of the stdlib; v2: some files changed, added, removed."""
    tree1, tree2 = base / "tree1", base / "tree2"
    for part in PARTS:
        src = STDLIB / part
        if src.exists():
            shutil.copytree(src, tree1 / part, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tree1, tree2, symlinks=True)
    with open(tree2 / "json" / "decoder.py", "a") as f:
        f.write("\n# v2: patched decoder\n")
    (tree2 / "email" / "NEWS.txt").write_text("v2 adds a file\n" * 300)
    shutil.rmtree(tree2 / "xml" / "dom")
    shutil.copy(STDLIB / "tarfile.py", tree2 / "http" / "tarfile.py")
    data = bytearray((tree2 / "asyncio" / "base_events.py").read_bytes())
    data[1000:1000] = b"# inserted near the front\n"
    (tree2 / "asyncio" / "base_events.py").write_bytes(bytes(data))
    return tree1, tree2


def build_pair(base: Path, *, params: ChunkerParams = PARAMS) -> ImagePair:
    """Trees, ext4 images and chunk archives for v1 and v2."""
    base.mkdir(parents=True, exist_ok=True)
    tree1, tree2 = make_trees(base)
    img1, img2 = base / "v1.ext4", base / "v2.ext4"
    make_ext4(tree1, img1)
    make_ext4(tree2, img2)
    arc1, arc2 = base / "v1.bdar", base / "v2.bdar"
    for img, arc in ((img1, arc1), (img2, arc2)):
        with open(arc, "wb") as f:
            compress_image(img, f, params=params)
    return ImagePair(tree1, tree2, img1, img2, arc1, arc2)


def trees_equal(a: Path, b: Path) -> str:
    """``diff -r`` output between two trees ('' when equal); lost+found is ignored."""
    proc = subprocess.run(["diff", "-r", "--no-dereference", "-x", "lost+found", str(a), str(b)],
                          capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr
