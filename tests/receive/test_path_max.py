"""btrdelta receive of a stream whose paths are longer than PATH_MAX (4096 bytes): the
kernel's send refuses to write one (tests/send/test_path_max.py) and btrfs receive (progs
6.2) refuses to apply it ("mkdir: path invalid"), but a stream from elsewhere may hold one;
ours applies it below DEST (its confined ``openat`` walk takes any depth). Oracle:
``os.fwalk`` (directory descriptors) of what was received against what the records say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from btrdelta.stream.records import (
    End,
    Mkdir,
    Mkfile,
    Record,
    Rename,
    SetXattr,
    Symlink,
    Write,
)

from .helpers import stream_bytes, subvol

_LEVELS = 24


def _name(i: int) -> bytes:
    return b"d" * 240 + b"%02d" % i


def test_receive_of_paths_past_path_max(tmp_path: Path) -> None:
    deep = b"/".join(_name(i) for i in range(_LEVELS))
    records: list[Record] = [subvol(b"sv")]
    records += [Mkdir(path=b"/".join(_name(k) for k in range(i + 1)), ino=300 + i)
                for i in range(_LEVELS)]
    assert len(deep) > 4096 + 1700
    records += [
        Mkfile(path=deep + b"/o400", ino=400), Write(path=deep + b"/o400", offset=0,
                                                      data=b"deep data\n" * 1000),
        Rename(path=deep + b"/o400", path_to=deep + b"/file"),
        SetXattr(path=deep + b"/file", name=b"user.deep", data=b"value"),
        Symlink(path=deep + b"/link", ino=401, target=b"file"),
        Rename(path=_name(0), path_to=b"top"),  # the whole chain moved: paths change
        End(),
    ]
    stream = tmp_path / "s.stream"
    stream.write_bytes(stream_bytes(records))
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = subprocess.run([sys.executable, "-m", "btrdelta", "receive", "-f", str(stream),
                           str(dest)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-400:]
    got: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames, dfd in os.fwalk(dest / "sv"):
        rel = os.path.relpath(dirpath, dest / "sv")
        for name in dirnames + filenames:
            key = name if rel == "." else f"{rel}/{name}"
            if name == "file":
                with open(os.open(name, os.O_RDONLY, dir_fd=dfd), "rb") as f:
                    got[key] = ("f", f.read() + b"|" + os.getxattr(
                        f.fileno(), "user.deep"))
            elif name == "link":
                got[key] = ("l", os.readlink(name, dir_fd=dfd).encode())
            else:
                got[key] = ("d", b"")
    bottom = "/".join(["top", *(_name(i).decode() for i in range(1, _LEVELS))])
    want = {"/".join(bottom.split("/")[:i + 1]): ("d", b"") for i in range(_LEVELS)}
    want[f"{bottom}/file"] = ("f", b"deep data\n" * 1000 + b"|value")
    want[f"{bottom}/link"] = ("l", b"file")
    assert got == want
    summed = subprocess.run([sys.executable, "-m", "btrdelta", "tree-sum", str(dest / "sv")],
                            capture_output=True, text=True, check=False)
    assert summed.returncode == 0, summed.stderr[-400:]  # (and tree-sum sums it)
