"""What session 24's new-user trial found, each through the CLI: damaged or misplaced files
get one line naming what and where and the documented exit code; nothing is made where it
does not belong."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrdelta.chunk.castr import read_caibx
from btrdelta.chunk.casync import chunk_file_name
from btrdelta.cli import main
from btrdelta.receive.registry import REGISTRY_NAME
from tests.chunk.images import ImagePair
from tests.chunk.test_casync import casync_make
from tests.cli.test_mutations import N, copy, mutations, run, snapshot
from tests.cli.test_newuser22_mistakes import _signed_repo


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    return err


def _listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


@pytest.fixture
def received(tmp_path: Path) -> tuple[Path, Path]:
    """DEST holding v1 (received from `btrdelta send`'s stream of a plain tree) and the
    incremental stream v1 -> v2."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for tree, data in ((v1, b"one\n"), (v2, b"two\n")):
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "f").write_bytes(data * 1000)
    assert main(["send", "-q", str(v1), "-o", str(tmp_path / "v1.stream")]) == 0
    assert main(["send", "-q", "-p", str(v1), str(v2), "-o", str(tmp_path / "v2.stream")]) == 0
    dest = tmp_path / "dest"
    dest.mkdir()
    assert main(["receive", "-q", "-f", str(tmp_path / "v1.stream"), str(dest)]) == 0
    return dest, tmp_path / "v2.stream"


def test_receive_into_dest_whose_registry_is_a_directory(
        received: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Before: an incremental receive said 'internal error: TypeError: expected str, bytes
    or os.PathLike object, not int' (exit 1): the failed open of the registry carried a
    descriptor, not a name."""
    dest, stream = received
    registry = dest / REGISTRY_NAME
    registry.unlink()
    registry.mkdir()
    before = _listing(dest)
    assert main(["receive", "-f", str(stream), str(dest)]) == 3
    err = _err(capsys)
    assert err.startswith(f"btrdelta receive: error: {registry}: "), err
    assert err.rstrip().endswith("invalid subvolume registry: not a regular file"), err
    assert _listing(dest) == before


@pytest.mark.parametrize(("change", "said"), [
    (lambda e: e.update(name=7), "entry 0, name: not a string"),
    (lambda e: e.pop("uuid"), "entry 0: no 'uuid'"),
    (lambda e: e.update(parent_uuid=1.5), "entry 0, parent_uuid: not a string"),
    (lambda e: e.update(received_at=None), "entry 0, received_at: not a number"),
    (lambda e: e.update(ctransid=-1), "entry 0, ctransid: -1 is out of range"),
], ids=["name", "uuid", "parent_uuid", "received_at", "ctransid"])
def test_receive_into_dest_whose_registry_entry_is_damaged(
        received: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
        change: object, said: str) -> None:
    """Before: Python's own words ("'uuid'", "'float' object has no attribute 'replace'",
    "float() argument must be ...") after 'invalid subvolume registry:', or (a number as the
    name) the entry taken as "7" and the parent reported missing (exit 6)."""
    dest, stream = received
    registry = dest / REGISTRY_NAME
    doc = json.loads(registry.read_bytes())
    change(doc["subvols"][0])  # type: ignore[operator]
    registry.write_text(json.dumps(doc))
    before = _listing(dest)
    assert main(["receive", "-f", str(stream), str(dest)]) == 3
    err = _err(capsys)
    assert err.startswith(f"btrdelta receive: error: {registry}: "), err
    assert err.rstrip().endswith(f"invalid subvolume registry: {said}"), err
    assert _listing(dest) == before


def test_image_verify_of_an_archive_makes_no_lock_beside_it(
        image_pair: ImagePair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `image verify www/rootfs.bdar` (an archive, not a store's STORE/NAME) and a
    damaged or foreign file given to it left an empty `.lock` in the archive's directory, a
    file the web server then served."""
    www = tmp_path / "www"
    www.mkdir()
    shutil.copyfile(image_pair.arc1, www / "rootfs.bdar")
    (www / "notes.txt").write_text("mine\n")
    before = _listing(www)
    assert main(["image", "verify", str(www / "rootfs.bdar")]) == 3
    assert "a whole chunk archive, not a store's image description" in _err(capsys)
    assert main(["image", "verify", str(www / "notes.txt")]) == 3
    assert "archive header truncated" in _err(capsys)
    assert _listing(www) == before
    # a store image clone made is still locked as before
    assert main(["image", "clone", "-q", str(www / "rootfs.bdar"),
                 str(tmp_path / "store" / "v1")]) == 0
    assert main(["image", "verify", "-q", str(tmp_path / "store" / "v1")]) == 0
    assert (tmp_path / "store" / ".lock").is_file()


