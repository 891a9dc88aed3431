"""Every command that reads a stream says what a wrong input is, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import committed_streams

STREAM = committed_streams()[0]
BTRDELTA = [sys.executable, "-m", "btrdelta"]


def _run(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*BTRDELTA, *map(str, args)], input=stdin, capture_output=True,
                          check=False)


def _one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def zst(tmp_path: Path) -> Path:
    out = tmp_path / "s.stream.zst"
    subprocess.run(["zstd", "-q", "-f", str(STREAM), "-o", str(out)], check=True)
    return out


@pytest.mark.parametrize("command", [
    ["receive", "-f", "{f}", "{dest}"], ["dump", "{f}"], ["verify", "{f}"], ["stat", "{f}"],
    ["delta", "make", "--old", "{dest}", "-f", "{f}", "-o", "{dest}/out"],
    ["delta", "expand", "--old", "{dest}", "-f", "{f}", "-o", "{dest}/out"],
])
def test_zstd_compressed_input_is_named(zst: Path, tmp_path: Path, command: list[str]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = _run(*(w.format(f=zst, dest=dest) for w in command))
    assert proc.returncode == 3
    err = _one_line(proc)
    assert "zstd-compressed data" in err
    assert "zstd -dc" in err
    assert list(dest.iterdir()) == []


def test_compressed_stdin_is_named(zst: Path, tmp_path: Path) -> None:
    proc = _run("receive", tmp_path, stdin=zst.read_bytes())
    assert proc.returncode == 3
    assert "zstd-compressed data" in _one_line(proc)


def test_chunk_archive_to_receive_points_to_image_clone(tmp_path: Path) -> None:
    archive = tmp_path / "img.bdar"
    image = tmp_path / "img"
    image.write_bytes(STREAM.read_bytes() * 4)
    subprocess.run([*BTRDELTA, "image", "compress", "-i", str(image), "-o", str(archive)],
                   check=True, capture_output=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = _run("receive", "-f", archive, dest)
    assert proc.returncode == 3
    assert "chunk archive" in (err := _one_line(proc))
    assert "image clone" in err


def test_delta_stream_given_to_dump_says_what_it_is(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    delta = tmp_path / "full.delta"
    subprocess.run([*BTRDELTA, "delta", "make", "-f", str(STREAM), "--old", str(old), "-o",
                    str(delta)], check=True)
    proc = _run("dump", delta)
    assert proc.returncode == 3
    assert "delta stream" in _one_line(proc)


def test_empty_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    proc = _run("verify", empty)
    assert proc.returncode == 3
    assert "empty input" in _one_line(proc)


def test_a_file_url_is_its_path_and_other_schemes_are_refused(tmp_path: Path) -> None:
    """Where a command takes a path or an http(s) URL, ``file:///p`` is read as ``/p``
    (it used to be taken as a relative path: ``device backup ... file:///x`` made
    ``./file:/x``), and ``ftp://...`` is refused in one line before anything is made."""
    image = tmp_path / "img"
    image.write_bytes(bytes(range(256)) * 4096)
    archive = tmp_path / "a b.bdar"
    assert _run("image", "compress", "-i", image, "-o", archive).returncode == 0
    by_path = _run("image", "info", "--json", archive)
    by_url = _run("image", "info", "--json", archive.as_uri())
    assert by_path.returncode == by_url.returncode == 0, by_url.stderr
    assert by_url.stdout == by_path.stdout
    for args in (["image", "info", "ftp://host/a.bdar"],
                 ["device", "backup", tmp_path / "fs.img", "home", "ftp://host/backups"],
                 ["device", "restore", "--to-dir", tmp_path, "home", "sftp://host/b"],
                 ["device", "backup", tmp_path / "fs.img", "home", "file://elsewhere/b"]):
        proc = subprocess.run([*BTRDELTA, *map(str, args)], capture_output=True, check=False,
                              cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        err = _one_line(proc)
        assert str(args[-1]) in err
        assert "not a path or an http(s):// URL" in err or "names another host" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b.bdar", "img"]
