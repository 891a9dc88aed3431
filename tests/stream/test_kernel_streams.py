"""Every kernel-made stream: our dump == btrfs receive --dump, write(read(S)) == S, splits."""

from __future__ import annotations

import io
import random
import subprocess
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.cli._input import installed_progs
from btrdelta.stream import EOF, NEED_DATA, StreamParser, StreamReader, StreamWriter
from btrdelta.stream.records import End
from tests.conftest import (
    DUMP_FORMATS,
    KernelStream,
    committed_dump,
    committed_streams,
    progs_dump,
)

# every test runs with the C accelerator and with pure Python (tests/stream/conftest.py)
pytestmark = [pytest.mark.btrfs, pytest.mark.usefixtures("backend")]


def _roundtrip(data: bytes) -> bytes:
    out = io.BytesIO()
    writer = StreamWriter(out.write)
    for ev in StreamReader(io.BytesIO(data)).events():
        writer.write_event(ev)
    return out.getvalue()


def _our_dump(path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes]:
    code = main(["dump", "-f", str(path)])
    return code, capfdbinary.readouterr().out


def test_kernel_streams_cover_the_protocol(kernel_streams: list[KernelStream]) -> None:
    seen: set[str] = set()
    for ks in kernel_streams:
        for rec in StreamReader(io.BytesIO(ks.path.read_bytes())):
            seen.add(rec.cmd.name)
    # every command the kernel can make here (ENABLE_VERITY needs a debug kernel's v3)
    expected = {"SUBVOL", "SNAPSHOT", "MKFILE", "MKDIR", "MKNOD", "MKFIFO", "MKSOCK",
                "SYMLINK", "RENAME", "LINK", "UNLINK", "RMDIR", "SET_XATTR", "REMOVE_XATTR",
                "WRITE", "CLONE", "TRUNCATE", "CHMOD", "CHOWN", "UTIMES", "END",
                "UPDATE_EXTENT", "FALLOCATE", "FILEATTR", "ENCODED_WRITE"}
    assert expected <= seen, expected - seen
    assert len({ks.name.split(".")[0] for ks in kernel_streams}) >= 15


def test_dump_matches_btrfs_progs(
    kernel_streams: list[KernelStream], capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    mismatches = []
    for ks in kernel_streams:
        ref = progs_dump(ks.path)
        code, ours = _our_dump(ks.path, capfdbinary)
        assert ref.returncode == 0, ref.stderr
        if code != 0 or ours != ref.stdout:
            mismatches.append(ks.name)
    assert not mismatches


def test_write_read_is_identity(kernel_streams: list[KernelStream]) -> None:
    for ks in kernel_streams:
        data = ks.path.read_bytes()
        assert _roundtrip(data) == data, ks.name


def test_concatenated_streams_are_a_sequence(kernel_streams: list[KernelStream]) -> None:
    by_name = {ks.name: ks for ks in kernel_streams}
    multi = StreamReader(io.BytesIO(by_name["multi"].path.read_bytes()))
    headers = [ev for ev in multi.events() if type(ev).__name__ == "StreamHeader"]
    assert len(headers) == 2
    one = StreamReader(io.BytesIO(by_name["multi-e"].path.read_bytes()))
    recs = list(one.events())
    assert sum(type(r).__name__ == "StreamHeader" for r in recs) == 1
    assert sum(type(r).__name__ == "Subvol" for r in recs) == 2


def test_any_split_gives_the_same_records(kernel_streams: list[KernelStream]) -> None:
    rng = random.Random(7)
    for ks in kernel_streams[::3]:
        data = ks.path.read_bytes()
        whole = list(StreamReader(io.BytesIO(data)).events())
        parser = StreamParser()
        got = []
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 7, 10, 17, 4096, 65536, 200_000))
            parser.feed(data[pos : pos + step])
            pos += step
            got.extend(parser)
        parser.feed(b"")
        while (ev := parser.next_event()) not in (NEED_DATA, EOF):
            got.append(ev)
        assert got == whole, ks.name
        assert type(got[-1]) is End


def test_verify_cli_accepts_every_kernel_stream(kernel_streams: list[KernelStream]) -> None:
    for ks in kernel_streams:
        assert main(["verify", "-q", "-f", str(ks.path)]) == 0


