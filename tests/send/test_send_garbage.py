"""A send leaves no garbage of ours for the cycle collector: each send's ``ContentHasher``
sat in a reference cycle (its thread pool held its bound method), and with it the trees'
nodes and the bytes it kept, until a full collection: a long ``replicate --listen`` or
``--every`` grew between them (session 32's loop32). Sends of a live btrfs subvolume
through the API, with the collector off: what a collection then finds unreachable holds
no object of a btrdelta type. Oracle for the sends: the kernel's ``btrfs receive`` of the
streams, tree-sums against the source."""

from __future__ import annotations

import functools
import gc
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from btrdelta.send.sendshot import send_with_sendshots
from btrdelta.send.store import SendshotStore
from btrdelta.tree import tree_sum
from btrdelta.update.channels import spawn_local
from btrdelta.update.replicate import replicate
from tests.send.conftest import Workspace

pytestmark = pytest.mark.btrfs

T = TypeVar("T")


def _ours_unreachable(call: Callable[[], T]) -> tuple[T, list[str]]:
    """``call()`` with the collector off, and the btrdelta types of what a collection then
    finds unreachable."""
    gc.collect()
    gc.disable()
    try:
        got = call()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                       if type(o).__module__.startswith("btrdelta")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return got, ours


@pytest.fixture
def subvol(btrfs_ws: Workspace) -> Path:
    where = btrfs_ws.fresh("garbage")
    src = where / "src"
    subprocess.run(["btrfs", "subvolume", "create", str(src)], check=True,
                   capture_output=True)
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(3000 * i + 1))
    return src


def test_a_send_leaves_no_cycle_of_ours(subvol: Path, tmp_path: Path,
                                        btrfs_ws: Workspace) -> None:
    store = SendshotStore(tmp_path / "store")
    base = None
    for n in range(2):
        stream = tmp_path / f"s{n}"
        with open(stream, "wb") as out:
            result, ours = _ours_unreachable(functools.partial(
                send_with_sendshots, out.write, subvol, store=store, from_sendshot=base))
        assert ours == [], ours
        into = btrfs_ws.fresh(f"received{n}")  # (the parent: found by its received UUID)
        subprocess.run(["btrfs", "receive", "-f", str(stream), str(into)], check=True,
                       capture_output=True)
        assert tree_sum(into / os.fsdecode(result.recorded.head.name)) == tree_sum(subvol)
        base = result.recorded.digest
        (subvol / "f3").write_bytes(os.urandom(70000))


def test_a_replication_leaves_no_cycle_of_ours(subvol: Path, tmp_path: Path) -> None:
    store = SendshotStore(tmp_path / "store")
    dest = tmp_path / "dest"
    dest.mkdir()
    for _round in range(2):
        def one() -> Any:
            ch = spawn_local(str(dest))
            try:
                return replicate(subvol, ch, store=store)
            finally:
                ch.close()

        result, ours = _ours_unreachable(one)
        assert ours == [], ours
        assert result.outcome == "committed", result
        assert tree_sum(dest / result.name) == tree_sum(subvol)
        (subvol / "f3").write_bytes(os.urandom(70000))