def test_image_clone_of_a_casync_index_whose_chunk_file_is_a_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'btrdelta image clone: error: Is a directory' (exit 1), naming nothing."""
    blob = tmp_path / "blob"
    blob.write_bytes(random.Random(24).randbytes(200_000))
    index_path, store = casync_make(blob, tmp_path, "--chunk-size=16384")
    index, _ = read_caibx(str(index_path))
    chunk = store / chunk_file_name(index.digests[0])
    chunk.unlink()
    chunk.mkdir()
    out = tmp_path / "out.img"
    assert main(["image", "clone", str(index_path), "--castr", str(store),
                 "--output", str(out)]) == 3
    err = _err(capsys)
    assert err == (f"btrdelta image clone: error: {chunk}: a chunk file that is not a regular "
                   "file\n"), err
    assert not out.exists()


def test_update_from_a_repository_directory_whose_pack_is_a_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'btrdelta update: error: Is a directory' (exit 1), naming nothing."""
    tree = tmp_path / "v1"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(random.Random(1).randbytes(300_000))
    repo = tmp_path / "repo"
    key = _signed_repo(tmp_path, tree, repo)
    packs = sorted((repo / "packs").iterdir())
    solids = sorted((repo / "solids").iterdir())
    for pack in packs + solids:
        pack.unlink()
        pack.mkdir()
    dest = tmp_path / "dest"
    assert main(["update", "-q", str(repo), str(dest), "--key", f"{key}.pub"]) == 7
    warning, err = capsys.readouterr().err.split("\n", 1)  # (the solid full, the packs)
    assert err.count("\n") == 1, err
    assert "Traceback" not in err, err
    assert warning.startswith("btrdelta update: warning: "), warning
    assert f"{solids[0]}: Is a directory; its chunks come from the packs instead" in warning
    assert err.startswith("btrdelta update: error: "), err
    assert any(err.endswith(f"{pack}: Is a directory\n") for pack in packs), err
    assert not (dest / "1.0").exists()


