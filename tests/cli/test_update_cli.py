"""``btrdelta update`` and ``repo ls`` against a new user's mistakes with their arguments:
one line naming what was meant, exit 2, nothing written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from btrdelta.cli import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_url_and_dest_swapped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'every mirror failed: DEST: timestamp.json: No such file or directory' (exit
    7), as if DEST were a repository."""
    dest = tmp_path / "dest"
    assert main(["update", str(dest), "http://127.0.0.1:9/app", "--dry-run"]) == 2
    err = _err(capsys)
    assert f"DEST http://127.0.0.1:9/app is a URL: the repository comes first: " \
           f"btrdelta update http://127.0.0.1:9/app {dest}" in err
    assert not dest.exists()


@pytest.mark.parametrize(("argv", "meant"), [
    (["update", "127.0.0.1:8000/app", "D"], "URL 127.0.0.1:8000/app"),
    (["update", "updates.example/app", "D"], "URL updates.example/app"),
    (["update", "http://127.0.0.1:9/app", "D", "--mirror", "localhost:8000/app"],
     "--mirror localhost:8000/app"),
    (["repo", "ls", "mirror.example:8080/app"], "REPO|URL mirror.example:8080/app"),
])
def test_a_url_without_its_scheme(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                  meant: str) -> None:
    """Before: 'every mirror failed: 127.0.0.1:8000/app: timestamp.json: No such file or
    directory: no signed repository here' (exit 7): read as a local directory."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--dry-run"] if argv[0] == "update" else argv) == 2
    location = meant.split()[-1]
    assert f"{meant}: no such directory; a URL needs its scheme: http://{location}" \
        in _err(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_named_like_a_host_is_a_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror's copy in a directory that happens to read as host/path is used as one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mirror.example" / "app").mkdir(parents=True)
    assert main(["key", "generate", "-o", "root"]) == 0
    capsys.readouterr()
    assert main(["update", "mirror.example/app", "D", "--key", "root.pub", "--dry-run"]) == 7
    assert "no signed repository here" in _err(capsys)


def test_repo_add_with_version_and_source_swapped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "version name '/build/app-1.0' must be 1-128 of A-Z a-z ..." (exit 1)."""
    tree = tmp_path / "app-1.0"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    repo = tmp_path / "www"
    assert main(["repo", "init", str(repo)]) == 0
    capsys.readouterr()
    assert main(["repo", "add", str(repo), str(tree), "1.0"]) == 2
    assert f"VERSION {tree} is a path: the version's name comes first: btrdelta repo add " \
           f"{repo} 1.0 {tree}" in _err(capsys)
    assert main(["repo", "add", str(repo), "1.0", str(tree), "-q"]) == 0
    capsys.readouterr()
    assert main(["repo", "ls", str(repo)]) == 0
    assert capsys.readouterr().out.startswith("1 version, 0 deltas; ")


