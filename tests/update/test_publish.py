"""``repo init/add``: fulls deduplicated in packs, deltas at the layout's distances, each
artifact content-addressed; checked by receiving them with the public CLI (tree-sum oracle)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import blake3
import pytest

from btrdelta.cli import main
from btrdelta.repo.fullindex import decode_full_index
from btrdelta.repo.layout import delta_sources, paths_to
from btrdelta.tree import tree_sum
from btrdelta.update.packs import LocalPacks, open_full
from btrdelta.update.publish import Repo
from tests.conftest import spy_fsync
from tests.jsondoc import checked

N = 5


@pytest.fixture(scope="module")
def repo(releases: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("publish") / "repo"
    assert main(["repo", "init", str(root), "--avg-chunk", "4K"]) == 0
    for i in range(N - 1):
        extra = ["--parallel", "2"] if i == 3 else []  # v4 has two deltas: two processes
        assert main(["repo", "add", str(root), f"v{i + 1}", str(releases[i]), *extra]) == 0
    # the last one as a batch system would: plan, run each job, pick the results up
    assert main(["repo", "add", str(root), f"v{N}", str(releases[N - 1]), "--plan-only"]) == 0
    return root


def test_job_files_are_written_whole_and_durably(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A job file was written in place (write_text, no fsync): a power cut could leave a
    torn job for a worker. Now as fs.atomic writes files; a torn one is refused in one line
    naming it (exit 3)."""

    from btrdelta.update.jobs import plan_jobs

    jobs_dir = repo / ".btrdelta" / "jobs" / f"v{N}"
    before = {p.name: p.read_bytes() for p in jobs_dir.glob("*.json")}
    assert before
    r = Repo(repo)
    with monkeypatch.context() as mp:
        synced = spy_fsync(mp)
        plan_jobs(r, r.load(), N)
    assert {p.name: p.read_bytes() for p in jobs_dir.glob("*.json")} == before
    assert synced.count(str(jobs_dir)) == len(before), synced  # each rename made durable
    assert len(synced) == 2 * len(before), synced
    data = sorted(before.items())[0][1]
    torn = repo.parent / "torn.json"
    torn.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["repo", "run-job", str(torn)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(torn) in err, err


def test_job_files_are_named_as_run_jobs_help_says(
        repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``REPO/.btrdelta/jobs/V/from-P.json``, P the older version's position (1: the first
    added), as ``repo run-job --help``'s example shows it (it showed
    ``jobs/1.3/1.1-1.3.json``, a name no job has)."""
    import json
    import re

    names = [v.name for v in Repo(repo).load().versions]
    jobs = sorted((repo / ".btrdelta" / "jobs" / f"v{N}").glob("*.json"))
    assert jobs
    for job in jobs:
        source = json.loads(job.read_text())["from"]
        assert job.name == f"from-{names.index(source) + 1}.json", (job.name, source)
    with pytest.raises(SystemExit):
        main(["repo", "run-job", "--help"])
    example = re.search(r"repo run-job \S*/jobs/([^/\s]+)/(\S+)", capsys.readouterr().out)
    assert example is not None
    assert re.fullmatch(r"from-[1-9][0-9]*\.json", example[2]), example[0]


def test_a_pack_is_named_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack was fsync-ed and renamed into packs/, but packs/ was never fsync-ed: after a
    power cut the catalog (written after it, durably) could name a pack that is not there."""

    from btrdelta.update.packs import _PackWriter

    packs, tmp = tmp_path / "packs", tmp_path / "tmp"
    tmp.mkdir()
    w = _PackWriter(packs, tmp, 0, 1 << 20)
    w.append(b"frame" * 100)
    synced = spy_fsync(monkeypatch)
    w.close()
    [pack] = packs.iterdir()
    assert synced[-1] == str(packs), synced
    assert pack.read_bytes() == b"frame" * 100


def test_catalog_follows_the_layout_and_names_are_content_hashes(repo: Path) -> None:
    cat = Repo(repo).load()
    assert [v.name for v in cat.versions] == [f"v{i}" for i in range(1, N + 1)]
    sizes = [{a: n for a, (_h, n) in v.deltas.items()} for v in cat.versions]
    for pos, v in enumerate(cat.versions[: N - 1], 1):
        assert set(delta_sources(pos)) <= set(v.deltas)
        assert v.measured
        # a measured extra is kept only where the path without it cost > 1.2x it
        layout_only = [*sizes[: pos - 1], {a: sizes[pos - 1][a] for a in delta_sources(pos)}]
        for u in set(v.deltas) - set(delta_sources(pos)):
            assert paths_to(pos, layout_only)[u] > 1.2 * v.deltas[u][1], (u, pos)
        for digest, length in v.deltas.values():
            data = (repo / "deltas" / f"{digest}.delta").read_bytes()
            assert (len(data), blake3.blake3(data).hexdigest()) == (length, digest)
    assert cat.versions[-1].pending == delta_sources(N)
    # packs hold each chunk once: less than every full on its own
    packs = sum(p.stat().st_size for p in (repo / "packs").iterdir())
    assert packs == sum(p.length for p in cat.packs)
    assert packs < sum(v.full_bytes for v in cat.versions) * 0.8


