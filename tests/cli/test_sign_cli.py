"""Signed payloads through the CLI on any filesystem: `key generate`, `send --sign`,
`delta make --sign`, `sign`, `verify --key`, `receive --key` (directory backend), archives.

Streams here come from `btrdelta send` of plain trees; the kernel-made ones are in
tests/update/test_signed_kernel.py. Tampering is refused with exit 5, one line, and nothing
under the subvolume's name (nor a temporary directory) in the destination.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from btrdelta.cli import main
from btrdelta.tree import tree_sum
from tests.update.signing import flip_in_write, refused, run


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(release private key, release public key, another public key), made by the CLI."""
    assert run("key", "generate", "-o", tmp_path / "release").returncode == 0
    assert run("key", "generate", "-o", tmp_path / "other").returncode == 0
    return tmp_path / "release.key", tmp_path / "release.pub", tmp_path / "other.pub"


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "v1"
    (a / "etc").mkdir(parents=True)
    (a / "etc" / "conf").write_bytes(b"setting = 1\n" * 300)
    (a / "lib.so").write_bytes(bytes(range(256)) * 4000)
    b = tmp_path / "v2"
    shutil.copytree(a, b, symlinks=True)
    data = bytearray((b / "lib.so").read_bytes())
    data[5000:5010] = b"patched!!!"
    (b / "lib.so").write_bytes(bytes(data))
    (b / "new").write_text("added in v2\n")
    return a, b


