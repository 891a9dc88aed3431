"""A new user's mistakes found in session 22's trial, each through the CLI: one line naming
what and where, the documented exit code, nothing made or left half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from btrdelta.cli import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def _signed_repo(tmp_path: Path, tree: Path, repo: Path) -> str:
    """REPO holding TREE as version 1.0, signed by a root key made in ``tmp_path``: that
    key's path without ``.key``/``.pub``."""
    key = str(tmp_path / "root")
    for argv in (["key", "generate", "-o", key], ["repo", "init", str(repo)],
                 ["repo", "add", str(repo), "1.0", str(tree)],
                 ["repo", "sign", str(repo), "--key", f"{key}.key"]):
        assert main([*argv, "-q"]) == 0, argv
    return key


def test_replicate_into_its_own_source(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``replicate SRC SRC`` (and ``replicate SRC SRC/sub``) exited 0 having made
    SRC/SRC.DATE, a copy of SRC inside itself, and the receiver's state files
    (.btrdelta-replica.json, .lock) in SRC, which the next send would carry."""
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(os.urandom(4096))
    before = _listing(src)
    store = tmp_path / "store"
    for dest, said in ((src, f"DEST {src} is SOURCE"),
                       (src / "sub", f"DEST {src / 'sub'} is inside SOURCE {src}"),
                       (src / "sub" / "new", f"DEST {src / 'sub' / 'new'} is inside")):
        rc = main(["replicate", "--store", str(store), str(src), str(dest)])
        assert rc == 2, dest
        err = _err(capsys)
        assert err.startswith(f"btrdelta replicate: error: {said}"), err
        assert _listing(src) == before
    assert not store.exists()
    # a symbolic link to SOURCE is SOURCE; a directory beside it is fine
    (tmp_path / "link").symlink_to(src)
    assert main(["replicate", "--store", str(store), str(src), str(tmp_path / "link")]) == 2
    assert "is SOURCE" in _err(capsys)
    beside = tmp_path / "data-backup"
    beside.mkdir()
    assert main(["replicate", "-q", "--store", str(store), str(src), str(beside)]) == 0
    assert _listing(src) == before
    assert [p.name.startswith("data.") for p in beside.iterdir()
            if not p.name.startswith(".")] == [True]
    # another filesystem mounted inside SOURCE is apart from it (a send leaves it out):
    # `replicate / /mnt/usb` is a backup, not a mistake
    if os.geteuid() != 0:
        return
    import subprocess

    usb = src / "sub"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "usb", str(usb)], check=True)
    try:
        assert main(["replicate", "-q", "--store", str(store), str(src), str(usb)]) == 0
        assert [p.name.startswith("data.") for p in usb.iterdir()
                if not p.name.startswith(".")] == [True]
    finally:
        subprocess.run(["umount", str(usb)], check=True)
    assert _listing(src) == before


@pytest.mark.btrfs
def test_image_clone_that_fills_its_output_or_store_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'btrdelta image clone: error: No space left on device' and nothing more (a
    chunk's pwrite into --output, or into the store, does not say where)."""
    from btrdelta.testing.loopfs import loop_fs
    from tests.conftest import require_btrfs

    require_btrfs()  # loop devices
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(24 << 20))  # nothing compresses it: 24 MiB of chunks
    archive = tmp_path / "rootfs.bdar"
    assert main(["image", "compress", "-q", "-i", str(image), "-o", str(archive)]) == 0
    roomy = tmp_path / "store"
    roomy.mkdir()
    with loop_fs("ext4", size="16M") as small:
        for target, output, named in (
                ([], ["--output", str(small / "out.img")], small / "out.img"),
                ([str(small / "store" / "v1")], [], small / "store"),
                ([str(roomy / "v1")], ["--output", str(small / "out.img")],
                 small / "out.img")):
            capsys.readouterr()
            assert main(["image", "clone", "-q", str(archive), *target, *output]) == 8
            err = _err(capsys)
            assert err == f"btrdelta image clone: error: {named}: No space left on device\n"
            assert not (small / "out.img").exists()