def test_a_web_server_of_another_user_may_read_every_published_file(repo: Path) -> None:
    """What mirrors carry is world-readable (less the umask, 022 here), as nginx, running
    as www-data, needs: packs were made 0600 (mkstemp), so every full's range got 403.
    (Under a umask that keeps others out, 077, they are readable as far as it allows.)"""
    umask = os.umask(0)
    os.umask(umask)
    want = 0o444 & ~umask
    published = [p for p in repo.rglob("*") if p.is_file() and ".btrdelta" not in p.parts]
    assert {p.parent.name for p in published} >= {"packs", "fulls", "deltas"}
    unreadable = [str(p.relative_to(repo)) for p in published
                  if p.stat().st_mode & want != want]
    assert not unreadable, (oct(umask), unreadable)


def test_fulls_rebuild_the_release_trees(repo: Path, releases: list[Path],
                                         tmp_path: Path) -> None:
    cat = Repo(repo).load()
    dest = tmp_path / "dest"
    dest.mkdir()
    for pos in (1, 3):
        v = cat.versions[pos - 1]
        data = (repo / "fulls" / f"{v.full_id}.fidx").read_bytes()
        full = decode_full_index(data, source="fidx")
        stream = tmp_path / f"{v.name}.stream"
        with open_full(full, LocalPacks(repo), source="x") as rebuilt:
            stream.write_bytes(rebuilt.read())
        assert main(["receive", "-f", str(stream), str(dest)]) == 0
        assert tree_sum(dest / v.name) == tree_sum(releases[pos - 1]) == v.identity
    # a delta applies on the received full with the public CLI
    digest, _ = cat.versions[3].deltas[3]
    assert main(["receive", "-f", str(repo / "deltas" / f"{digest}.delta"), str(dest)]) == 0
    assert tree_sum(dest / "v4") == tree_sum(releases[3])


def test_a_flipped_byte_anywhere_in_a_packed_chunk_is_a_mismatch_of_its_id(
        repo: Path) -> None:
    """A full's chunk read from a pack: wherever a damaged byte falls (the zstd frame's
    header, its data, its checksum), the chunk does not match its id (exit 5), as for a
    chunk archive (tests/chunk/test_source.py): one function decodes both."""
    from btrdelta.errors import ChecksumError
    from btrdelta.repo.fullindex import PackSlot

    v = Repo(repo).load().versions[0]
    full = decode_full_index((repo / "fulls" / f"{v.full_id}.fidx").read_bytes(),
                             source="fidx")
    entry = full.index.order[0]  # the stream's first bytes
    off, size = full.index.offsets[entry], full.index.comp_sizes[entry]
    slot = full.pack_at(off)

    class Flipped(LocalPacks):
        def __init__(self, at: int) -> None:
            super().__init__(repo)
            self.at = at

        def read(self, slot: PackSlot, start: int, end: int) -> bytes:
            data = bytearray(super().read(slot, start, end))
            if start <= self.at < end:
                data[self.at - start] ^= 0x40
            return bytes(data)

    with open_full(full, LocalPacks(repo), source="x") as f:
        good = f.read(full.index.raw_sizes[entry])
    errors = []
    for at in range(off - slot.base, off - slot.base + size):
        with open_full(full, Flipped(at), source="x") as f:
            try:  # (a few bits of a frame change nothing it decodes to: right bytes then)
                assert f.read(len(good)) == good, at
            except ChecksumError as exc:
                errors.append(str(exc))
    assert len(errors) > size * 0.9, (len(errors), size)
    assert all(re.search(rf"chunk {entry}\b.* does not match its id", e) for e in errors)


