"""``btrdelta.trust``: keys, digests and the signature envelope, checked against OpenSSL
(key files, key IDs, the Ed25519 signature over the documented message) and OpenSSH."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from btrdelta.errors import BtrdeltaError, ChecksumError, SignatureError
from btrdelta.trust import (
    CONTEXT_STREAM,
    DIGEST_SHA256,
    ContentDigest,
    Hasher,
    Signature,
    check_signature,
    digest_bytes,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_text,
    read_signature,
    save_key_pair,
    sign,
    verify,
    write_signature,
)
from tests.conftest import spy_fsync

CONTENT = b"a send stream, or anything else whose digest is signed\n" * 1000


def _openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True,
                          check=True).stdout


def _content(data: bytes = CONTENT) -> ContentDigest:
    h = Hasher()
    h.update(data[:100])
    h.update(memoryview(data)[100:])
    return h.result()


def test_hasher_is_blake3_of_all_bytes_and_counts_them() -> None:
    c = _content()
    assert c.digest == blake3.blake3(CONTENT).digest()
    assert c.size == len(CONTENT)
    assert digest_bytes(CONTENT) == c
    assert digest_bytes(CONTENT, DIGEST_SHA256) == ContentDigest(
        "sha256", hashlib.sha256(CONTENT).digest(), len(CONTENT))


def test_generated_keys_are_openssl_keys_with_the_documented_id(tmp_path: Path) -> None:
    key = generate_key()
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    save_key_pair(key, str(priv), str(pub))
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    # OpenSSL reads both and derives the same public key
    assert _openssl("pkey", "-in", str(priv), "-pubout") == pub.read_bytes()
    raw = _openssl("pkey", "-pubin", "-in", str(pub), "-outform", "DER")[-32:]
    assert key_id(key) == hashlib.sha256(raw).hexdigest()
    assert public_key_text(key) == base64.b64encode(raw).decode()
    assert key_id(load_public_key(str(pub))) == key_id(load_private_key(str(priv)))


def test_key_files_are_never_overwritten(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    pub.write_text("someone's key\n")
    with pytest.raises(BtrdeltaError, match="exists"):
        save_key_pair(generate_key(), str(priv), str(pub))
    assert not priv.exists()  # checked before anything is written
    assert pub.read_text() == "someone's key\n"
    # a symlink planted at the private key's name is not followed
    pub.unlink()
    target = tmp_path / "victim"
    target.write_text("precious\n")
    priv.symlink_to(target)
    with pytest.raises(BtrdeltaError, match="exists"):
        save_key_pair(generate_key(), str(priv), str(pub))
    assert target.read_text() == "precious\n"


def test_every_documented_public_key_form_loads(tmp_path: Path) -> None:
    okey = tmp_path / "openssl.key"
    _openssl("genpkey", "-algorithm", "ed25519", "-out", str(okey))
    opub = tmp_path / "openssl.pub"
    opub.write_bytes(_openssl("pkey", "-in", str(okey), "-pubout"))
    want = key_id(load_private_key(str(okey)))
    b64 = tmp_path / "b64.pub"
    b64.write_text(public_key_text(load_public_key(str(opub))) + "\n")
    for path in (opub, okey, b64):
        assert key_id(load_public_key(str(path))) == want
    ssh = tmp_path / "ssh"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@host", "-f",
                    str(ssh)], check=True)
    assert key_id(load_public_key(f"{ssh}.pub")) == key_id(load_private_key(str(ssh)))


@pytest.mark.parametrize(("text", "match"), [
    (b"not a key\n", "not an Ed25519 public key"),
    (base64.b64encode(b"x" * 31) + b"\n", "not an Ed25519 public key"),
])
def test_bad_public_keys_are_one_line_errors(tmp_path: Path, text: bytes, match: str) -> None:
    p = tmp_path / "bad.pub"
    p.write_bytes(text)
    with pytest.raises(BtrdeltaError, match=match) as info:
        load_public_key(str(p))
    assert "\n" not in str(info.value)


def test_a_pem_public_key_is_read_without_cryptography_s_key_readers(tmp_path: Path) -> None:
    """An Ed25519 PEM public key (``key generate``'s, openssl's; CRLF lines too) is read
    from its DER without cryptography's ``serialization`` (its import is ~26 M
    instructions of an ``update``'s start), to the key openssl derives; a PEM public key
    of the same length with another algorithm (X25519) or another label still goes to
    cryptography's reader and is refused."""
    okey = tmp_path / "openssl.key"
    _openssl("genpkey", "-algorithm", "ed25519", "-out", str(okey))
    pem = _openssl("pkey", "-in", str(okey), "-pubout")
    raw = _openssl("pkey", "-in", str(okey), "-pubout", "-outform", "DER")[-32:]
    want = hashlib.sha256(raw).hexdigest()
    forms = {"lf.pub": pem, "crlf.pub": pem.replace(b"\n", b"\r\n")}
    for name, data in forms.items():
        (tmp_path / name).write_bytes(data)
    code = ("import sys\nfrom btrdelta.trust import key_id, load_public_key\n"
            f"print([key_id(load_public_key(p)) for p in {[str(tmp_path / n) for n in forms]!r}],"
            " 'cryptography.hazmat.primitives.serialization' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"{[want, want]!r} False"
    xkey = tmp_path / "x25519.key"
    _openssl("genpkey", "-algorithm", "x25519", "-out", str(xkey))
    xpub = tmp_path / "x25519.pub"
    xpub.write_bytes(_openssl("pkey", "-in", str(xkey), "-pubout"))
    assert len(xpub.read_bytes()) == len(pem)
    other = tmp_path / "other.pub"
    other.write_bytes(pem.replace(b"PUBLIC KEY", b"PUBLIC KEYS"))
    for path in (xpub, other):
        with pytest.raises(BtrdeltaError, match="not an Ed25519 public key"):
            load_public_key(str(path))


def test_rsa_and_encrypted_private_keys_are_refused(tmp_path: Path) -> None:
    rsa = tmp_path / "rsa.key"
    _openssl("genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024", "-out",
             str(rsa))
    with pytest.raises(BtrdeltaError, match="not an Ed25519 private key"):
        load_private_key(str(rsa))
    enc = tmp_path / "enc.key"
    _openssl("genpkey", "-algorithm", "ed25519", "-aes-128-cbc", "-pass", "pass:x", "-out",
             str(enc))
    with pytest.raises(BtrdeltaError, match="encrypted"):
        load_private_key(str(enc))


def _spec_message(context: str, algorithm: str, size: int, digest: bytes) -> bytes:
    """The signed message built from docs/formats/signature.md §2, independently."""
    return (b"btrdelta-signature\x00" + bytes([1, len(context)]) + context.encode()
            + bytes([len(algorithm)]) + algorithm.encode() + struct.pack("<Q", size)
            + bytes([len(digest)]) + digest)


def test_signature_is_ed25519_over_the_documented_message(tmp_path: Path) -> None:
    key = generate_key()
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    save_key_pair(key, str(priv), str(pub))
    content = _content()
    sig = sign(key, content, CONTEXT_STREAM)
    obj = json.loads(sig.encode())
    assert obj == {
        "format": "btrdelta-signature", "version": 1, "context": "btrfs-stream",
        "key_id": key_id(key), "algorithm": "blake3-256", "digest": content.digest.hex(),
        "size": len(CONTENT), "signature": obj["signature"],
    }
    # OpenSSL verifies the raw signature over the message built from the spec
    msg = tmp_path / "msg"
    msg.write_bytes(_spec_message("btrfs-stream", "blake3-256", len(CONTENT), content.digest))
    raw = tmp_path / "raw.sig"
    raw.write_bytes(base64.b64decode(obj["signature"]))
    out = _openssl("pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin", "-in",
                   str(msg), "-sigfile", str(raw))
    assert b"Signature Verified Successfully" in out
    # and ours verifies what OpenSSL signs over that message
    osig = _openssl("pkeyutl", "-sign", "-inkey", str(priv), "-rawin", "-in", str(msg))
    forged_by_openssl = Signature(CONTEXT_STREAM, key_id(key), content, osig)
    assert verify(forged_by_openssl, [load_public_key(str(pub))], content,
                  CONTEXT_STREAM) == key_id(key)


def test_file_round_trip_and_every_failure_is_a_signature_error(tmp_path: Path) -> None:
    key, other = generate_key(), generate_key()
    content = _content()
    path = tmp_path / "s.sig"
    write_signature(sign(key, content, CONTEXT_STREAM), str(path))
    sig = read_signature(str(path))
    pub = key.public_key()
    assert verify(sig, [other.public_key(), pub], content, CONTEXT_STREAM) == key_id(key)
    cases: list[tuple[object, str]] = [
        (lambda: verify(sig, [other.public_key()], content, CONTEXT_STREAM), "not trusted"),
        (lambda: verify(sig, pub, _content(CONTENT + b"x"), CONTEXT_STREAM), "differs"),
        (lambda: verify(sig, pub, content, "repo-index"), "not 'repo-index'"),
        (lambda: read_signature(str(tmp_path / "none.sig")), "no signature file"),
    ]
    obj = json.loads(path.read_bytes())
    for field, value, match in [
        ("digest", "00" * 32, "does not verify"),  # the claim changed, not the signature
        ("size", obj["size"] + 1, "does not verify"),
        ("signature", base64.b64encode(b"\x01" * 64).decode(), "does not verify"),
        ("version", 2, "version 2 is not supported"),
        ("size", -1, "malformed"),
        ("digest", "zz" * 32, "malformed"),
        ("key_id", "AB" * 32, "malformed"),
        ("extra", 1, "unexpected"),
    ]:
        bad = tmp_path / f"{field}-{value}.sig"
        bad.write_text(json.dumps({**obj, field: value}))

        def check(b: Path = bad, own_claim: bool = "does not" in match) -> object:
            s = read_signature(str(b))
            return verify(s, pub, s.content if own_claim else content, CONTEXT_STREAM)

        cases.append((check, match))
    junk = tmp_path / "junk.sig"
    junk.write_bytes(b"\xff\x00 binary")
    cases.append((lambda: read_signature(str(junk)), "malformed"))
    for fn, match in cases:
        with pytest.raises(SignatureError, match=match) as info:
            fn()  # type: ignore[operator]
        assert isinstance(info.value, ChecksumError)
        assert info.value.exit_code == 5
        assert "\n" not in str(info.value)


def test_check_signature_needs_no_content() -> None:
    key = generate_key()
    sig = sign(key, _content(), CONTEXT_STREAM)
    assert check_signature(sig, key.public_key(), CONTEXT_STREAM) == key_id(key)
    tampered = Signature(sig.context, sig.key_id, _content(b"other"), sig.signature)
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(tampered, key.public_key(), CONTEXT_STREAM)


def test_signature_files_replace_atomically_and_do_not_follow_symlinks(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "s.sig"
    write_signature(sign(key, _content(), CONTEXT_STREAM), str(path))
    write_signature(sign(key, _content(b"v2"), CONTEXT_STREAM), str(path))
    assert read_signature(str(path)).content == _content(b"v2")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, f"{path}.tmp-{os.getpid()}")
    with pytest.raises(FileExistsError):
        write_signature(sign(key, _content(), CONTEXT_STREAM), str(path))
    assert victim.read_text() == "precious"


def test_signature_and_key_files_are_named_durably(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The file, then its directory after the rename, are ``fsync``-ed: after a power cut
    the name shows the whole signature (or key), not nothing."""
    synced = spy_fsync(monkeypatch)
    key = generate_key()
    path = tmp_path / "s.sig"
    write_signature(sign(key, _content(), CONTEXT_STREAM), str(path))
    assert synced == [f"{path}.tmp-{os.getpid()}", str(tmp_path)]
    synced.clear()
    save_key_pair(key, str(tmp_path / "k.pem"), str(tmp_path / "k.pub"))
    assert synced == [str(tmp_path / "k.pem"), str(tmp_path), str(tmp_path / "k.pub"),
                      str(tmp_path)]