def test_repo_ls_says_which_version_is_unfinished(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A version whose add was cut short or waits for its --plan-only jobs was listed as any
    other; `repo sign` then refused it. Now the listing says so and how to finish it."""
    import json

    repo = tmp_path / "www"
    trees = []
    for i in (1, 2):
        tree = tmp_path / f"app-{i}"
        tree.mkdir()
        (tree / "f").write_bytes(b"release %d\n" % i * 3000)
        trees.append(tree)
    assert main(["repo", "init", str(repo)]) == 0
    assert main(["repo", "add", str(repo), "1", str(trees[0]), "-q"]) == 0
    assert main(["repo", "add", str(repo), "2", str(trees[1]), "--plan-only", "-q"]) == 0
    capsys.readouterr()
    assert main(["repo", "ls", str(repo)]) == 0
    out = capsys.readouterr().out
    assert out.count("unfinished") == 1
    assert f"unfinished (an add cut short, or delta jobs pending): `btrdelta repo add {repo} " \
           "2` finishes it" in out
    assert main(["repo", "ls", str(repo), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["unfinished"] for v in listed["versions"]] == [False, True]
    assert main(["repo", "add", str(repo), "2", "-q"]) == 0
    capsys.readouterr()
    assert main(["repo", "ls", str(repo)]) == 0
    assert "unfinished" not in capsys.readouterr().out


def test_dest_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'afile: File exists' (exit 1)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["update", "http://127.0.0.1:9/app", str(afile)]) == 2
    assert f"DEST {afile} is not a directory: DEST holds versions as DEST/VERSION" \
        in _err(capsys)


def _signed_repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A repository of one version, signed with ``tmp_path/root.key``."""
    tree, repo = tmp_path / "tree", tmp_path / "repo"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 1000)
    assert main(["key", "generate", "-o", str(tmp_path / "root"), "-q"]) == 0
    assert main(["repo", "init", str(repo), "-q"]) == 0
    assert main(["repo", "add", str(repo), "v1", str(tree), "-q"]) == 0
    assert main(["repo", "sign", str(repo), "--key", str(tmp_path / "root.key"), "-q"]) == 0
    capsys.readouterr()
    return repo


def test_every_mirror_failed_names_the_file_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'timestamp.json: every mirror failed: REPO: timestamp.json: content differs
    ...', the file named again for each mirror."""
    repo = _signed_repo(tmp_path, capsys)
    ts = repo / "timestamp.json"
    doc = json.loads(ts.read_text())
    doc["signed"]["version"] += 1  # tampered: the signature no longer covers it
    ts.write_text(json.dumps(doc))
    empty = tmp_path / "empty"
    empty.mkdir()
    key = ["--key", str(tmp_path / "root.pub"), "--dry-run"]
    assert main(["update", str(repo), str(tmp_path / "d"), *key]) == 5
    err = _err(capsys)  # one mirror: its error alone
    assert err.startswith(f"btrdelta update: error: {repo}/timestamp.json: content differs "
                          "from what key "), err
    assert err.count("timestamp.json") == 1, err
    assert main(["update", str(empty), str(tmp_path / "d"), *key, "--mirror", str(repo)]) == 5
    err = _err(capsys)
    assert f"timestamp.json: every mirror failed: {empty}: No such file or directory: no " \
           f"signed repository here" in err
    assert f"; {repo}: content differs" in err
    assert err.count("timestamp.json:") == 1, err


def test_a_missing_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A local path that is not there (and does not read as host/path) is 'no such
    directory' (was: 'No such file or directory: no signed repository here' for update,
    'not a repository (no .btrdelta/catalog.json ...' for repo ls); a mirror that is missing
    is still skipped for the next one."""
    monkeypatch.chdir(tmp_path)
    repo = _signed_repo(tmp_path, capsys)
    (tmp_path / "file").write_bytes(b"x")
    key = ["--key", str(tmp_path / "root.pub"), "--dry-run"]
    for where, why in (("nowhere", "no such directory"), (str(tmp_path / "gone"),
                                                          "no such directory"),
                       ("file", "not a directory")):
        assert main(["update", where, "D", *key]) == 7
        assert _err(capsys) == f"btrdelta update: error: {where}: {why}\n"
        assert main(["repo", "ls", where]) == 1
        assert _err(capsys) == f"btrdelta repo ls: error: path {where!r}: {why}\n"
    assert main(["update", "nowhere", "D", *key, "--mirror", str(repo)]) == 0
    assert "plan: from nothing to v1" in capsys.readouterr().out
    assert not (tmp_path / "D" / "v1").exists()


def test_a_wrong_key_with_one_mirror_is_one_clear_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--key`` of another repository, one mirror (HTTP, and a local copy): one line
    naming the file and the key trusted, exit 5. Before: 'timestamp.json: every mirror
    failed: http://HOST/app: index/1.json: not signed by a trusted key (trusted: ...)',
    a file it did not fetch first, and a list of one."""
    from tests.update.conftest import Nginx

    repo = _signed_repo(tmp_path, capsys)
    assert main(["key", "generate", "-o", str(tmp_path / "other"), "-q"]) == 0
    capsys.readouterr()
    key = ["--key", str(tmp_path / "other.pub"), "--dry-run"]
    assert main(["update", str(repo), str(tmp_path / "d"), *key]) == 5
    err = _err(capsys)
    assert err.startswith(f"btrdelta update: error: {repo}/index/1.json: not signed by a "
                          "trusted key (trusted: "), err
    server = Nginx(repo, tmp_path / "nginx")
    try:
        url = server.url
        assert main(["update", url, str(tmp_path / "d"), *key]) == 5
    finally:
        server.stop()
    err = _err(capsys)
    assert err.startswith(f"btrdelta update: error: {url}/index/1.json: not signed by a "
                          "trusted key (trusted: "), err
    assert "every mirror" not in err, err
    assert err.count("json") == 1, err
    assert not (tmp_path / "d").exists()