def only_names(dest: Path) -> list[str]:
    """What is in the destination, registry aside."""
    return sorted(p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json")


def test_key_generate_and_show(tmp_path: Path) -> None:
    proc = run("key", "generate", "-o", tmp_path / "k", "--json")
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    for f in ("k.key", "k.pub"):
        shown = json.loads(run("key", "show", "--json", tmp_path / f).stdout)
        assert shown["key_id"] == made["key_id"]
        assert shown["public_key_base64"] == made["public_key_base64"]
    before = (tmp_path / "k.key").read_bytes()
    refused(run("key", "generate", "-o", tmp_path / "k"), 1, "refusing to overwrite")
    assert (tmp_path / "k.key").read_bytes() == before
    help_text = run("key", "--help", process=True).stdout.decode()
    assert "examples:" in help_text
    assert "key generate -o" in help_text


def test_key_generate_output_named_like_the_private_key(tmp_path: Path) -> None:
    """`-o ci.key` (a new user naming the file they want) makes ci.key + ci.pub, not
    ci.key.key; the pair works: a payload signed with one verifies with the other."""
    for given in ("ci.key", "ci2.pub"):
        made = json.loads(run("key", "generate", "-o", tmp_path / given, "--json").stdout)
        stem = given.split(".")[0]
        assert made["private_key"] == str(tmp_path / f"{stem}.key")
        assert made["public_key"] == str(tmp_path / f"{stem}.pub")
        shown = json.loads(run("key", "show", "--json", tmp_path / f"{stem}.pub").stdout)
        assert shown["key_id"] == made["key_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci.key", "ci.pub", "ci2.key", "ci2.pub"]


def test_send_sign_verify_and_receive(tmp_path: Path, keys: tuple[Path, Path, Path],
                                      trees: tuple[Path, Path]) -> None:
    priv, pub, other = keys
    a, b = trees
    full, incr = tmp_path / "v1.stream", tmp_path / "v2.stream"
    assert run("send", a, "-o", full, "--sign", priv).returncode == 0
    assert run("send", b, "-p", a, "-o", incr, "--sign", priv).returncode == 0
    proc = run("verify", "--key", pub, incr)
    assert proc.returncode == 0, proc.stderr
    assert b"signed by key" in proc.stdout
    dest = tmp_path / "dest"
    dest.mkdir()
    for s in (full, incr):
        proc = run("receive", "-f", s, "--key", other, "--key", pub, dest)
        assert proc.returncode == 0, proc.stderr
    assert tree_sum(dest / "v2", ignore_root_mtime=True) == tree_sum(b, ignore_root_mtime=True)
    # stdin: the signature is named explicitly
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    refused(run("receive", "--key", pub, dest2, stdin=full.read_bytes()), 1, "--signature")
    proc = run("receive", "--key", pub, "--signature", f"{full}.sig", dest2,
               stdin=full.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert only_names(dest2) == ["v1"]


def test_tampering_is_refused_before_anything_is_visible(
    tmp_path: Path, keys: tuple[Path, Path, Path], trees: tuple[Path, Path]
) -> None:
    priv, pub, other = keys
    a, _ = trees
    good = tmp_path / "v1.stream"
    assert run("send", a, "-o", good, "--sign", priv).returncode == 0
    sig = json.loads(Path(f"{good}.sig").read_bytes())
    dest = tmp_path / "dest"
    dest.mkdir()

    def case(name: str, data: bytes, sig_obj: dict[str, object] | None) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        if sig_obj is not None:
            Path(f"{p}.sig").write_text(json.dumps(sig_obj))
        return p

    flipped = case("flipped", flip_in_write(good.read_bytes(), fix_crc=True), sig)
    crc_bad = case("crc", flip_in_write(good.read_bytes(), fix_crc=False), sig)
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[10] ^= 1  # one bit of the Ed25519 signature
    bad_sig = dict(sig, signature=base64.b64encode(raw).decode())
    tampered_sig = case("tampered-sig", good.read_bytes(), bad_sig)
    missing = case("unsigned", good.read_bytes(), None)
    trailing = case("trailing", good.read_bytes() + b"\0", sig)
    for path, key, match in [
        (flipped, pub, "content differs from what key"),
        (crc_bad, pub, "CRC32C mismatch"),
        (tampered_sig, pub, "does not verify"),
        (good, other, "not trusted"),
        (missing, pub, "no signature file"),
        (trailing, pub, ""),
    ]:
        proc = run("receive", "-f", path, "--key", key, dest, process=path is flipped)
        refused(proc, 5 if path is not trailing else 3, match)
        assert only_names(dest) == [], (path.name, only_names(dest))
        refused(run("verify", "--key", key, path), 5 if path is not trailing else 3, match)
    # the untampered stream still goes in
    assert run("receive", "-f", good, "--key", pub, dest).returncode == 0
    assert only_names(dest) == ["v1"]


def test_two_subvolumes_in_one_signed_input_are_refused(
    tmp_path: Path, keys: tuple[Path, Path, Path], trees: tuple[Path, Path]
) -> None:
    priv, pub, _ = keys
    a, b = trees
    one, two = tmp_path / "a.stream", tmp_path / "b.stream"
    assert run("send", a, "-o", one).returncode == 0
    assert run("send", b, "-o", two).returncode == 0
    both = tmp_path / "both.stream"
    both.write_bytes(one.read_bytes() + two.read_bytes())
    assert run("sign", both, "--key", priv).returncode == 0
    assert run("verify", "--key", pub, both).returncode == 0  # the signature is good...
    dest = tmp_path / "dest"
    dest.mkdir()
    # ... but the first subvolume would be committed before the end is read
    refused(run("receive", "-f", both, "--key", pub, dest), 3, "exactly one stream")
    assert only_names(dest) == []


def test_delta_signed_at_make_verifies_stream_delta_and_expansion(
    tmp_path: Path, keys: tuple[Path, Path, Path], trees: tuple[Path, Path]
) -> None:
    priv, pub, _ = keys
    a, b = trees
    full, incr = tmp_path / "v1.stream", tmp_path / "v2.stream"
    assert run("send", a, "-o", full).returncode == 0
    assert run("send", b, "-p", a, "-o", incr).returncode == 0
    delta = tmp_path / "v2.delta"
    proc = run("delta", "make", "-f", incr, "--old", a, "-o", delta, "--sign", priv)
    assert proc.returncode == 0, proc.stderr
    sig = Path(f"{delta}.sig")
    # one signature: the plain stream, the delta, and the delta's expansion
    assert run("verify", "--key", pub, "--signature", sig, incr).returncode == 0
    proc = run("verify", "--key", pub, delta)
    assert proc.returncode == 0, proc.stderr
    assert b"delta stream" in proc.stdout
    again = tmp_path / "again.stream"
    assert run("delta", "expand", "-f", delta, "--old", a, "-o", again).returncode == 0
    assert run("verify", "--key", pub, "--signature", sig, again).returncode == 0
    # `sign` on the delta signs the same content
    assert run("sign", delta, "--key", priv, "-o", tmp_path / "re.sig").returncode == 0
    assert json.loads((tmp_path / "re.sig").read_bytes())["digest"] == \
        json.loads(sig.read_bytes())["digest"]
    # received with the key: the parent first, then the delta
    dest = tmp_path / "dest"
    dest.mkdir()
    assert run("receive", "-f", full, dest).returncode == 0
    proc = run("receive", "-f", delta, "--key", pub, dest)
    assert proc.returncode == 0, proc.stderr
    assert tree_sum(dest / "v2", ignore_root_mtime=True) == tree_sum(b, ignore_root_mtime=True)


def test_delta_with_the_signature_of_another_stream_is_refused(
    tmp_path: Path, keys: tuple[Path, Path, Path], trees: tuple[Path, Path]
) -> None:
    priv, pub, _ = keys
    a, b = trees
    full, incr = tmp_path / "v1.stream", tmp_path / "v2.stream"
    assert run("send", a, "-o", full, "--sign", priv).returncode == 0
    assert run("send", b, "-p", a, "-o", incr).returncode == 0
    delta = tmp_path / "v2.delta"
    assert run("delta", "make", "-f", incr, "--old", a, "-o", delta).returncode == 0
    shutil.copyfile(f"{full}.sig", f"{delta}.sig")  # a valid signature, for other content
    dest = tmp_path / "dest"
    dest.mkdir()
    assert run("receive", "-f", full, "--key", pub, dest).returncode == 0
    refused(run("receive", "-f", delta, "--key", pub, dest), 5, "content differs")
    assert only_names(dest) == ["v1"]
    refused(run("verify", "--key", pub, delta), 5, "content differs")


def test_archives_sign_with_generated_keys(
    tmp_path: Path, keys: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub, other = keys
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * 8192 + b"tail")
    arc = tmp_path / "disk.bdar"
    assert main(["image", "compress", "-i", str(img), "-o", str(arc), "--sign", str(priv),
                 "--avg-chunk", "16K"]) == 0
    assert main(["image", "info", "--key", str(pub), str(arc)]) == 0
    assert main(["image", "clone", "--key", str(pub), str(arc), f"{tmp_path}/store/d"]) == 0
    assert main(["image", "verify", "--key", str(pub), f"{tmp_path}/store/d"]) == 0
    capsys.readouterr()
    assert main(["image", "clone", "--key", str(other), str(arc), f"{tmp_path}/s2/d"]) == 5
    assert "signature does not verify" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


def test_sign_and_send_need_a_signature_path_for_stdout(
    tmp_path: Path, keys: tuple[Path, Path, Path], trees: tuple[Path, Path]
) -> None:
    priv, pub, _ = keys
    a, _ = trees
    refused(run("send", a, "--sign", priv), 1, "--signature")
    proc = run("send", a, "--sign", priv, "--signature", tmp_path / "out.sig")
    assert proc.returncode == 0
    (tmp_path / "out.stream").write_bytes(proc.stdout)
    assert run("verify", "--key", pub, "--signature", tmp_path / "out.sig",
               tmp_path / "out.stream").returncode == 0
    refused(run("sign", "--key", tmp_path / "release.pub", tmp_path / "out.stream"), 3,
            "a public key, not a private one: give the private key")
