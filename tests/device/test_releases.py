"""The release pairs of the device tests are what they say (oracles: dpkg, readelf, the
kernel's stat and xattrs): OLD and NEW each pass ``dpkg --verify`` (every packaged file as
its package's md5sums say, conffiles as dpkg's status says), NEW has the same packages as OLD
with some at higher versions (``dpkg --compare-versions``), and apt's programs were rebuilt
(another build ID). Both for the pair the tests take (the cached Debian one where there is
one) and for the one made from this machine's packages (``tests/device/hostrelease.py``)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import hostrelease
from .conftest import cached_trees


@pytest.fixture(scope="session")
def host_trees(release_trees: tuple[Path, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The pair made from this machine's packages: the tests' own where no Debian pair is
    cached, else one made here (removed at the session's end)."""
    if cached_trees() is None:
        yield release_trees
        return
    out = tmp_path_factory.mktemp("host-pair")
    yield hostrelease.build(out)
    shutil.rmtree(out)


def _versions(tree: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W",
                          "-f=${Package} ${Version}\\n"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def _build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID" in line)


@pytest.mark.parametrize("which", ["release_trees", "host_trees"])
def test_a_pair_is_a_verified_upgrade(which: str, request: pytest.FixtureRequest) -> None:
    old, new = request.getfixturevalue(which)
    for tree in (old, new):
        got = subprocess.run(["dpkg", f"--root={tree}", "--verify"], capture_output=True,
                             text=True, check=False)
        assert (got.returncode, got.stdout, got.stderr) == (0, "", ""), tree
    was, now = _versions(old), _versions(new)
    assert was.keys() == now.keys()
    upgraded = {p for p in was if was[p] != now[p]}
    assert "apt" in upgraded
    for pkg in upgraded:
        assert subprocess.run(["dpkg", "--compare-versions", now[pkg], "gt", was[pkg]],
                              check=False).returncode == 0, (pkg, was[pkg], now[pkg])
    http = "usr/lib/apt/methods/http"
    assert _build_id(old / http) != _build_id(new / http)


def test_the_host_pair_has_an_upgrades_kinds_of_change(host_trees: tuple[Path, Path]) -> None:
    """What ``tests/device/hostrelease.py`` says NEW has besides new versions: files moved,
    removed and added, a mode, an owner and a file capability changed."""
    old, new = host_trees
    moved = ("etc/apt/apt.conf.d/01autoremove", "etc/apt/apt.conf.d/20autoremove")
    assert (old / moved[0]).read_bytes() == (new / moved[1]).read_bytes()
    assert not (new / moved[0]).exists()
    methods = [m for m in ("usr/lib/apt/methods/rsh", "usr/lib/apt/methods/ssh")
               if os.path.lexists(old / m)]  # (Debian 13's apt 3 has neither)
    for gone in methods:
        assert not os.path.lexists(new / gone)
    lib = "usr/lib/x86_64-linux-gnu"
    assert {p.name for p in (old / lib).iterdir()} - {p.name for p in (new / lib).iterdir()}
    dpkg = "var/lib/dpkg"
    assert (new / dpkg / "status-old").read_bytes() == (old / dpkg / "status").read_bytes()
    assert not (old / "var/log/apt/history.log").exists()
    assert "apt:" in (new / "var/log/apt/history.log").read_text()
    daily = "usr/lib/apt/apt.systemd.daily"
    assert stat.S_IMODE((old / daily).stat().st_mode) != stat.S_IMODE((new / daily).stat().st_mode)
    assert (old / "var/log/apt").stat().st_gid != (new / "var/log/apt").stat().st_gid
    helper = "usr/lib/apt/apt-helper"
    assert "security.capability" not in os.listxattr(old / helper)
    assert "security.capability" in os.listxattr(new / helper)
    for tree in (old, new):
        assert stat.S_ISCHR((tree / "dev/null").lstat().st_mode)
