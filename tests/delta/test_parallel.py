"""``delta make`` in parallel (diff workers, the carrier on its own thread) against serial:
the same bytes, errors of the output thread reach the caller, memory of diffs bounded."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from btrdelta.delta import MakeOptions, expand_to, make_delta, open_delta
from btrdelta.delta import make as make_mod
from btrdelta.delta import writer as writer_mod
from btrdelta.delta.format import ZCommands
from btrdelta.delta.writer import DeltaWriter

from .conftest import Pair

pytestmark = pytest.mark.btrfs


def _make(stream: Path, old: Path, **kw: object) -> bytes:
    out: list[bytes] = []
    with open(stream, "rb") as f:
        make_delta(f, old, out.append, MakeOptions(min_file_size=1, **kw))
    return b"".join(bytes(p) for p in out)


@pytest.mark.parametrize(("name", "carrier"), [
    ("rebuilt-release", "zstd"), ("rebuilt-same", "zstd"), ("rebuilt-release", "xz"),
])
def test_parallel_make_is_byte_identical_to_serial(
    delta_pairs: dict[str, Pair], name: str, carrier: str
) -> None:
    """Oracle: the serial make (one thread does everything) and the kernel's stream, which
    the parallel delta expands to."""
    pair = delta_pairs[name]
    stream = pair.streams["v1"]
    serial = _make(stream, pair.a, jobs=1, carrier=carrier)
    parallel = _make(stream, pair.a, jobs=4, carrier=carrier)
    assert parallel == serial
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(parallel)), pair.a, out.append)
    assert b"".join(bytes(p) for p in out) == stream.read_bytes()


def test_xz_blocks_on_workers_are_byte_identical_to_serial(
    delta_pairs: dict[str, Pair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The xz carrier cut into blocks of 4 KiB (pieces of 1 KiB), compressed by four
    workers each primed with the bytes before its block (:mod:`btrdelta.delta.lanes`):
    the bytes of one worker, and a delta that expands to the kernel's stream."""
    monkeypatch.setattr(writer_mod, "XZ_BLOCK", 4 << 10)
    monkeypatch.setattr(writer_mod, "ZCMDS_TARGET", 1 << 10)
    pair = delta_pairs["rebuilt-release"]
    stream = pair.streams["v1"]
    serial = _make(stream, pair.a, jobs=1, carrier="xz")
    parallel = _make(stream, pair.a, jobs=4, carrier="xz")
    assert parallel == serial
    pieces = [i for i in open_delta(io.BytesIO(parallel)) if isinstance(i, ZCommands)]
    assert sum(p.raw_len for p in pieces) > 3 * (4 << 10)  # several blocks
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(parallel)), pair.a, out.append)
    assert b"".join(bytes(p) for p in out) == stream.read_bytes()


def test_output_error_on_the_carrier_thread_reaches_make(
    delta_pairs: dict[str, Pair]
) -> None:
    """A write failing on the background thread (disk full) fails make_delta with that
    error, and no thread is left behind."""
    pair = delta_pairs["rebuilt-release"]
    calls = 0

    def write(piece: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")

    before = {t.name for t in threading.enumerate()}
    with open(pair.streams["v1"], "rb") as f, pytest.raises(OSError, match="No space left"):
        make_delta(f, pair.a, write, MakeOptions(min_file_size=1, jobs=2))
    assert not {t.name for t in threading.enumerate()} - before


def test_diffs_in_flight_stay_within_the_budget(
    delta_pairs: dict[str, Pair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a diff budget below every group, groups are diffed one at a time whatever -j
    is (counted in the workers), and the delta still expands to the kernel's stream."""
    monkeypatch.setattr(make_mod, "_DIFF_BUDGET", 1)
    lock = threading.Lock()
    running = peak = calls = 0
    real = make_mod.diff_group  # type: ignore[attr-defined]

    def counting(*args: object) -> object:
        nonlocal running, peak, calls
        with lock:
            running += 1
            calls += 1
            peak = max(peak, running)
        try:
            return real(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(make_mod, "diff_group", counting)
    pair = delta_pairs["rebuilt-release"]
    stream = pair.streams["v1"]
    delta = _make(stream, pair.a, jobs=4)
    assert calls > 100
    assert peak == 1
    out: list[bytes] = []
    expand_to(open_delta(io.BytesIO(delta)), pair.a, out.append)
    assert b"".join(bytes(p) for p in out) == stream.read_bytes()


def test_background_writer_writes_what_the_synchronous_one_does() -> None:
    """The writer alone: same bytes with and without its thread (level 19 carrier)."""
    cmds = [bytes(10) + bytes([i]) * 50 for i in range(200)]
    outs = []
    for background in (False, True):
        out: list[bytes] = []
        w = DeltaWriter(out.append, background=background)
        for c in cmds:
            w.command(bytearray(c[:4]) + b"\x01\x00" + c[6:])
        w.flush()
        w.close()
        outs.append(b"".join(bytes(p) for p in out))
    assert outs[0] == outs[1]


def test_files_above_max_file_size_are_carried_not_diffed(
    delta_pairs: dict[str, Pair]
) -> None:
    """The memory of a make is bounded by --max-file-size: larger files (old or new) are
    carried as they are, never buffered for a diff; the delta still expands to the kernel's
    stream (oracle)."""
    pair = delta_pairs["rebuilt-release"]
    stream = pair.streams["v1"]
    limit = 64 << 10
    out: list[bytes] = []
    with open(stream, "rb") as f:
        stats = make_delta(f, pair.a, out.append,
                           MakeOptions(min_file_size=1, max_file_size=limit, jobs=2))
    assert 0 < stats.largest_diffed <= limit
    assert stats.patched_files < stats.groups
    back: list[bytes] = []
    expand_to(open_delta(io.BytesIO(b"".join(bytes(p) for p in out))), pair.a, back.append)
    assert b"".join(bytes(p) for p in back) == stream.read_bytes()
