"""A new user's mistakes found in session 20's trial, each through the CLI: one line naming
what was meant, the documented exit code, nothing made or removed (and what the user saw
on a terminal)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from btrdelta.cli import main
from tests.conftest import btrfs_loop, committed_streams, read_pty

STREAM = next(s for s in committed_streams() if ".A." in s.name)  # a full stream


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _release(tmp_path: Path) -> tuple[Path, Path, Path]:
    """OLD (a tree), the stream OLD -> NEW sent by btrdelta (1-2.stream) and its delta
    (1-2.delta), all in ``tmp_path``."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "f").write_text("one\n" * 100)
    shutil.copytree(old, new)
    (new / "f").write_text("one\n" * 100 + "two\n")
    stream, delta = tmp_path / "1-2.stream", tmp_path / "1-2.delta"
    assert main(["send", "-p", str(old), str(new), "-o", str(stream)]) == 0
    assert main(["delta", "make", "-q", "-f", str(stream), "--old", str(old), "-o",
                 str(delta)]) == 0
    return old, stream, delta


def _on_a_terminal(args: list[str], *, stdout_too: bool,
                   ) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``btrdelta ARGS`` with standard error (and standard output too, or piped) on a
    pseudo-terminal; the process and what the terminal showed."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "btrdelta", *args],
                              stdin=subprocess.DEVNULL,
                              stdout=slave if stdout_too else subprocess.PIPE, stderr=slave,
                              text=True, timeout=300, check=False)
        os.set_blocking(master, False)
        shown = read_pty(master).decode()
    finally:
        os.close(master)
        os.close(slave)
    return proc, shown


def test_image_gc_of_a_directory_that_is_no_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the served directory of archives said 'description is 5000160 bytes,
    expected 160...' (exit 3: its archives read as damaged descriptions), a directory
    holding no store 'removed 0 chunks ... kept 0' (exit 0), and either would have lost
    its files named like a store's leftovers (.NAME.tmp-*)."""
    (tmp_path / "rootfs.img").write_bytes(os.urandom(1 << 20) * 3)
    www = tmp_path / "www"
    www.mkdir()
    assert main(["image", "compress", "-q", "-i", str(tmp_path / "rootfs.img"),
                 "-o", str(www / "rootfs.bdar")]) == 0
    (www / ".notes.tmp-1").write_text("mine\n")
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / ".cfg.tmp-2").write_text("mine\n")
    for where in (www, other):
        before = sorted(p.name for p in where.iterdir())
        assert main(["image", "gc", str(where)]) == 1
        err = _err(capsys)
        assert err.startswith("btrdelta image gc: error: ")
        assert f"path '{where}': not a chunk store (no chunks/ directory" in err
        assert sorted(p.name for p in where.iterdir()) == before
    # a store image clone made is still collected
    store = tmp_path / "store"
    assert main(["image", "clone", "-q", str(www / "rootfs.bdar"), f"{store}/v1"]) == 0
    assert main(["image", "gc", "-q", str(store)]) == 0


@pytest.mark.parametrize("source", [STREAM.name, "rootfs.bdar", "http://127.0.0.1:9/os"])
def test_device_install_with_its_arguments_swapped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str) -> None:
    """Before: '1-2.stream is not a btrfs filesystem: a device's filesystem is made with
    mkfs.btrfs...' (exit 1), as if the stream were to be laid out."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    shutil.copy(STREAM, tmp_path / STREAM.name)
    (tmp_path / "rootfs.img").write_bytes(os.urandom(1 << 16))
    assert main(["image", "compress", "-q", "-i", str(tmp_path / "rootfs.img"),
                 "-o", str(tmp_path / "rootfs.bdar")]) == 0
    given = source if "://" in source else str(tmp_path / source)
    kind = {STREAM.name: "a btrfs send stream", "rootfs.bdar": "a btrdelta chunk archive"}
    assert main(["device", "install", given, str(disk)]) == 2
    err = _err(capsys)
    what = "a URL" if "://" in source else kind[source]
    assert f"error: FS {given} is {what}" in err
    assert err.rstrip().endswith(f"the device's filesystem comes first: "
                                 f"btrdelta device install {disk} {given}")
    assert disk.stat().st_blocks == 0  # (nothing written: not even formatted)


@pytest.mark.parametrize(("dest", "says"), [
    ("ssh://root@127.0.0.1:2222pool/data", "port '2222pool' is not a number"),
    ("ssh://root@127.0.0.1", "not ssh://[user@]host[:port]/path: 'ssh://root@127.0.0.1'"),
])
def test_replicate_to_a_malformed_ssh_url(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], dest: str, says: str) -> None:
    """Before: ssh ran and said "Bad port '2222pool'" (exit 7, a transport error) for a
    slash left out; a URL without its path was exit 1."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    store = tmp_path / "store"
    assert main(["replicate", str(src), dest, "--store", str(store),
                 "--ssh", "ssh -o BatchMode=yes -o ConnectTimeout=1"]) == 2
    assert says in _err(capsys)
    assert not store.exists()


