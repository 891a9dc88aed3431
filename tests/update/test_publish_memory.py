"""``repo add``'s peak memory on a release of mostly new files that do not compress: the
delta is as large as the new data (its WRITEs go beside the carrier, as they are), and
``repo add`` must not hold it whole. Measured on the CLI in a child (``wait4``'s peak RSS,
``tests.conftest.run_peak_rss``); oracles: the published delta is named by its BLAKE3,
and ``update`` through it gives the release's tree-sum. Also the mode of a delta
published so (a job output made under a strict umask)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest

from btrdelta import trust
from btrdelta.cli import main
from btrdelta.tree import tree_sum
from tests.conftest import run_peak_rss

#: new data of the second release (random 4 KiB blocks: nothing compresses, nothing is
#: shared with the first)
NEW = 64 << 20
#: ``repo add``'s peak for it: before, the delta (64 MiB) was read whole and copied to
#: its content-addressed name (156 MiB on the machine of session 31); now the delta is
#: made in ~115 MiB (the interpreter, the chunking's windows, the writer) and renamed
LIMIT = 144 << 20


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "btrdelta", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_repo_add_of_new_incompressible_files_does_not_hold_the_delta(tmp_path: Path) -> None:
    rng = random.Random(31)
    pool = [rng.randbytes(4096) for _ in range(2048)]
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for tree in (v1, v2):
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "release").write_text("base\n")
    (v2 / "new").mkdir()
    for i in range(NEW // (4 << 20)):
        (v2 / "new" / f"f{i:02d}").write_bytes(
            b"".join(rng.choice(pool) for _ in range((4 << 20) // 4096)))
    repo = tmp_path / "repo"
    # (no solid full: its two level-19 compressors, ~160 MiB on top for this release
    # whatever its size, docs/performance.md session 32, would hide what is measured here)
    _cli("repo", "init", str(repo), "--solid-level", "0")
    _cli("repo", "add", "-q", str(repo), "1", str(v1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_")}
    code, err, rss = run_peak_rss([sys.executable, "-m", "btrdelta", "repo", "add", "-q",
                                   str(repo), "2", str(v2)], env)
    assert code == 0, err
    assert rss <= LIMIT, f"repo add peaked at {rss >> 20} MiB, the limit is {LIMIT >> 20}"

    (delta,) = (repo / "deltas").glob("*.delta")
    data = delta.read_bytes()
    assert len(data) > NEW * 9 // 10  # (the new data as it is: the case measured)
    assert delta.name == f"{blake3.blake3(data).hexdigest()}.delta"
    assert oct(delta.stat().st_mode & 0o777) == oct(0o644 & ~_umask())  # (a web server reads it)
    assert not list((repo / ".btrdelta" / "jobs").rglob("*.delta"))  # (moved, not copied)
    listing = subprocess.run([sys.executable, "-m", "btrdelta", "repo", "ls", "--json",
                              str(repo)], check=True, capture_output=True, text=True).stdout
    assert str(len(data)) in json.dumps(json.loads(listing))

    key = tmp_path / "root"
    _cli("key", "generate", "-q", "-o", str(key))
    _cli("repo", "sign", "-q", str(repo), "--key", f"{key}.key")
    dest = tmp_path / "dest"
    _cli("update", "-q", str(repo), str(dest), "--to", "1", "--key", f"{key}.pub")
    _cli("update", "-q", str(repo), str(dest), "--to", "2", "--key", f"{key}.pub")
    assert tree_sum(dest / "2") == tree_sum(v2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask



def _job_of_release_2(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A repository of release 1, release 2 planned (``--plan-only``): the repository,
    release 2's tree and the job file of its delta."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for tree, text in ((v1, "one\n" * 500), (v2, "one\n" * 400 + "two\n" * 200)):
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "release").write_text(text)
    repo = tmp_path / "repo"
    assert main(["repo", "init", str(repo), "-q"]) == 0
    assert main(["repo", "add", str(repo), "1", str(v1), "-q"]) == 0
    assert main(["repo", "add", str(repo), "2", str(v2), "--plan-only", "-q"]) == 0
    (job,) = (repo / ".btrdelta" / "jobs" / "2").glob("*.json")
    return repo, v2, job


def _update_through_the_delta(repo: Path, v2: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """The repository signed, ``update`` to 1 then 2 takes the delta and gives ``v2``."""
    trust.save_key_pair(trust.generate_key(), str(tmp_path / "root.pem"),
                        str(tmp_path / "root.pub"))
    assert main(["repo", "sign", str(repo), "--key", str(tmp_path / "root.pem"), "-q"]) == 0
    dest, key = tmp_path / "dest", ["--key", str(tmp_path / "root.pub"), "-q"]
    assert main(["update", str(repo), str(dest), "--to", "1", *key]) == 0
    capsys.readouterr()
    assert main(["update", str(repo), str(dest), "--to", "2", "--json", *key]) == 0
    steps = json.loads(capsys.readouterr().out)["plan"]["steps"]
    assert [(s["kind"], s["from"]) for s in steps] == [("delta", "1")]
    assert tree_sum(dest / "2") == tree_sum(v2)


def test_a_job_output_made_under_a_strict_umask_is_published_readable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job run elsewhere (``repo run-job`` under a umask of 077, as a batch system's may
    be) makes its output 0600; published by renaming it, the delta kept that mode and a
    web server running as another user answered 403 for it. Published, it is 0644 less
    ``repo add``'s umask, as every other file of the repository; ``update`` through it
    gives the release."""
    repo, v2, job = _job_of_release_2(tmp_path)
    strict = os.umask(0o077)
    try:
        assert main(["repo", "run-job", str(job), "--work", str(tmp_path), "-q"]) == 0
    finally:
        os.umask(strict)
    assert main(["repo", "add", str(repo), "2", "-q"]) == 0
    (delta,) = (repo / "deltas").glob("*.delta")
    assert oct(delta.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    assert delta.name == f"{blake3.blake3(delta.read_bytes()).hexdigest()}.delta"
    _update_through_the_delta(repo, v2, tmp_path, capsys)


def test_a_job_output_replaced_while_it_is_published_is_not_published(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run of the job (elsewhere) renames its output over the one ``repo add`` has
    just hashed, before ``repo add`` renames it into ``deltas/``: what was renamed is not
    the file hashed, and it was published under the other's name (a client downloading it
    failed its check). Now nothing is published, one line says why, the delta stays
    pending; the next ``repo add`` makes it, and ``update`` through it gives the release."""
    repo, v2, job = _job_of_release_2(tmp_path)
    output = Path(json.loads(job.read_text())["output"])
    assert main(["repo", "run-job", str(job), "--work", str(tmp_path), "-q"]) == 0
    real = os.replace

    def late_run_job(src: Any, dst: Any) -> None:  # (its output renamed over the first)
        if Path(src) == output:
            late = output.with_name("late")
            late.write_bytes(output.read_bytes() + b"a late run's other bytes")
            real(late, output)
        real(src, dst)

    monkeypatch.setattr(os, "replace", late_run_job)
    capsys.readouterr()
    assert main(["repo", "add", str(repo), "2", "-q"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "replaced while it was published" in err
    monkeypatch.setattr(os, "replace", real)
    assert not list((repo / "deltas").glob("*"))
    assert main(["repo", "add", str(repo), "2", "-q"]) == 0
    (delta,) = (repo / "deltas").glob("*.delta")
    assert delta.name == f"{blake3.blake3(delta.read_bytes()).hexdigest()}.delta"
    _update_through_the_delta(repo, v2, tmp_path, capsys)
