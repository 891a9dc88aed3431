"""The one backend switch (``btrdelta._native``): one setting, every accelerator, no patching."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta import _native
from btrdelta.delta.unpack import CarrierReader
from btrdelta.receive.applier import Applier
from btrdelta.send.onepass import BlockHasher, block_digests_py
from btrdelta.stream import StreamParser, StreamReader, StreamWriter, TextDumper
from btrdelta.stream.records import End, Subvol

pytestmark = pytest.mark.skipif(
    not all(map(_native.available, _native.ACCELERATORS)) and os.environ.get("CI") != "true",
    reason="C accelerators not built",
)


def _live_in(dest: Path) -> dict[str, bool]:
    """Which accelerator the objects made now use (each consumer asks when it is made)."""
    with Applier(dest) as applier:
        fast = applier._fast is not None
    return {
        "speedups": StreamParser()._c_decode is not None and TextDumper()._c is not None,
        "fastapply": fast,
        "unfold": CarrierReader(None)._unfold_c is not None,
        "buzhash": _buzhash_runs_c(),
        "treewalk": _treewalk_runs_c(dest),
        "blockhash": BlockHasher(1)._blocks_of is not block_digests_py,
        "hpatch": _hpatch_runs_c(),
        "sweep": _sweep_runs_c(),
        "columns": _columns_run_c(),
        "cells": _cells_run_c(),
    }


def _cells_run_c() -> bool:
    """Whether a file's cells are made from its extent items in C now (the Python reference
    not called)."""
    from btrdelta.send import extents

    calls: list[int] = []
    real = extents._inputs_py

    def spy(*args: object) -> tuple[bytes, bytes, int, int]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    extents._inputs_py = spy  # type: ignore[assignment]
    try:
        assert extents.same_in_cells(b"", b"", 0) == []
    finally:
        extents._inputs_py = real  # type: ignore[assignment]
    return not calls


def _columns_run_c() -> bool:
    """Whether a record's column offsets are computed in C now (the Python running sums
    not called)."""
    from btrdelta.tree import columns

    calls: list[int] = []
    real = columns._prefix

    def spy(values: object) -> object:
        calls.append(1)
        return real(values)  # type: ignore[arg-type]

    cols, (count, _f, _b, nblk) = columns.encode_rows([])
    columns._prefix = spy  # type: ignore[assignment]
    try:
        columns.Columns(dict(cols), count, nblk)
    finally:
        columns._prefix = real
    return not calls


def _sweep_runs_c() -> bool:
    """Whether a change sweep's items are walked in C now (the Python reference not
    called): ``changed_inodes`` on a fake search whose one buffer holds one inode item."""
    import struct

    from btrdelta.fs import btrfs, sweepref

    calls: list[int] = []
    real_walk, real_searches = sweepref.inodes, btrfs._searches

    def spy(*args: object) -> tuple[int, int, int]:
        calls.append(1)
        return real_walk(*args)  # type: ignore[arg-type]

    def searches(fd: int, size: int, key: object) -> Iterator[tuple[bytearray, int, int]]:
        item = struct.pack("<QQQII", 9, 300, 0, 1, 80) + struct.pack("<QQ56xQ", 3, 60, 5)
        yield bytearray(item), 0, 1

    sweepref.inodes, btrfs._searches = spy, searches  # type: ignore[assignment]
    try:
        assert btrfs.changed_inodes(-1, 50) == {300: (3, 60, 5)}
    finally:
        sweepref.inodes, btrfs._searches = real_walk, real_searches  # type: ignore[assignment]
    return not calls


def _hpatch_runs_c() -> bool:
    """Whether an hdiff patch is applied in C now (the C path's entry point called)."""
    from btrdelta.delta.codecs import get_codec, hdiff

    calls: list[int] = []
    real = hdiff._apply_c

    def spy(*args: object) -> bytes | None:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    codec = get_codec("hdiff-raw")
    patch = codec.make(b"old content", b"new content")
    hdiff._apply_c = spy  # type: ignore[assignment]
    try:
        assert codec.apply(b"old content", patch) == b"new content"
    finally:
        hdiff._apply_c = real  # type: ignore[assignment]
    return bool(calls)


def _buzhash_runs_c() -> bool:
    """Whether casync's chunker runs in C now (its Python reference is not called)."""
    from btrdelta.chunk import buzhash

    calls: list[int] = []
    real = buzhash.cuts_py

    def spy(*args: object) -> list[int]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    buzhash.cuts_py = spy  # type: ignore[assignment]
    try:
        buzhash.cuts(bytes(range(200)), 0, 200, 48, 96, 64)
    finally:
        buzhash.cuts_py = real  # type: ignore[assignment]
    return not calls


def _treewalk_runs_c(dest: Path) -> bool:
    """Whether an incremental tree-sum walks in C now (the Python walk not called)."""
    from btrdelta.stream.records import Snapshot
    from btrdelta.tree import incremental, treesum

    calls: list[int] = []
    real = treesum._walk

    def spy(root: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
        calls.append(1)
        return real(root)

    parent = incremental.verified_digests(dest)
    changes = incremental.Changes()
    changes.feed(Snapshot(b"x", uuid.uuid4(), 1, uuid.uuid4(), 1))
    treesum._walk = spy  # type: ignore[assignment]
    try:
        changes.tree_sum(dest, parent)
    finally:
        treesum._walk = real  # type: ignore[assignment]
    return not calls


def test_one_setting_picks_every_accelerator() -> None:
    assert _native.BACKEND == "c"
    assert _native.backends() == dict.fromkeys(_native.ACCELERATORS, "c")
    code = ("from btrdelta import _native, stream; from btrdelta.stream import crc;"
            "print(_native.BACKEND, sorted(_native.backends().values()), stream.BACKEND,"
            " crc.IMPL)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    out = {}
    for value in (None, "0", "1"):
        extra = {} if value is None else {"BTRDELTA_PURE_PYTHON": value}
        out[value] = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                                    capture_output=True, text=True, check=True).stdout.split()
    assert out[None] == out["0"]
    assert out[None][:12] == ["c", "['c',", "'c',", "'c',", "'c',", "'c',", "'c',", "'c',",
                              "'c',", "'c',", "'c']", "c"]
    assert out["1"] == ["python", "['python',", "'python',", "'python',", "'python',",
                        "'python',", "'python',", "'python',", "'python',", "'python',",
                        "'python']", "python", "crc32c", "package"]


def test_use_backend_reaches_objects_made_inside(tmp_path: Path) -> None:
    assert _live_in(tmp_path) == dict.fromkeys(_native.ACCELERATORS, True)
    with _native.use_backend("python"):
        assert _native.BACKEND == "python"
        assert _native.backends() == dict.fromkeys(_native.ACCELERATORS, "python")
        assert _live_in(tmp_path) == dict.fromkeys(_native.ACCELERATORS, False)
        with _native.use_backend("c", "unfold"):
            assert _live_in(tmp_path) == {"speedups": False, "fastapply": False, "unfold": True,
                                          "buzhash": False, "treewalk": False,
                                          "blockhash": False, "hpatch": False,
                                          "sweep": False, "columns": False, "cells": False}
    assert _native.BACKEND == "c"
    with _native.use_backend("python", "fastapply"):
        assert _native.BACKEND == "c"
        assert _native.backends()["fastapply"] == "python"
        assert _live_in(tmp_path) == {"speedups": True, "fastapply": False, "unfold": True,
                                      "buzhash": True, "treewalk": True, "blockhash": True,
                                      "hpatch": True, "sweep": True, "columns": True,
                                      "cells": True}
    assert _live_in(tmp_path) == dict.fromkeys(_native.ACCELERATORS, True)


def test_use_backend_restores_after_an_error() -> None:
    with pytest.raises(KeyError), _native.use_backend("python"):
        raise KeyError("x")
    assert _native.BACKEND == "c"
    assert _native.backends() == dict.fromkeys(_native.ACCELERATORS, "c")
    with pytest.raises(ValueError, match="unknown accelerator"), _native.use_backend("c", "nope"):
        pass
    with pytest.raises(ValueError, match="backend"), _native.use_backend("rust"):  # type: ignore[arg-type]
        pass


def test_a_parser_keeps_the_backend_it_was_made_with() -> None:
    out = io.BytesIO()
    w = StreamWriter(out.write, 2)
    w.write(Subvol(b"s", uuid.UUID(int=1), 1))
    w.write(End())
    with _native.use_backend("python"):
        reader = StreamReader(io.BytesIO(out.getvalue()))
    assert reader.parser._c_decode is None
    assert [type(r) for r in reader] == [Subvol, End]  # read on, outside the block


def test_on_load_configures_a_loaded_module_at_once() -> None:
    seen: list[object] = []
    _native.on_load("unfold", seen.append)
    assert seen == [_native.live("unfold")]
    _native._hooks["unfold"].remove(seen.append)


def test_two_threads_load_a_module_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``update`` imports the C modules in a thread while its own thread may ask for one:
    the module's hooks run once, and neither thread gets it before they ran."""
    import threading
    import time

    mod = _native.live("buzhash")
    assert mod is not None
    monkeypatch.delitem(_native._loaded, "buzhash")
    calls: list[int] = []

    def slow_hook(_m: object) -> None:
        time.sleep(0.05)
        calls.append(threading.get_ident())

    monkeypatch.setitem(_native._hooks, "buzhash", [slow_hook])
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append((_native.live("buzhash"),
                                                           len(calls))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert got == [(mod, 1), (mod, 1)]