def test_a_timestamp_that_is_not_json_is_malformed_input_named_by_its_url(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mirror's timestamp.json cut short (a sync that stopped half-way): `repo ls URL`
    said 'timestamp.json: not valid JSON' (no URL), while `repo ls --key` and `update` said
    the URL but exit 5, a checksum or signature mismatch; now all three exit 3 (malformed
    input, the README's table) and name the file by its URL; DEST is left as it was."""
    from btrdelta.transport.server import StaticServer

    tree, repo, dest = tmp_path / "tree", tmp_path / "repo", tmp_path / "dest"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(10_000))
    key = _signed_repo(tmp_path, tree, repo)
    stamp = repo / "timestamp.json"
    stamp.write_bytes(stamp.read_bytes()[:40])
    dest.mkdir()
    server = StaticServer(repo)
    with server.running():
        url = server.url.rstrip("/")
        for argv in (["repo", "ls", url], ["repo", "ls", url, "--key", f"{key}.pub"],
                     ["update", "-q", url, str(dest), "--key", f"{key}.pub"]):
            capsys.readouterr()
            assert main(argv) == 3, argv
            err = _err(capsys)
            command = "update" if argv[0] == "update" else "repo ls"
            assert err.startswith(f"btrdelta {command}: error: {url}/timestamp.json: "
                                  "not valid JSON: "), err
    assert os.listdir(dest) == []


@pytest.mark.parametrize("given", ["3de7c545", "49a0...", "3de7c545fe9b15ea" * 3,
                                   "z" * 64])
def test_device_expect_sum_that_is_not_a_tree_sum(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str) -> None:
    """Before: a prefix of the tree-sum (``device status`` shows 16 digits; the docs wrote
    '49a09e77...') was taken, the whole release received, then refused (exit 5, 'the
    release's is 3de7c545'). Now a usage error before anything is read."""
    (tmp_path / "v1-v2.delta").write_bytes(b"")
    for argv in (["device", "install", str(tmp_path), str(tmp_path / "v1-v2.delta")],
                 ["device", "init", str(tmp_path), "--factory", str(tmp_path)]):
        try:
            rc = main([*argv, "--expect-sum", given])
        except SystemExit as exc:  # argparse's
            rc = exc.code
        assert rc == 2, argv
        err = _err(capsys)
        assert err.startswith(f"btrdelta {argv[0]} {argv[1]}: error: argument --expect-sum: "
                              f"{given!r} is not a tree-sum: the 64 hex digits "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1-v2.delta"]


def test_update_into_its_repository_and_repo_add_of_a_tree_holding_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``update REPO REPO`` (the same path twice) wrote REPO/1.0 and the client's
    state (root.pub, download cache) into the publisher's REPO/.btrdelta, exit 0; ``repo
    add REPO V TREE`` with REPO inside TREE failed with 'the release tree does not survive
    a send stream round trip: differs: REPO/.btrdelta/tmp/full-N.stream ...' (exit 5)."""
    tree, repo = tmp_path / "tree", tmp_path / "repo"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(10_000))
    key = _signed_repo(tmp_path, tree, repo)
    capsys.readouterr()
    before = _listing(repo)
    for dest, how in ((repo, "is"), (repo / "sub", "is inside")):
        for url in (str(repo), f"file://{repo}"):
            assert main(["update", url, str(dest), "--key", f"{key}.pub"]) == 2
            assert _err(capsys).startswith(
                f"btrdelta update: error: DEST {dest} {how} the repository "), (dest, url)
            assert _listing(repo) == before
    # the tree holding the repository (or being it)
    inner = tree / "www"
    assert main(["repo", "init", "-q", str(inner)]) == 0
    made = _listing(inner)
    for where, source, how in ((inner, tree, "is inside"), (inner, inner, "is")):
        assert main(["repo", "add", str(where), "1.0", str(source)]) == 2
        assert _err(capsys).startswith(
            f"btrdelta repo add: error: REPO {where} {how} SOURCE {source}: "), where
        assert _listing(inner) == made


def test_a_stream_given_as_a_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``receive -f http://server/A.stream DEST`` (image clone, update and device
    install take URLs; receive does not) said 'http://server/A.stream: No such file or
    directory', exit 1. Now a usage error saying how to read it (curl ... | receive)."""
    url = "http://updates.example/A-B.stream"
    dest = tmp_path / "my dest"
    dest.mkdir()
    cases = ((["receive", "-f", url, str(dest)], f"btrdelta receive '{dest}'"),
             (["receive", url, str(dest)], f"btrdelta receive '{dest}'"),
             (["receive", "--dump", url], "btrdelta receive --dump"),
             (["dump", url], "btrdelta dump ... -"),
             (["verify", url], "btrdelta verify ... -"),
             (["delta", "make", "--old", str(tmp_path), "-f", url, "-o", str(tmp_path / "d")],
              "btrdelta delta make ... -"))
    for argv, piped in cases:
        assert main(argv) == 2, argv
        assert _err(capsys) == (f"btrdelta {' '.join(argv[:2]) if argv[0] == 'delta' else argv[0]}"
                                f": error: {url} is a URL: streams are read from a file or "
                                f"standard input; download it, or pipe it in: curl -fsS {url} "
                                f"| {piped}\n"), argv
    assert sorted(tmp_path.rglob("*")) == [dest]