def test_sign_with_the_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: 'release.pub: not a PEM or OpenSSH private key', as if the file were
    damaged."""
    monkeypatch.chdir(tmp_path)
    assert main(["key", "generate", "-o", "release"]) == 0
    capsys.readouterr()
    shutil.copy(STREAM, tmp_path / "a.stream")
    assert main(["sign", "a.stream", "--key", "release.pub"]) == 3
    assert "release.pub: a public key, not a private one: give the private key (the .key " \
           "file `btrdelta key generate` wrote beside the .pub)" in _err(capsys)
    assert not (tmp_path / "a.stream.sig").exists()
    assert main(["sign", "a.stream", "--key", "release.key"]) == 0


def test_sendshot_prune_that_deletes_nothing_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: nothing at all was printed (exit 0), with -n too: did it run?"""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    store = tmp_path / "store"
    assert main(["send", str(src), "-o", str(tmp_path / "full.stream"), "--record",
                 "--store", str(store)]) == 0
    capsys.readouterr()
    for dry in ([], ["-n"]):
        assert main(["sendshot", "prune", "--keep", "1", "--store", str(store), *dry]) == 0
        out = capsys.readouterr().out
        assert out == f"nothing to prune: 1 record kept (0 held by a receiver's cursor); " \
                      f"store {store}\n"
    assert main(["sendshot", "prune", "--keep", "1", "--store", str(store), "-q"]) == 0
    assert capsys.readouterr().out == ""


def test_repo_add_on_a_terminal_says_its_steps_without_an_empty_bar(tmp_path: Path) -> None:
    """Before: a byte bar that never moved ('repo add: 0.00B [00:32, ?B/s]') under every
    step line, and '1 deltas on 1 processes'."""
    repo, v1, v2 = tmp_path / "repo", tmp_path / "v1", tmp_path / "v2"
    for tree, text in ((v1, "one\n" * 500), (v2, "one\n" * 500 + "two\n")):
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "f").write_text(text)
    assert main(["repo", "init", str(repo)]) == 0
    assert main(["repo", "add", "-q", str(repo), "1", str(v1)]) == 0
    proc, err = _on_a_terminal(["repo", "add", str(repo), "2", str(v2)], stdout_too=False)
    assert proc.returncode == 0, err
    assert proc.stdout.startswith("2 (#2): ")
    lines = err.replace("\r\n", "\n").splitlines()
    assert "repo add: 2: 1 delta on 1 process (" in err
    assert any(ln.startswith("repo add: 2: checking the delta from 1 (") for ln in lines), err
    assert all(ln.startswith("repo add: 2: ") and ln.endswith(" s)") for ln in lines), err
    assert "B/s" not in err
    assert "\r" not in err.replace("\r\n", "")