def test_jobs_run_elsewhere_are_adopted(repo: Path, releases: list[Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    jobs = sorted((repo / ".btrdelta" / "jobs" / f"v{N}").glob("*.json"))
    assert len(jobs) == len(delta_sources(N))
    for job in jobs:
        spec = json.loads(job.read_text())
        assert spec["command"][:3] == ["btrdelta", "repo", "run-job"]
        capsys.readouterr()
        assert main(["repo", "run-job", str(job), "--work", str(tmp_path), "--json"]) == 0
        done = checked("repo run-job", json.loads(capsys.readouterr().out))
        assert done["output"] == spec["output"]
        assert done["bytes"] == Path(spec["output"]).stat().st_size > 0
    capsys.readouterr()
    assert main(["repo", "add", str(repo), f"v{N}", "--json"]) == 0
    report = checked("repo add", json.loads(capsys.readouterr().out))
    assert {d["from"] for d in report["deltas"]} == {f"v{a}" for a in delta_sources(N)}
    cat = Repo(repo).load()
    assert cat.versions[-1].pending == []
    solid = cat.versions[-1].solid  # (made by the --plan-only add that stored the full)
    assert solid is not None
    assert report["solid_bytes"] == solid.length == (repo / solid.path).stat().st_size
    assert not (repo / ".btrdelta" / "jobs" / f"v{N}").exists()


def test_a_full_send_stream_is_a_source(releases: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "repo"
    assert main(["repo", "init", str(root)]) == 0
    stream = tmp_path / "r.stream"
    assert main(["send", str(releases[0]), "-o", str(stream)]) == 0
    assert main(["repo", "add", str(root), "a", str(stream)]) == 0
    assert main(["repo", "add", str(root), "b", str(releases[1])]) == 0
    cat = Repo(root).load()
    assert cat.versions[0].identity == tree_sum(releases[0])
    assert sorted(cat.versions[1].deltas) == [1]


def test_refusals(repo: Path, releases: list[Path], tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["repo", "add", str(repo), "v1", str(releases[0])]) == 1
    assert "already in the repository" in capsys.readouterr().err
    assert main(["repo", "add", str(repo), "../x", str(releases[0])]) != 0
    assert "version name" in capsys.readouterr().err
    assert main(["repo", "add", str(tmp_path), "v1", str(releases[0])]) == 1
    assert "not a repository" in capsys.readouterr().err
    assert main(["repo", "init", str(repo)]) == 1
    assert "already a repository" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").touch()
    assert main(["repo", "init", str(tmp_path / "other")]) == 1
    assert "not empty" in capsys.readouterr().err
    for where, why in ((tmp_path, "not a repository"),  # a new user's wrong REPO
                       (tmp_path / "nonexistent", "no such directory")):
        assert main(["repo", "ls", str(where)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"'{where}': {why}" in err, err
    assert main(["repo", "ls", str(repo), "--json"]) == 0
    listing = checked("repo ls", json.loads(capsys.readouterr().out))
    assert [v["name"] for v in listing["versions"]] == [f"v{i}" for i in range(1, N + 1)]


def test_init_on_a_full_disk_leaves_nothing(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``repo init`` on a filesystem with no space left: one line naming the error, and no
    half-made repository (before: an empty REPO/.btrdelta stayed, and the next `repo init`
    said "directory is not empty"); the existing empty directory stays, emptied again."""
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(fs)], check=True)
    try:
        fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        assert full.value.errno == errno.ENOSPC
        (fs / "empty").mkdir()
        for repo, left in ((fs / "new" / "repo", {"filler", "empty"}),
                           (fs / "empty", {"filler", "empty"})):
            capsys.readouterr()
            assert main(["repo", "init", str(repo)]) == 8
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert "No space left on device" in err, err
            assert {p.name for p in fs.iterdir()} == left
            assert not any((fs / "empty").iterdir())
        (fs / "filler").unlink()
        assert main(["repo", "init", str(fs / "empty")]) == 0
        assert main(["repo", "ls", str(fs / "empty")]) == 0
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_a_receive_warning_is_one_line_of_the_cli(tmp_path: Path) -> None:
    """``repo add`` of a stream with an xattr this filesystem refuses (``btrfs.compression``
    off btrfs): the receive's warning is one line ``btrdelta repo add: warning: ...``; it
    came in Python's warnings format (``.../applier.py:567: RuntimeWarning: ...`` and the
    line of code), as the CLI gave the library no ``on_warning``."""
    import sys

    from btrdelta.stream.records import End, Mkfile, SetXattr, Write
    from tests.receive.helpers import stream_bytes, subvol

    if "btrfs" in subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)],
                                 capture_output=True, text=True, check=False).stdout:
        pytest.skip("the xattr is kept on btrfs: nothing to warn about")
    stream = tmp_path / "a.stream"
    stream.write_bytes(stream_bytes([
        subvol(b"A"), Mkfile(path=b"f", ino=257), Write(path=b"f", offset=0, data=b"x\n"),
        SetXattr(path=b"", name=b"btrfs.compression", data=b"zlib"), End()]))
    root = tmp_path / "repo"
    assert main(["repo", "init", str(root)]) == 0
    got = subprocess.run([sys.executable, "-m", "btrdelta", "repo", "add", str(root), "a",
                          str(stream)], capture_output=True, text=True, check=False,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    warned = [ln for ln in got.stderr.splitlines() if "btrfs.compression" in ln]
    assert warned == ["btrdelta repo add: warning: extended attribute btrfs.compression not "
                      "supported here; skipped"], got.stderr
    assert "RuntimeWarning" not in got.stderr
    assert Repo(root).load().versions[0].name == "a"