def _json_mutations(doc: object, n: int, seed: str) -> Iterator[tuple[str, bytes]]:
    """``n`` copies of JSON ``doc`` with one value replaced by one of another type, or one
    key deleted, named by what was done."""
    def paths(obj: object, at: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
        yield at
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
            if isinstance(obj, list) else ()
        for k, v in items:
            yield from paths(v, (*at, k))

    rng = random.Random(seed)
    every = [p for p in paths(doc) if p]
    for i in range(n):
        copy_ = json.loads(json.dumps(doc))
        at = rng.choice(every)
        parent = copy_
        for k in at[:-1]:
            parent = parent[k]
        if i % 3 == 0 and isinstance(parent, dict):
            del parent[at[-1]]
            what = f"{at} deleted"
        else:
            value = rng.choice([None, -1, 2 ** 70, 1.5, "", "../x", [], {}, True])
            parent[at[-1]] = value
            what = f"{at} = {value!r}"
        yield what, json.dumps(copy_).encode()


def test_damaged_registry_of_dest(received: tuple[Path, Path], tmp_path: Path,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    """DEST's registry damaged (bytes and JSON values) under an incremental receive: an
    exit code of the table with one error line, DEST as it was; or the new version."""
    from btrdelta.tree import tree_sum

    dest, stream = received
    pristine = tmp_path / "pristine"
    copy(dest, pristine)
    expected = tree_sum(tmp_path / "v2")
    data = (pristine / REGISTRY_NAME).read_bytes()
    damaged = [*mutations(data, N, "registry"),
               *_json_mutations(json.loads(data), N, "registry")]
    for what, content in damaged:
        shutil.rmtree(dest)
        copy(pristine, dest)
        (dest / REGISTRY_NAME).write_bytes(content)
        before = snapshot(dest)
        if run(capfd, ["receive", "-q", "-f", str(stream), str(dest)], what):
            assert snapshot(dest) == before, f"{what}: DEST changed"
        else:
            assert tree_sum(dest / "v2") == expected, what


def test_damaged_fulls_of_a_repository(tmp_path: Path,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    """A version's full (its chunk index and its packs) damaged under `update` into an empty
    DEST (test_mutations damages a delta hop): one error line and no DEST/VERSION, or the
    version exactly."""
    from btrdelta.tree import tree_sum

    tree = tmp_path / "v1"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(random.Random(2).randbytes(200_000) * 2)
    (tree / "small").write_text("small\n")
    repo = tmp_path / "repo"
    pub = f"{_signed_repo(tmp_path, tree, repo)}.pub"
    expected = tree_sum(tree)
    dest = tmp_path / "dest"
    for path in [*(repo / "fulls").iterdir(), *(repo / "packs").iterdir()]:
        data = path.read_bytes()
        try:
            for what, content in mutations(data, N // 2, path.name):
                what = f"{path.parent.name}: {what}"
                path.write_bytes(content)
                if run(capfd, ["update", "-q", str(repo), str(dest), "--key", pub], what):
                    assert not (dest / "1.0").exists(), what
                else:
                    assert tree_sum(dest / "1.0") == expected, what
                shutil.rmtree(dest)
        finally:
            path.write_bytes(data)


def test_key_generate_into_a_directory(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `key generate -o keys` (a directory) wrote keys.key and keys.pub beside it,
    and `-o keys/` wrote the hidden keys/.key and keys/.pub, exit 0."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for given in (str(keys), f"{keys}/", f"{tmp_path}/new/"):
        assert main(["key", "generate", "-o", given]) == 2
        err = _err(capsys)
        assert err.startswith(f"btrdelta key generate: error: -o {given} names a directory: "
                              "-o names the pair without its suffix, e.g. -o "), err
    assert _listing(tmp_path) == ["keys"]
    assert main(["key", "generate", "-q", "-o", str(keys / "release")]) == 0
    assert _listing(keys) == ["release.key", "release.pub"]


def test_a_damaged_repository_file_is_named_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: 'REPO/REPO/index/1.json: wrong bytes ...' (a path that does not exist),
    'REPO/timestamp.json: timestamp.json: signatures[0]: ...', 'REPO/bins/H.json:
    bins/H.json is larger than N bytes'."""
    tree = tmp_path / "v1"
    tree.mkdir()
    (tree / "f").write_text("one\n")
    repo = tmp_path / "repo"
    pub = f"{_signed_repo(tmp_path, tree, repo)}.pub"
    timestamp, index = repo / "timestamp.json", repo / "index" / "1.json"
    (the_bin,) = (repo / "bins").iterdir()
    kept = {p: p.read_bytes() for p in (timestamp, index, the_bin)}
    doc = json.loads(kept[timestamp])
    doc["signatures"][0]["key_id"] = "x"
    for path, damaged, said in (
            (index, b"", f"{index}: wrong bytes (0 bytes, expected"),
            (timestamp, json.dumps(doc).encode(), f"{timestamp}: signatures[0]: malformed "
                                                  "signature: key_id is not 64"),
            (the_bin, kept[the_bin] * 2, f"{the_bin}: larger than {len(kept[the_bin])} "
                                         "bytes")):
        path.write_bytes(damaged)
        for argv in (["repo", "ls", str(repo), "--key", pub],
                     ["update", "-q", str(repo), str(tmp_path / "dest"), "--key", pub]):
            assert main(argv) in (3, 5), (path, argv)
            err = _err(capsys)
            assert err.startswith(f"btrdelta {' '.join(argv[:2]).removesuffix(' -q')}: "
                                  f"error: {said}"), err
        path.write_bytes(kept[path])
