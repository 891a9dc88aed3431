"""One progress display: a bar on a terminal, plain lines in a file, nothing with -q."""

from __future__ import annotations

import argparse
import io
import os

import pytest

from btrdelta.cli import progress
from btrdelta.cli.progress import Progress, add_progress_options, progress_wanted
from tests.conftest import read_pty


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _args(*words: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_progress_options(p, verbose=True)
    return p.parse_args(list(words))


def test_when_shown() -> None:
    tty, log = _Tty(), io.StringIO()
    assert progress_wanted(_args(), tty)
    assert not progress_wanted(_args(), log)
    assert progress_wanted(_args("--progress"), log)
    assert not progress_wanted(_args("-q"), tty)
    assert not progress_wanted(_args("-q", "--progress"), tty)


def test_terminal_gets_a_bar_with_percentage_and_eta() -> None:
    tty = _Tty()
    with Progress("receive", enabled=True, total=10 << 20, stream=tty) as p:
        for i in range(1, 11):
            p.update(i << 20, note=f"{i} files")
        p.message("At snapshot B")
    out = tty.getvalue()
    assert "\r" in out
    assert "100%" in out
    assert "10.0M" in out  # bytes in binary units
    assert "At snapshot B\n" in out


def test_a_file_gets_plain_lines_without_escapes() -> None:
    log = io.StringIO()
    p = Progress("clone", enabled=True, total=4 << 20, stream=log)
    p.update(0)  # the first line at once (no rate, no ETA yet)
    p.update(1 << 20)  # within 5 s of it: none
    p.message("note")
    p.close("done: 4 chunks")  # the last figures
    out = log.getvalue()
    assert "\r" not in out
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[:2] == ["clone: 0 B of 4.0 MiB, 0%", "note"]
    assert lines[2].startswith("clone: 1.0 MiB of 4.0 MiB, ")
    assert lines[2].endswith("/s, 25%, ETA 0s")
    assert lines[3:] == ["done: 4 chunks"]


def test_plain_lines_after_the_first_come_every_few_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    p = Progress("send", enabled=True, unit="files", stream=log)
    for done in range(1, 13):  # one a second for 12 s: at 1 s, 6 s and 11 s
        clock[0] += 1.0
        p.update(done)
    assert log.getvalue().splitlines() == ["send: 1 files", "send: 6 files", "send: 11 files"]


def test_disabled_prints_nothing() -> None:
    tty = _Tty()
    p = Progress("x", enabled=False, stream=tty)
    p.update(5)
    p.close("summary")
    assert tty.getvalue() == ""


def test_a_real_terminal(tmp_path: object) -> None:
    # a pseudo-terminal, as a user's shell gives: the bar is drawn in place
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as term:
            with Progress("send", enabled=progress_wanted(_args(), term), unit="files",
                          stream=term) as p:
                p.update(3)
            assert p._bar is None
        os.set_blocking(master, False)
        out = read_pty(master).decode()  # a pty hands out what was written in pieces
    finally:
        os.close(master)
        os.close(slave)
    assert "send" in out
    assert "3files" in out.replace(" ", "")


def test_more_than_announced_never_shows_past_100_percent() -> None:
    log = io.StringIO()
    p = Progress("update", enabled=True, total=100, stream=log)
    p.update(150)
    p.close()
    line = log.getvalue().splitlines()[-1]
    assert "150 B of 150 B" in line
    assert "100%" in line
    assert "ETA 0s" in line
