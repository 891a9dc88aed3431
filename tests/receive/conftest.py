"""Receive fixtures: kernel streams received by the kernel and by btrdelta (ext4, btrfs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from btrdelta import _native
from btrdelta.receive import receive
from btrdelta.stream import StreamReader
from btrdelta.testing.loopfs import BtrfsUnavailable, loop_fs
from btrdelta.testing.scenarios import kernel_receive
from tests.conftest import KernelStream


@pytest.fixture(params=["c", "c-old-kernel", "python"])
def applier_impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the applier's C fast path, with it taking the calls of kernels
    without ``openat2``/``fchmodat2`` (the source of a CLONE walked to one directory at a
    time, a CHMOD through ``/proc/self/fd``), then with the Python handlers alone."""
    impl: Literal["c", "python"] = "python" if request.param == "python" else "c"
    if impl == "c" and not _native.available("fastapply"):
        pytest.skip("the C fast path (receive/_fastapply.c) is not built")
    with _native.use_backend(impl, "fastapply"):
        fast = _native.live("fastapply")
        if fast is not None and request.param == "c-old-kernel":
            fast.fall_back(True)
        try:
            yield str(request.param)
        finally:
            if fast is not None:
                fast.fall_back(False)


@dataclass
class Targets:
    """Loop filesystems: kernel-received btrfs, btrdelta into btrfs, btrdelta into ext4."""

    kernel: Path
    ours_btrfs: Path
    ours_ext4: Path
    scratch_btrfs: Path
    warnings: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def targets() -> Iterator[Targets]:
    try:
        with ExitStack() as stack:
            kernel = stack.enter_context(loop_fs("btrfs", size="4G"))
            ours_btrfs = stack.enter_context(loop_fs("btrfs", size="4G"))
            # ea_inode: xattrs past one block, as btrfs holds them (xattrs-past-path-max-053)
            ours_ext4 = stack.enter_context(loop_fs("ext4", size="4G",
                                                    mkfs_args=("-O", "ea_inode")))
            scratch = stack.enter_context(loop_fs("btrfs", size="2G"))
            yield Targets(kernel, ours_btrfs, ours_ext4, scratch)
    except BtrfsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but btrfs is unavailable: {exc}")
        pytest.skip(str(exc))


def python_applier() -> AbstractContextManager[None]:
    """The applier without its C fast path (the Python handlers apply every record)."""
    return _native.use_backend("python", "fastapply")


def our_receive(stream: Path, dest: Path, warnings: list[str] | None = None,
                **kw: object) -> list[object]:
    """btrdelta's receive through the Python API."""
    with open(stream, "rb") as f:
        return receive(StreamReader(f, source=stream.name).events(), dest,  # type: ignore[arg-type]
                       on_warning=(warnings.append if warnings is not None else None), **kw)


@dataclass
class Group:
    """One scenario variant: streams A and B (after ``middle``: a clone source's full stream)
    received three ways."""

    name: str
    a: KernelStream
    b: KernelStream
    dirs: dict[str, Path]
    error: str | None = None
    middle: tuple[KernelStream, ...] = ()


#: seconds for a test that uses :func:`received`: the first one pays for the session
#: fixture, four receives of every scenario's streams (~0.5 of the global 600 s near idle;
#: past 600 at load ~15)
RECEIVED_TIMEOUT = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "received" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(RECEIVED_TIMEOUT))


@pytest.fixture(scope="session")
def received(kernel_streams: list[KernelStream], targets: Targets) -> dict[str, Group]:
    by_name = {ks.name: ks for ks in kernel_streams}
    groups: dict[str, Group] = {}
    todo: list[Group] = []
    for name, ks in by_name.items():
        if not name.endswith(".A") or name[:-2] + ".B" not in by_name:
            continue
        base = name[:-2]
        todo.append(Group(base, ks, by_name[base + ".B"], {}))
        if base + ".C" in by_name:  # A, the clone source C, B sent with -p A -c C
            todo.append(Group(base + ".clones", ks, by_name[base + ".Bc"], {},
                              middle=(by_name[base + ".C"],)))
    for g in todo:
        base = g.name
        for key, root in (("kernel", targets.kernel), ("btrfs", targets.ours_btrfs),
                          ("ext4", targets.ours_ext4), ("btrfs-python", targets.ours_btrfs)):
            d = root / (base if key != "btrfs-python" else base + ".python")
            d.mkdir()
            g.dirs[key] = d
        try:
            for stream in (g.a.path, *(m.path for m in g.middle), g.b.path):
                kernel_receive(stream, g.dirs["kernel"])
                our_receive(stream, g.dirs["btrfs"], targets.warnings)
                our_receive(stream, g.dirs["ext4"], targets.warnings)
                with python_applier():
                    our_receive(stream, g.dirs["btrfs-python"], targets.warnings)
        except Exception as exc:  # reported by the test of this group
            g.error = f"{type(exc).__name__}: {exc}"
        groups[base] = g
    return groups
