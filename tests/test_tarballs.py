"""``btrdelta.testing.tarballs.extract_tar``: the ``"tar"`` filter's rules on every 3.11 (on
3.11.2, Debian 12's, applied by the helper; from 3.11.4 by ``tarfile``)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from btrdelta.testing.tarballs import extract_tar


def _tar(path: Path, members: list[tuple[str, int, bytes | None, str]]) -> None:
    """(name, mode, data or None for a symlink, link target)"""
    with tarfile.open(path, "w:gz") as tar:
        for name, mode, data, target in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_modes_are_cleared_and_links_kept(tmp_path: Path) -> None:
    _tar(tmp_path / "a.tar.gz", [("bin/tool", 0o4775, b"x" * 100, ""),
                                 ("etc/conf", 0o666, b"y", ""),
                                 ("usr/tool", 0o777, None, "../bin/tool")])
    dest = tmp_path / "out"
    extract_tar(tmp_path / "a.tar.gz", dest)
    assert stat.S_IMODE((dest / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "etc" / "conf").stat().st_mode) == 0o644
    assert os.readlink(dest / "usr" / "tool") == "../bin/tool"
    assert (dest / "usr" / "tool").read_bytes() == b"x" * 100


@pytest.mark.parametrize("name", ["../escaped", "a/../../escaped"])
def test_a_member_outside_is_refused(tmp_path: Path, name: str) -> None:
    _tar(tmp_path / "b.tar.gz", [("ok", 0o644, b"1", ""), (name, 0o644, b"2", "")])
    dest = tmp_path / "sub" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(tarfile.TarError, match="escaped"):
        extract_tar(tmp_path / "b.tar.gz", dest)
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "sub" / "escaped").exists()


def test_a_leading_slash_is_stripped(tmp_path: Path) -> None:
    _tar(tmp_path / "c.tar.gz", [("/btrdelta-test-not-at-the-root/f", 0o644, b"3", "")])
    extract_tar(tmp_path / "c.tar.gz", tmp_path / "out")
    assert (tmp_path / "out" / "btrdelta-test-not-at-the-root" / "f").read_bytes() == b"3"
    assert not Path("/btrdelta-test-not-at-the-root").exists()