@pytest.mark.btrfs
def test_a_full_dest_is_named_and_a_rerun_completes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DEST on a small btrfs without room for the release: one line naming DEST (it said
    only 'No space left on device', from a chunk written in the download store), nothing
    half-made shown as the version; once there is room, a re-run completes it."""
    from btrdelta.testing.loopfs import loop_fs
    from btrdelta.tree import tree_sum

    tree, repo = tmp_path / "tree", tmp_path / "repo"
    tree.mkdir()
    for i in range(6):  # 24 MiB that no compression makes smaller
        (tree / f"f{i}").write_bytes(os.urandom(4 << 20))
    assert main(["key", "generate", "-o", str(tmp_path / "root"), "-q"]) == 0
    assert main(["repo", "init", str(repo), "-q"]) == 0
    assert main(["repo", "add", str(repo), "v1", str(tree), "-q"]) == 0
    assert main(["repo", "sign", str(repo), "--key", str(tmp_path / "root.key"), "-q"]) == 0
    capsys.readouterr()
    with loop_fs("btrfs", size="256M") as fs:
        filler = fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        # the filesystem full (statvfs's free space is btrfs's estimate), then 12 MiB given
        # back: half the release
        with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
            while True:
                os.write(fd, os.urandom(1 << 20))
        assert full.value.errno == errno.ENOSPC
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - (12 << 20)))
        os.fsync(fd)
        os.close(fd)
        subprocess.run(["btrfs", "filesystem", "sync", str(fs)], check=True)
        dest = fs / "app"
        args = ["update", str(repo), str(dest), "--key", str(tmp_path / "root.pub"), "-q"]
        assert main(args) == 8
        err = _err(capsys)
        assert err.startswith(f"btrdelta update: error: {dest}"), err
        assert err.endswith(": No space left on device\n"), err
        assert not (dest / "v1").exists()
        filler.unlink()
        subprocess.run(["btrfs", "filesystem", "sync", str(fs)], check=True)
        assert main(args) == 0
        assert tree_sum(dest / "v1") == tree_sum(tree)


def test_an_unreachable_mirror_is_one_plain_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens, or the host has no address: exit 7, one line naming the file and
    what happened. Before: 'ConnectError: [Errno 111] Connection refused' (the client
    library's class and errno)."""
    key = _signed_repo(tmp_path, capsys).parent / "root.pub"
    for url, why in (("http://127.0.0.1:1/app", "Connection refused"),
                     ("http://no-such-host.invalid/app", "")):
        args = ["update", url, str(tmp_path / "d"), "--key", str(key), "--retries", "0"]
        assert main(args) == 7
        err = _err(capsys)
        assert err.startswith(f"btrdelta update: error: {url}/timestamp.json: cannot "
                              f"connect: {why}"), err
        assert "Errno" not in err, err
        assert "ConnectError" not in err, err
    assert not (tmp_path / "d").exists()
