"""The README's first commands, as a new user types them: the tour's set-up (two snapshots
on a loop-mounted btrfs) and its first part (read, delta, receive), run by bash as written,
with only the absolute places (/var/tmp/snap.img, /snap, /data, /target) moved into the
test's directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_btrfs

ROOT = Path(__file__).resolve().parents[2]
PLACES = re.compile(r"(?<=[\s=])/(?:var/tmp/snap\.img|snap|data|target)(?=[/\s]|$)")


def _block(text: str, name: str) -> str:
    """The shell block between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    found = re.search(rf"<!-- BEGIN {name} -->\n```sh\n(.*?)```\n<!-- END {name} -->", text,
                      re.S)
    assert found, f"README.md has no {name} block"
    return found.group(1)


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@pytest.mark.btrfs
def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    require_btrfs()
    if not list(Path("/usr/lib").glob("python3.1?/json")):
        pytest.skip("the tour's set-up copies Debian's /usr/lib/python3.1X")
    readme = (ROOT / "README.md").read_text()
    script = _block(readme, "TOUR SET-UP") + _block(readme, "TOUR")
    script = PLACES.sub(lambda m: f"{tmp_path}{m.group(0)}", script)
    (tmp_path / "var/tmp").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600,
                              check=False)
    finally:
        if _mounted(tmp_path / "snap"):
            subprocess.run(["umount", str(tmp_path / "snap")], check=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "A-B.stream: OK" in out
    assert f"trees are equal: {tmp_path}/data/updates/B {tmp_path}/snap/B" in out
    assert "Traceback" not in out
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == [
        ".btrdelta-subvols.json", "A", "B"]


@pytest.mark.btrfs
def test_the_sendshot_example_runs_as_written(tmp_path: Path) -> None:
    """The README's lines on incremental sends with sendshots, as a new user types them
    (the replicate line aside): each stream names its subvolume (``--name``), so the
    increment is received next to the full one (both were named ``data``: the kernel's
    receive of the increment failed, ``data`` existing). Only the places move into the
    test's loop-mounted btrfs, and the sendshot store into its directory."""
    from tests.conftest import btrfs_loop

    readme = (ROOT / "README.md").read_text()
    start = readme.index("# incremental sends of live subvolumes")
    lines = [ln for ln in readme[start:].split("\n\n")[0].splitlines()[1:]
             if not ln.startswith("btrdelta replicate")]
    assert len(lines) == 4, lines
    assert all("data" in ln for ln in lines), lines
    with btrfs_loop("300M") as fs:
        subprocess.run(["btrfs", "subvolume", "create", str(fs / "pool-data")], check=True,
                       capture_output=True)
        (fs / "pool-data" / "a").write_bytes(os.urandom(50_000))
        (fs / "backup").mkdir()
        store = f"--store {tmp_path}/store"
        script = [re.sub(r"(?<=\s)/pool/data(?=\s)", f"{fs}/pool-data",
                         ln.replace("/backup", f"{fs}/backup").replace("--record",
                                                                     f"--record {store}"))
                  for ln in lines]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

        def run(text: str) -> None:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=300,
                                  check=False)
            assert proc.returncode == 0, (text, proc.stdout + proc.stderr)
            assert "Traceback" not in proc.stderr

        run("\n".join(script[:2]))
        (fs / "pool-data" / "b").write_bytes(os.urandom(20_000))  # "... /pool/data changes"
        run("\n".join(script[2:]))
        got = sorted(p.name for p in (fs / "backup").iterdir())
        assert got == ["data.1", "data.2"], got
        from btrdelta.tree import tree_sum

        assert tree_sum(fs / "backup" / "data.2") == tree_sum(fs / "pool-data")