@pytest.mark.parametrize("progs", DUMP_FORMATS, ids=lambda v: ".".join(map(str, v)))
@pytest.mark.parametrize("path", committed_streams(), ids=lambda p: p.name)
def test_committed_streams_still_match_their_dump(
    path: Path, progs: tuple[int, ...], capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # committed kernel streams with the dump each btrfs-progs printed (TZ=UTC): checks
    # the codec without root, and both formats against the text the tools printed
    data = path.read_bytes()
    assert _roundtrip(data) == data
    code = main(["dump", "--progs-version", ".".join(map(str, progs)), "-f", str(path)])
    assert code == 0
    assert capfdbinary.readouterr().out == committed_dump(path, progs)


def test_progs_agrees_with_committed_dumps() -> None:
    """The installed btrfs-progs prints the committed text of its format (and `dump`
    without --progs-version follows it: test_dump_matches_btrfs_progs)."""
    version = installed_progs()
    if version is None:
        pytest.skip("btrfs-progs not installed")
    paths = committed_streams()
    newer = [p for p in paths if p.with_suffix(".dump-6.14").exists()]
    for path in [*paths[:4], *newer[:4]]:
        assert progs_dump(path).stdout == committed_dump(path, version), path.name


def test_dump_json_lines(kernel_streams: list[KernelStream],
                         capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    import base64
    import json
    ks = next(k for k in kernel_streams if k.name == "odd-names-W8.zstd.v2.A")
    assert main(["dump", "--json", "-f", str(ks.path)]) == 0
    lines = [json.loads(line) for line in capfdbinary.readouterr().out.splitlines()]
    assert lines[0] == {"stream": 2, "offset": 0}
    cmds = [x["cmd"] for x in lines[1:]]
    assert cmds[0] == "subvol"
    assert cmds[-1] == "end"
    assert [x["index"] for x in lines[1:]] == list(range(len(cmds)))
    # a non-UTF-8 name comes as base64, a UTF-8 one as text
    b64 = {base64.b64decode(x["path_to_b64"]) for x in lines[1:] if "path_to_b64" in x}
    assert b"bin\xff\x01" in b64
    assert any(x.get("path_to") == "é-utf8" for x in lines[1:])


def test_newlines_cannot_forge_a_json_line(kernel_streams: list[KernelStream],
                                           capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    # btrfs-progs misc-tests/054: names, targets, xattr names and values and clone paths
    # holding a newline then "failed". The text dump is btrfs-progs 6.2's, which escapes
    # names and targets but neither xattrs nor clone paths (>= 6.10 does: commit 31286d3b);
    # every line of --json is one whole record
    import json
    for tag in ("A", "B"):
        ks = next(k for k in kernel_streams if k.name == f"newlines-in-dump-misc054.zstd.v2.{tag}")
        assert main(["dump", "--json", "-f", str(ks.path)]) == 0
        out = capfdbinary.readouterr().out
        lines = [json.loads(line) for line in out.splitlines()]
        assert all("cmd" in x for x in lines[1:])
        assert not any(line.startswith(b"failed") for line in out.splitlines())
        assert any("\nfailed" in str(x.get("name", "")) for x in lines[1:])


def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    # a stream whose dump is far larger than a pipe buffer, so `head` closes it mid-way
    import sys
    import uuid

    from btrdelta.stream.records import Mkfile, Subvol
    big = tmp_path / "big.stream"
    with big.open("wb") as f:
        w = StreamWriter(f.write)
        w.write(Subvol(b"s", uuid.UUID(int=1), 1))
        for i in range(30_000):
            w.write(Mkfile(b"file-%d" % i, 257 + i))
        w.write(End())
    proc = subprocess.run(
        f"{sys.executable} -m btrdelta dump -f {big} | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True, capture_output=True, check=False, executable="/bin/bash",
    )
    assert proc.stderr == b""
    assert len(proc.stdout.splitlines()) == 1
    assert proc.returncode in (0, 141)  # quiet: no traceback, SIGPIPE-style status


def test_progs_version_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    path = committed_streams()[0]
    with pytest.raises(SystemExit) as exc:
        main(["dump", "--progs-version", "latest", "-f", str(path)])
    assert exc.value.code == 2
    assert "not a btrfs-progs version: 'latest'" in capsys.readouterr().err