@pytest.mark.btrfs
def test_device_install_from_a_repository_without_its_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``device install FS file:///REPO`` (the help: 'a versions repository URL
    (http(s)://, or file:// for a directory)') installed the repository's own files as a
    tree, exit 0 (the file:// was taken off before the source was looked at); over http,
    FS an image file, 'no root key: give --key ROOT_PUB (it is remembered in
    /tmp/btrdelta-device-XXXX/.btrdelta/fetch/.btrdelta/root.pub)', a temporary mount
    point gone when the command ends. Given once, the key is remembered."""
    import subprocess

    from tests.conftest import require_btrfs

    require_btrfs()
    tree, repo = tmp_path / "tree", tmp_path / "repo"
    for d in ("etc", "var", "home"):
        (tree / d).mkdir(parents=True)
    (tree / "etc/hostname").write_text("device\n")
    key = _signed_repo(tmp_path, tree, repo)
    image = tmp_path / "dev.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    assert main(["device", "init", "-q", str(image), "--factory", str(tree)]) == 0
    capsys.readouterr()
    url = f"file://{repo}"
    assert main(["device", "install", "-q", str(image), url]) == 1
    assert _err(capsys) == (f"btrdelta device install: error: {url}: no root key: give --key "
                            "ROOT_PUB (the device remembers it once an install from the "
                            "repository verified with it)\n")
    assert main(["device", "install", "-q", str(image), url, "--key", f"{key}.pub"]) == 0
    assert main(["device", "install", "-q", str(image), url]) == 0
    capsys.readouterr()
    assert main(["device", "status", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["roots"]["b"]["release"] == "1.0"


def test_a_repository_named_by_one_of_its_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``update https://host/app/timestamp.json DEST`` (the file a user finds on
    the mirror) said '.../timestamp.json/timestamp.json: HTTP 404: no signed repository
    here' after the connection attempts (exit 7). Now a usage error naming the base URL."""
    dest = tmp_path / "dest"
    base = "http://updates.invalid/app"
    cases = ((["update", f"{base}/timestamp.json", str(dest)], "URL", "timestamp.json"),
             (["update", base, str(dest), "--mirror", f"{base}/index.html"], "--mirror",
              "index.html"),
             (["repo", "ls", f"{base}/index.html?x=1"], "REPO|URL", "index.html"),
             (["device", "install", str(tmp_path), f"{base}/timestamp.json"], "SOURCE",
              "timestamp.json"))
    for argv, what, leaf in cases:
        assert main(argv) == 2, argv
        named = next(w for w in argv if w.startswith(f"{base}/"))
        command = " ".join(argv[:1] if argv[0] == "update" else argv[:2])
        assert _err(capsys) == (f"btrdelta {command}: error: {what} {named} names the "
                                f"repository's {leaf}: give the repository's base URL: "
                                f"{base}\n"), argv
    assert list(tmp_path.iterdir()) == []


def test_repo_gc_keeping_no_index_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: exit 1 (an 'other error'), as if the repository had failed."""
    repo = tmp_path / "repo"
    assert main(["repo", "init", "-q", str(repo)]) == 0
    made = _listing(repo)
    assert main(["repo", "gc", str(repo), "--keep-indexes", "0"]) == 2
    assert _err(capsys) == ("btrdelta repo gc: error: --keep-indexes must be at least 1 (the "
                            "current index)\n")
    assert _listing(repo) == made


def test_replicate_listen_and_tcp_addresses(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``--listen 127.0.0.1:99999`` was 'internal error: OverflowError: bind(): port
    must be 0-65535' (exit 1), an address without a port exit 1 (not a usage error), and
    ``--listen ADDR DEST`` with DEST not made 'destination DEST is not a directory'."""
    dest = tmp_path / "dest"
    dest.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    for argv, text in (
            (["--listen", "127.0.0.1:99999", "--no-auth", str(dest)], "'127.0.0.1:99999'"),
            (["--listen", "127.0.0.1", "--no-auth", str(dest)], "'127.0.0.1'"),
            ([str(src), "tcp://127.0.0.1:70000", "--no-auth"], "'127.0.0.1:70000'"),
            ([str(src), "tcp://127.0.0.1", "--no-auth"], "'127.0.0.1'")):
        assert main(["replicate", "--store", str(tmp_path / "store"), *argv]) == 2, argv
        assert _err(capsys) == ("btrdelta replicate: error: not HOST:PORT (a port 0-65535): "
                                f"{text}\n"), argv
    missing = tmp_path / "not made"
    assert main(["replicate", "--listen", "127.0.0.1:0", "--no-auth", str(missing)]) == 1
    assert _err(capsys) == (f"btrdelta replicate: error: destination {missing} does not exist "
                            f"(make it first: mkdir -p '{missing}')\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]


def test_levels_chunk_sizes_and_tries_out_of_range_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``image compress --level 99`` 'internal error: ValueError: level must be less
    than 23' (exit 1); ``repo init --level 99`` made a repository whose every ``repo add``
    then failed 'catalog.json: level: not an integer in [-100, 22]' (exit 3); ``--avg-chunk
    1`` exit 3, as if an input were malformed; ``device init/install --tries 0`` exit 1."""
    image = tmp_path / "img"
    image.write_bytes(os.urandom(1 << 16))
    repo = tmp_path / "repo"
    for argv, said in (
            (["image", "compress", "-i", str(image), "-o", str(tmp_path / "a.bdar"),
              "--level", "99"], "argument --level: not a zstd level (-100 to 22): '99'"),
            (["image", "compress", "-i", str(image), "-o", str(tmp_path / "a.bdar"),
              "--avg-chunk", "1"],
             "argument --avg-chunk: not an average chunk size the chunker takes (256 to 4M): "
             "'1'"),
            (["repo", "init", str(repo), "--level", "23"],
             "argument --level: not a zstd level (-100 to 22): '23'"),
            (["repo", "init", str(repo), "--avg-chunk", "8M"],
             "argument --avg-chunk: not an average chunk size the chunker takes (256 to 4M): "
             "'8M'"),
            (["device", "init", str(tmp_path), "--factory", str(image), "--tries", "0"],
             "argument --tries: not a positive number: '0'"),
            (["device", "install", str(tmp_path), str(image), "--tries", "-1"],
             "argument --tries: not a positive number: '-1'")):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's
            rc = exc.code
        assert rc == 2, argv
        err = _err(capsys)
        assert err.startswith(f"btrdelta {argv[0]} {argv[1]}: error: {said}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]
    # the range's ends are taken, and the repository made at them takes a release
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(5000))
    assert main(["repo", "init", "-q", str(repo), "--level", "-100", "--avg-chunk", "256"]) == 0
    assert main(["repo", "add", "-q", str(repo), "1.0", str(tree)]) == 0
    assert main(["image", "compress", "-q", "-i", str(image), "-o", str(tmp_path / "b.bdar"),
                 "--level", "22", "--avg-chunk", "4M"]) == 0


def test_a_dash_meant_as_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``delta make --old OLD -f A-B.stream -`` (the README writes ``delta make ... -``; the
    '-' meant as standard output) said only 'give the input either with -f or as an
    argument, not both'."""
    stream = tmp_path / "A-B.stream"
    stream.write_bytes(b"")
    for sub in ("make", "expand"):
        assert main(["delta", sub, "--old", str(tmp_path), "-f", str(stream), "-"]) == 2
        assert _err(capsys) == (f"btrdelta delta {sub}: error: give the input either with -f "
                                "or as an argument, not both: the output is -o FILE ('-o -': "
                                "standard output)\n")
    assert main(["verify", "-f", str(stream), "-"]) == 2  # (no output there: no hint)
    assert _err(capsys).endswith("not both\n")
