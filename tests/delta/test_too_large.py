"""``delta make`` says which files it carried whole because they are above
``--max-file-size`` (session 33: Chromium 150 -> 156, whose 279 and 297 MB main binary the
default 256 MiB left undiffed, without a word): a warning on standard error and in
``--json``'s ``warnings``, naming the largest; with the limit raised the file is diffed,
and the device's ``receive`` then needs the same limit. Plain directories, the CLI, and
``tree-sum`` against the new tree as the oracle."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from btrdelta.tree import tree_sum


def _btrdelta(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "btrdelta", *map(str, args)],
                          capture_output=True, text=True, check=False)


def test_files_above_max_file_size_are_named(tmp_path: Path) -> None:
    rng = random.Random(33)
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "lib").mkdir(parents=True)
    big = rng.randbytes(3 << 20)  # incompressible: carried whole, it costs its size
    (old / "lib" / "big.so").write_bytes(big)
    (old / "small.txt").write_bytes(b"one\n" * 1000)
    shutil.copytree(old, new, symlinks=True)
    edited = b"v2" + big[: 1 << 20] + b"patched" * 10 + big[(1 << 20) + 70 :]
    (new / "lib" / "big.so").write_bytes(edited)
    (new / "small.txt").write_bytes(b"two\n" * 1000)
    full, inc = tmp_path / "full.s", tmp_path / "inc.s"
    assert _btrdelta("send", "-q", old, "-o", full).returncode == 0
    proc = _btrdelta("send", "-q", "-p", old, new, "-o", inc)
    assert proc.returncode == 0, proc.stderr

    carried, diffed = tmp_path / "1m.delta", tmp_path / "4m.delta"
    proc = _btrdelta("delta", "make", "-q", "--json", "-f", inc, "--old", old, "-o", carried,
                     "--max-file-size", "1M")
    assert proc.returncode == 0, proc.stderr
    warning = ("1 file(s) above --max-file-size (1.0 MiB) carried whole, not diffed "
               "(largest: lib/big.so, 3.0 MiB)")
    assert proc.stderr.count("delta make: warning: ") == 1, proc.stderr
    assert warning in proc.stderr
    assert any(warning in w for w in json.loads(proc.stdout)["warnings"])
    assert carried.stat().st_size > 3 << 20

    proc = _btrdelta("delta", "make", "-q", "--json", "-f", inc, "--old", old, "-o", diffed,
                     "--max-file-size", "4M")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["warnings"] == []
    assert diffed.stat().st_size < 20_000

    # the device: a receiver holding old takes the diffed delta with a limit as large
    for limit, code in (("1M", 3), ("4M", 0)):
        dest = tmp_path / f"dest-{limit}"
        dest.mkdir()
        assert _btrdelta("receive", "-q", "-f", full, dest).returncode == 0
        proc = _btrdelta("receive", "-q", "--max-file-size", limit, "-f", diffed, dest)
        assert proc.returncode == code, proc.stderr
        if code:
            assert "Traceback" not in proc.stderr
            assert len(proc.stderr.splitlines()) == 1
            assert "exceed the limit 1048576" in proc.stderr, proc.stderr
        else:
            assert tree_sum(dest / "new") == tree_sum(new)