def test_a_sendshot_is_named_by_the_name_it_was_sent_as(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README's `send /pool/data -o full.stream --record --name data.1`, then
    `--from-sendshot data.1`: before, "not a sendshot id: 'data.1' (hex digest or
    'latest')" (exit 6), and `sendshot show data.1` the same."""
    src, store, dest = tmp_path / "data", tmp_path / "store", tmp_path / "dest"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("one\n" * 1000)
    dest.mkdir()
    common = ["--store", str(store)]
    assert main(["send", str(src), "-o", str(tmp_path / "full.stream"), "--record",
                 "--name", "data.1", *common]) == 0
    (src / "d" / "f").write_text("one\n" * 1000 + "two\n")
    (src / "g").write_text("new\n")
    assert main(["send", str(src), "-o", str(tmp_path / "inc.stream"), "--from-sendshot",
                 "data.1", "--record", "--name", "data.2", *common]) == 0
    for stream in ("full.stream", "inc.stream"):
        assert main(["receive", "-q", "-f", str(tmp_path / stream), str(dest)]) == 0
    capsys.readouterr()
    assert main(["tree-sum", "--ignore-root-mtime", str(dest / "data.2"),
                 "--compare", str(src)]) == 0
    capsys.readouterr()
    assert main(["sendshot", "list", "--json", *common]) == 0
    ids = {r["name"]: r["id"] for r in json.loads(capsys.readouterr().out)}
    assert main(["sendshot", "show", "--json", "data.2", *common]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == ids["data.2"]
    # a name two records have is no answer; a name no record has says what is accepted
    assert main(["send", str(src), "-o", str(tmp_path / "again.stream"), "--from-sendshot",
                 "data.1", "--record", "--name", "data.2", *common]) == 0
    capsys.readouterr()
    assert main(["sendshot", "show", "data.2", *common]) == 6
    assert f"2 sendshots are named 'data.2' in {store}: give the id of one" in _err(capsys)
    assert main(["sendshot", "delete", "data.9", *common]) == 6
    assert "no sendshot id or name 'data.9'" in _err(capsys)
    assert main(["sendshot", "delete", "-q", "data.1", *common]) == 0
    assert main(["sendshot", "list", "--json", *common]) == 0
    assert ids["data.1"] not in {r["id"] for r in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize(("words", "says"), [
    (["recieve", "-f", "A.stream", "/tmp"], "invalid choice: 'recieve' (choose from "),
    (["delta", "mak", "-f", "A.stream"], "invalid choice: 'mak' (choose from "),
    (["help"], "invalid choice: 'help' (choose from "),
    (["-q", "receive", "-f", "A.stream", "/tmp/x"], "unrecognized arguments: -q; "),
    (["--debug", "-q", "--progress", "image", "clone", "U", "--output", "x"],
     "unrecognized arguments: -q --progress; "),
])
def test_a_mistyped_command_or_an_option_before_it(tmp_path: Path, words: list[str],
                                                   says: str) -> None:
    """Before: the choices listed, or 'unrecognized arguments: -q', and no more."""
    proc = subprocess.run([sys.executable, "-m", "btrdelta", *words], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr
    meant = {"recieve": "did you mean 'receive'?", "mak": "did you mean 'make'?",
             "help": "help: btrdelta --help, btrdelta COMMAND --help",
             "receive": "a command's options go after its name: "
                        "btrdelta receive -q -f A.stream /tmp/x",
             "image": "a command's options go after its name: "
                      "btrdelta --debug image clone -q --progress U --output x"}
    key = next(w for w in words if w in meant)
    assert proc.stderr.endswith(f"; {meant[key]} (see {proc.stderr.split(':')[0]} --help)\n")
    assert list(tmp_path.iterdir()) == []


def test_image_clone_into_the_store_alone(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """STORE/NAME given as the store: before, an existing directory said "is a directory,
    not a file to write" (exit 1), and 'images/' made the description a file named
    'images' beside the chunks (exit 0), where the user meant a directory."""
    (tmp_path / "rootfs.img").write_bytes(os.urandom(1 << 20) * 2)
    archive = tmp_path / "rootfs-v2.bdar"
    assert main(["image", "compress", "-q", "-i", str(tmp_path / "rootfs.img"),
                 "-o", str(archive)]) == 0
    (tmp_path / "there").mkdir()
    for target, what in ((tmp_path / "there", "a directory"),
                         (f"{tmp_path}/images/", "a directory's name (ends with /)")):
        assert main(["image", "clone", str(archive), str(target)]) == 2
        meant = f"{str(target).rstrip('/')}/rootfs-v2"
        assert _err(capsys).endswith(
            f"error: STORE/NAME {target} is {what}: give the image's name in the store "
            f"too: btrdelta image clone {archive} {meant}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs-v2.bdar", "rootfs.img",
                                                          "there"]
    assert list((tmp_path / "there").iterdir()) == []
    assert main(["image", "clone", "-q", str(archive), f"{tmp_path}/images/rootfs-v2"]) == 0
    assert main(["image", "verify", "-q", f"{tmp_path}/images/rootfs-v2"]) == 0


@pytest.mark.btrfs
def test_device_mount_backup_and_restore_mistakes(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a mount point not made yet 'is not a directory'; a state subvolume the
    device lacks named no one it has; `restore FS home SRC --to-dir DIR` (the switch
    read as taking a value) 'unrecognized arguments: DIR' alone."""
    release = tmp_path / "release"
    for d in ("etc", "var", "home", "usr/bin"):
        (release / d).mkdir(parents=True)
    (release / "etc/hostname").write_text("device\n")
    with btrfs_loop(size="256M") as fs:
        assert main(["device", "init", "-q", str(fs), "--factory", str(release),
                     "--state", "etc:/etc:overlay", "--state", "home:/home:bind"]) == 0
        capsys.readouterr()
        sysroot = tmp_path / "sysroot"
        assert main(["device", "mount", str(fs), str(sysroot)]) == 1
        assert _err(capsys).endswith(f"error: {sysroot} does not exist (make it first: "
                                     f"mkdir -p {sysroot})\n")
        backups = tmp_path / "backups"
        assert main(["device", "backup", str(fs), "hmoe", str(backups)]) == 1
        assert "no state subvolume 'hmoe' (the device's: etc, home)" in _err(capsys)
        assert main(["device", "backup", "-q", str(fs), "home", str(backups)]) == 0
        copy = tmp_path / "copy"
        copy.mkdir()
        with pytest.raises(SystemExit) as stop:
            main(["device", "restore", str(fs), "home", str(backups), "--to-dir", str(copy)])
        assert stop.value.code == 2
        assert _err(capsys).endswith(
            f"--to-dir takes no value (FS is then the directory): btrdelta device restore "
            f"{copy} home {backups} --to-dir (see btrdelta device restore --help)\n")
        assert main(["device", "restore", "-q", str(copy), "home", str(backups),
                     "--to-dir"]) == 0
        assert main(["tree-sum", str(copy / "home.1"), "--compare",
                     str(fs / "state/home")]) == 0
        capsys.readouterr()
        # (was 'kept -' when nothing was kept)
        assert main(["device", "factory-reset", str(fs)]) == 0
        assert capsys.readouterr().out == ("factory reset: root factory; reset etc, home; "
                                           "kept none; reboot now\n")
        assert not sysroot.exists()


def test_https_to_a_plain_http_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'cannot connect: [SSL: WRONG_VERSION_NUMBER] wrong version number
    (_ssl.c:992)', after every retry (the answer does not change)."""
    import socketserver
    import threading

    connections = []

    class Plain(socketserver.BaseRequestHandler):
        def handle(self) -> None:  # an HTTP server's answer to a TLS hello
            connections.append(1)
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Plain) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"https://127.0.0.1:{server.server_address[1]}"
            assert main(["image", "clone", f"{url}/v2.bdar", "--output",
                         str(tmp_path / "v2.img"), "--retries", "2"]) == 7
            assert _err(capsys).endswith(
                f"error: {url}/v2.bdar: TLS: the server did not answer in TLS "
                "(WRONG_VERSION_NUMBER): a plain HTTP server? (its URL is then http://)\n")
            assert len(connections) == 1
            assert main(["repo", "ls", f"{url}/app"]) == 7
            assert "a plain HTTP server? (its URL is then http://)" in _err(capsys)
        finally:
            server.shutdown()
    assert not (tmp_path / "v2.img").exists()


def test_key_generate_into_a_directory_not_made(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'DIR/release.key: No such file or directory', where every other output
    (send -o, delta make -o) says which directory is missing."""
    keys = tmp_path / "keys"
    assert main(["key", "generate", "-o", str(keys / "release")]) == 1
    assert _err(capsys).endswith(f"error: path '{keys}': directory does not exist\n")
    assert main(["send", str(tmp_path), "-o", str(keys / "x.stream")]) == 1
    assert _err(capsys).endswith(f"error: path '{keys}': directory does not exist\n")
    assert list(tmp_path.iterdir()) == []


def test_update_on_a_terminal_prints_its_plan_on_a_line_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the plan (standard output) followed the bar (standard error) on its line,
    on the same terminal: 'update: 0.00B [00:00, ?B/s]plan: from nothing to 1: ...'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v1" / "d").mkdir(parents=True)
    (tmp_path / "v1" / "d" / "f").write_text("one\n" * 100)
    for argv in (["repo", "init", "-q", "repo"], ["repo", "add", "-q", "repo", "1", "v1"],
                 ["key", "generate", "-o", "root"], ["key", "generate", "-o", "ts"],
                 ["repo", "sign", "repo", "--key", "root.key", "--timestamp-key", "ts.key"]):
        assert main(argv) == 0
    proc, out = _on_a_terminal(["update", "repo", "dest", "--key", "root.pub"], stdout_too=True)
    assert proc.returncode == 0, out
    at = out.index("plan: from nothing to 1: 1 hop")
    assert out[at - 1] in "\r\n", out  # (the bar cleared: it ends in a carriage return)
    assert "1 is in dest/1" in out


@pytest.mark.parametrize(("dest", "argv"), [
    ("ssh://root@[::1]:2222/pool/data", "-p 2222 root@::1"),
    ("ssh://[::1]:2222/pool/data", "-p 2222 ::1"),
    ("ssh://root@nas:2222/pool/data", "-p 2222 root@nas"),
    ("ssh://root@[::1]/pool/data", "root@::1"),
])
def test_replicate_ssh_urls_give_ssh_its_host_and_port(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], dest: str, argv: str) -> None:
    """Before: 'ssh://root@[::1]:2222/pool/data' ran `ssh root@[::1]:2222 ...` (ssh: Could
    not resolve hostname [::1]:2222), the port not taken out with a user before the
    brackets. The ssh here only says what it was given (as the receiver's last words)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    fake = "sh -c 'echo \"$@\" >&2' ssh"
    assert main(["replicate", str(src), dest, "--store", str(tmp_path / "store"),
                 "--ssh", fake]) == 7
    assert _err(capsys).endswith(f"{dest} said: {argv} btrdelta replicate --serve "
                                 "/pool/data\n")


def test_repo_add_that_finishes_planned_jobs_says_where_its_full_went(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: '2 (#2): stream 2.5 KiB, 0 of 0 chunks new (0 B), ...' after `repo add
    --plan-only` and `repo run-job` had stored the full and made the delta."""
    repo, v1, v2 = tmp_path / "repo", tmp_path / "v1", tmp_path / "v2"
    for tree, text in ((v1, "one\n" * 500), (v2, "one\n" * 500 + "two\n")):
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "f").write_text(text)
    assert main(["repo", "init", "-q", str(repo)]) == 0
    assert main(["repo", "add", str(repo), "1", str(v1)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("1 (#1): stream ")
    assert " chunks new (" in first
    assert main(["repo", "add", str(repo), "2", str(v2), "--plan-only"]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert main(["repo", "run-job", job["command"][-1]]) == 0
    capsys.readouterr()
    assert main(["repo", "add", str(repo), "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 (#2): stream ")
    assert ", its full stored by the repo add that began it, full download " in lines[0]
    assert lines[1].startswith("  delta from 1: ")
    assert main(["repo", "ls", "--json", str(repo)]) == 0
    assert len(json.loads(capsys.readouterr().out)["versions"]) == 2


@pytest.mark.parametrize("words", [["replicate", "{missing}", "{tmp}"],
                                   ["sendshot", "create", "{missing}"],
                                   ["serve", "{missing}", "--port", "0"]])
def test_a_source_that_does_not_exist_is_not_called_not_a_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], words: list[str]) -> None:
    """Before: "path '/data': not a directory" for a path that is not there at all (a
    typo), as for a file."""
    missing = tmp_path / "data"
    argv = [w.format(missing=missing, tmp=tmp_path) for w in words]
    assert main([*argv, "--store", str(tmp_path / "store")] if words[0] != "serve"
                else argv) == 1
    assert _err(capsys).endswith(f"error: path '{missing}': does not exist\n")
    missing.write_text("a file\n")
    assert main([*argv, "--store", str(tmp_path / "store")] if words[0] != "serve"
                else argv) == 1
    assert _err(capsys).endswith(f"error: path '{missing}': not a directory\n")


def test_image_clone_of_a_casync_index_with_a_store_not_there(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "/srv/castr: chunk 3f2a... is in none of the stores" (exit 6), as if the
    store lacked a chunk, for a --castr directory that does not exist (a typo)."""
    from tests.chunk.test_casync import casync_make

    blob = tmp_path / "rootfs.img"
    blob.write_bytes(os.urandom(1 << 18) * 2)
    index, store = casync_make(blob, tmp_path)
    out = tmp_path / "out.img"
    typo = tmp_path / "rootfs.castr"
    assert main(["image", "clone", str(index), "--output", str(out), "--castr",
                 str(typo)]) == 6
    assert _err(capsys).endswith(f"is in none of the stores ({typo}: no such directory)\n")
    assert not out.exists()
    # a store not there among others that are is passed over, as before
    assert main(["image", "clone", "-q", str(index), "--output", str(out), "--castr",
                 str(typo), "--castr", str(store)]) == 0
    assert out.read_bytes() == blob.read_bytes()


@pytest.mark.btrfs
def test_device_init_force_with_a_wrong_factory_keeps_the_device(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `device init --force` deleted every root and state subvolume, then failed on
    the factory ('No such file or directory', a tar's 'bad magic', an incremental stream's
    missing parent): no device left at all, status 'not a btrdelta device'."""
    release = tmp_path / "release"
    for d in ("etc", "var", "home"):
        (release / d).mkdir(parents=True)
    (release / "etc/hostname").write_text("device\n")
    incremental = next(s for s in committed_streams() if ".B." in s.name)
    garbage = tmp_path / "rootfs.tar"
    garbage.write_bytes(b"./\0" + os.urandom(4000))
    with btrfs_loop(size="256M") as fs:
        assert main(["device", "init", "-q", str(fs), "--factory", str(release)]) == 0
        assert main(["device", "status", "--json", str(fs)]) == 0
        before = json.loads(capsys.readouterr().out)
        (fs / "state/home/notes").write_text("mine\n")
        for factory, code, says in (
                (tmp_path / "rootfs-1.stram", 1, "No such file or directory (the factory release"),
                (garbage, 3, "expected a full btrfs send stream"),
                (incremental, 1, "an incremental stream (btrfs send -p)")):
            assert main(["device", "init", str(fs), "--factory", str(factory),
                         "--force"]) == code
            err = _err(capsys)
            assert f"error: {factory}: " in err
            assert says in err
            assert main(["device", "status", "--json", str(fs)]) == 0
            assert json.loads(capsys.readouterr().out) == before
            assert (fs / "state/home/notes").read_text() == "mine\n"


def test_an_output_named_as_the_input_is_refused(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `image compress -i rootfs.img -o rootfs.img` replaced the image by its
    archive, `delta make -f A-B.stream -o A-B.stream` the stream by its delta (exit 0):
    outputs are written beside and renamed over, so the input was read whole first."""
    monkeypatch.chdir(tmp_path)
    old, _, _ = _release(tmp_path)
    (tmp_path / "rootfs.img").write_bytes(os.urandom(1 << 16) * 2)
    saved = {n: (tmp_path / n).read_bytes() for n in ("1-2.stream", "rootfs.img")}
    for argv in (["delta", "make", "-f", "1-2.stream", "--old", str(old), "-o", "./1-2.stream"],
                 ["delta", "make", "1-2.stream", "--old", str(old), "-o", "1-2.stream"],
                 ["image", "compress", "-i", "rootfs.img", "-o", str(tmp_path / "rootfs.img")]):
        assert main(argv) == 2
        output = argv[argv.index("-o") + 1]
        assert _err(capsys).endswith(f"error: -o {output} is the input file: the output "
                                     "would replace it (give it another name)\n")
    assert main(["delta", "make", "-q", "-f", "1-2.stream", "--old", str(old), "-o",
                 "1-2.delta"]) == 0
    (tmp_path / "again.delta").write_bytes((tmp_path / "1-2.delta").read_bytes())
    assert main(["delta", "expand", "-f", "again.delta", "--old", str(old), "-o",
                 "again.delta"]) == 2
    assert "error: -o again.delta is the input file" in _err(capsys)
    assert {n: (tmp_path / n).read_bytes() for n in saved} == saved
    assert (tmp_path / "again.delta").read_bytes() == (tmp_path / "1-2.delta").read_bytes()


def test_a_delta_stream_where_a_send_stream_is_read_says_what_reads_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'expected a btrfs send stream, this is a btrdelta delta stream', and no
    word of what reads one (dump, stat of the send stream, delta make of a delta)."""
    old, stream, delta = _release(tmp_path)
    capsys.readouterr()
    for argv in (["dump", str(delta)],
                 ["delta", "make", "-f", str(delta), "--old", str(old), "-o",
                  str(tmp_path / "x")]):
        assert main(argv) == 3
        assert _err(capsys).endswith(
            f"{delta}: offset 0: expected a btrfs send stream, this is a btrdelta delta "
            "stream (`btrdelta delta stat` tells what it holds; `btrdelta delta expand "
            "--old OLD` gives its send stream)\n")
    assert main(["delta", "stat", str(delta)]) == 0
    assert main(["delta", "expand", "-f", str(delta), "--old", str(old), "-o",
                 str(tmp_path / "again.stream")]) == 0
    assert (tmp_path / "again.stream").read_bytes() == stream.read_bytes()


def test_image_verify_of_an_archive_says_it_takes_a_store_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "www/v2.bdar: description is 47717349 bytes, expected 76888" (exit 3) for
    `image verify` (or mount, nbd) of the archive itself, not of STORE/NAME."""
    (tmp_path / "rootfs.img").write_bytes(os.urandom(1 << 18) * 2)
    archive = tmp_path / "rootfs.bdar"
    assert main(["image", "compress", "-q", "-i", str(tmp_path / "rootfs.img"),
                 "-o", str(archive)]) == 0
    assert main(["image", "verify", str(archive)]) == 3
    assert _err(capsys).endswith(
        f"{archive}: a whole chunk archive, not a store's image description (image verify, "
        "mount and nbd take the STORE/NAME image clone made; image info reads an archive)\n")
    assert main(["image", "clone", "-q", str(archive), f"{tmp_path}/store/rootfs"]) == 0
    assert main(["image", "verify", "-q", f"{tmp_path}/store/rootfs"]) == 0
    assert main(["image", "info", str(archive)]) == 0


def test_image_commands_given_a_stream_say_what_it_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'not a btrdelta chunk archive (bad magic)' for a send stream or a delta
    stream given to image clone or info (a release file mistaken for its image)."""
    _, stream, delta = _release(tmp_path)
    capsys.readouterr()
    assert main(["image", "clone", str(stream), "--output", str(tmp_path / "x.img")]) == 3
    assert _err(capsys).endswith(
        f"{stream}: offset 0: not a btrdelta chunk archive: this is a btrfs send stream "
        "(btrdelta receive, dump and stat read it; image compress makes an archive of a "
        "disk image)\n")
    assert main(["image", "info", str(delta)]) == 3
    assert _err(capsys).endswith(
        f"{delta}: offset 0: not a btrdelta chunk archive: this is a btrdelta delta stream "
        "(btrdelta receive and delta expand read it)\n")
    assert not (tmp_path / "x.img").exists()


def test_an_output_on_a_read_only_filesystem_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "error: .: Read-only file system" (the directory's temporary file, opened
    as '.'), for send -o, delta make -o, image compress -o on a read-only mount."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "f").write_text("x\n")
        (tmp_path / "rootfs.img").write_bytes(os.urandom(1 << 16))
        for argv, out in ((["send", str(tmp_path / "tree"), "-o"], ro / "x.stream"),
                          (["image", "compress", "-i", str(tmp_path / "rootfs.img"), "-o"],
                           ro / "x.bdar")):
            assert main([*argv, str(out)]) == 1
            assert _err(capsys).endswith(f"error: {out}: Read-only file system\n")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert list(ro.iterdir()) == []


def test_repo_add_of_an_incremental_stream_says_what_it_takes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`repo add` of an incremental stream (session 29's trial: its parent not a release
    there) named the repository's staging subvolume and said to receive the parent into
    ``.btrdelta/trees``; it says what it is and what `repo add` takes, and adds nothing."""
    _, stream, _ = _release(tmp_path)
    repo = tmp_path / "www" / "app"
    assert main(["repo", "init", "-q", str(repo)]) == 0
    capsys.readouterr()
    assert main(["repo", "add", str(repo), "2", str(stream)]) == 6
    err = _err(capsys)
    assert err.startswith(f"btrdelta repo add: error: {stream}: an incremental stream"), err
    assert "a directory, a read-only snapshot or a full stream" in err, err
    assert ".incoming" not in err, err
    assert ".btrdelta" not in err, err
    assert not [p.name for p in (repo / ".btrdelta" / "trees").iterdir()]
    assert main(["repo", "ls", "--json", str(repo)]) == 0
    assert json.loads(capsys.readouterr().out)["versions"] == []


def test_sendshot_prune_says_which_records_it_keeps_as_bases(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sends of a btrfs subvolume record patch records, each on the one before; `prune
    --keep 1` (or a --grid) keeps the newest with its chain of bases. Before, the line
    said '4 records kept (0 held by a receiver's cursor)' and nothing of why: the grid
    seemed not to work."""
    with btrfs_loop(size="256M") as fs:
        subprocess.run(["btrfs", "subvolume", "create", str(fs / "src")], check=True,
                       capture_output=True)
        store = tmp_path / "store"
        for i in range(4):
            (fs / "src" / "f").write_text(f"{i}\n" * (i + 1))
            subprocess.run(["sync", "-f", str(fs / "src")], check=True)
            assert main(["send", str(fs / "src"), "-o", os.devnull, "--record", "--name",
                         f"src.{i}", "--store", str(store), "-q",
                         *(["--from-sendshot", "latest"] if i else [])]) == 0
        capsys.readouterr()
        assert main(["sendshot", "list", "--store", str(store), "--json"]) == 0
        records = json.loads(capsys.readouterr().out)
        bases = {r["base"] for r in records} - {None}
        assert len(records) == 4, records
        assert len(bases) == 3, records  # one chain: 3 patch records
        assert main(["sendshot", "prune", "--keep", "1", "--store", str(store), "-n"]) == 0
        assert capsys.readouterr().out == (
            "nothing to prune: 4 records kept (0 held by a receiver's cursor, 3 the base "
            f"of a kept patch record); store {store}\n")



@pytest.mark.parametrize("side", ["--peer", "--allow"])
def test_replicate_given_the_other_sides_private_key_refuses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], side: str) -> None:
    """Session 32's trial: `--peer nas.key` (the server's private key copied to the
    client, where its public key belongs) was taken silently and the replication went
    on, and `--listen --allow laptop.key` listened; a private key here is the other
    side's secret in the wrong place: said in one line (exit 2), nothing connected or
    listened on. (`--key laptop.pub`, the reverse mix-up, was already refused.)"""
    for name in ("nas", "laptop"):
        assert main(["key", "generate", "-q", "-o", str(tmp_path / name)]) == 0
    (tmp_path / "src").mkdir()
    (tmp_path / "dest").mkdir()
    capsys.readouterr()
    if side == "--peer":  # (port 9, discard: a refusal after a connect would say so)
        argv = ["replicate", "src", "tcp://127.0.0.1:9", "--key", "laptop.key", "--peer",
                "nas.key", "--store", "store"]
    else:
        argv = ["replicate", "--listen", "127.0.0.1:0", "--key", "nas.key", "--allow",
                "laptop.key", "dest"]
    key = "nas.key" if side == "--peer" else "laptop.key"
    # (a child with a timeout: before, the listener listened until killed)
    proc = subprocess.run([sys.executable, "-m", "btrdelta", *argv], cwd=tmp_path,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"btrdelta replicate: error: {key} is a private key: give the other side's public "
        f"key ({key[:-4]}.pub beside it; a private key never leaves its machine)\n")
    assert sorted(os.listdir(tmp_path)) == ["dest", "laptop.key", "laptop.pub", "nas.key",
                                            "nas.pub", "src"]
    assert os.listdir(tmp_path / "dest") == []


def test_replicate_with_a_lost_store_names_the_option_that_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Session 32's trial: a sender whose sendshot store is gone (or another store) meets
    a receiver holding this source: `no-common-base` said '(allow a full stream to add
    one)' without naming how; it names `--full`, which then adds a full one (exit 0)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "f").write_text("one\n")
    assert main(["replicate", str(src), str(dest), "--store", str(tmp_path / "s1"),
                 "-q"]) == 0
    held = sorted(os.listdir(dest))
    capsys.readouterr()
    lost = ["replicate", str(src), str(dest), "--store", str(tmp_path / "s2"), "-q"]
    assert main(lost) == 9
    err = _err(capsys)
    assert err.startswith("btrdelta replicate: error: no-common-base: the receiver holds "
                          "src."), err
    assert err.endswith("(replicate --full adds a full one beside them)\n"), err
    assert sorted(os.listdir(dest)) == held
    assert main([*lost, "--full"]) == 0
    assert len(os.listdir(dest)) == len(held) + 1


def test_replicate_serve_on_a_terminal_says_what_runs_it(tmp_path: Path) -> None:
    """Session 32's trial: `btrdelta replicate --serve /backup` typed at a terminal wrote
    the protocol's binary HELLO onto it (and the receiver's state file into DEST), then
    said 'interrupted ...; the transfer can resume'. The protocol cannot cross a terminal
    (its line discipline changes bytes), so a standard output that is one is refused: one
    line naming who runs --serve, exit 2, nothing written into DEST."""
    dest = tmp_path / "backup"
    dest.mkdir()
    proc, shown = _on_a_terminal(["replicate", "--serve", str(dest)], stdout_too=True)
    assert proc.returncode == 2, shown
    assert shown == ("btrdelta replicate: error: --serve speaks the replication protocol on "
                     "its standard input and output, not to a terminal: it is what `btrdelta "
                     f"replicate SOURCE {dest}` (or ssh://HOST{dest}) runs\r\n"), shown
    assert os.listdir(dest) == []
