"""Keys, content digests and signatures: who made a payload (floor 0).

Owns: Ed25519 keys (generate, save, load, key IDs), content digests (:class:`ContentDigest`,
:class:`Hasher`, :class:`HashingReader`), the signature envelope (:class:`Signature`: what
is signed, by which key, over which digest) and the raw Ed25519 primitives the chunk
archive format signs its header and index with. Spec: ``docs/formats/signature.md``.

Does not own: what a payload's content *is*. Callers decide what they hash (the bytes of a
plain send stream, the expanded stream a delta's DEND record describes, an index file) and
name it with a *context* string, so a signature made for one kind of payload never
verifies as another. What is signed is a content digest, never transport bytes: a stream
compressed, delta-encoded or fetched in ranges keeps its signature.

Every verification failure is a :class:`~btrdelta.errors.SignatureError` (exit 5) with a
one-line message; a key file that is damaged, too large or not an Ed25519 key is a
:class:`~btrdelta.errors.StreamFormatError` (exit 3, as any malformed input) naming the file;
an encrypted private key (a key we do not read) is a :class:`~btrdelta.errors.BtrdeltaError`
(exit 1).

Example::

    key = generate_key()
    content = digest_bytes(b"...the payload...")  # or Hasher().update(...) piece by piece
    sig = sign(key, content, "repo-index")
    write_signature(sig, "index.json.sig")  # or embed sig.to_json() in a JSON document
    verify(read_signature("index.json.sig"), [key.public_key()], content, "repo-index")
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Iterable
from typing import Any, BinaryIO

import blake3
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._value import Value
from .errors import BtrdeltaError, SignatureError, StreamFormatError, UsageError

__all__ = [
    "CONTEXT_STREAM",
    "DIGEST_BLAKE3",
    "DIGEST_SHA256",
    "SIGNATURE_VERSION",
    "ContentDigest",
    "Hasher",
    "HashingReader",
    "PrivateKey",
    "PublicKey",
    "Signature",
    "check_signature",
    "digest_bytes",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_peer_key",
    "load_root_key",
    "parse_public_key",
    "public_key_text",
    "read_signature",
    "save_key_pair",
    "sign",
    "sign_message",
    "signed_message",
    "verify",
    "verify_message",
    "write_signature",
]

PrivateKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey

#: digest algorithms by their envelope name: (constructor, digest length)
DIGEST_BLAKE3 = "blake3-256"
DIGEST_SHA256 = "sha256"
_DIGEST_SIZES = {DIGEST_BLAKE3: 32, DIGEST_SHA256: 32}

#: the context of a plain btrfs send stream's bytes (also what a delta stream expands to)
CONTEXT_STREAM = "btrfs-stream"

SIGNATURE_VERSION = 1
_MAGIC = b"btrdelta-signature\0"
_FORMAT = "btrdelta-signature"
_CONTEXT_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]+")
_MAX_SIZE = (1 << 64) - 1
#: key and signature files are small; anything larger is not one
_MAX_FILE = 64 << 10


# -- content digests --------------------------------------------------------------------


class ContentDigest(Value):
    """What a signature covers: a digest of the content and the content's size in bytes."""

    algorithm: str
    digest: bytes
    size: int

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.digest.hex()} ({self.size} bytes)"


class Hasher:
    """Incremental :class:`ContentDigest` of bytes (BLAKE3-256 unless told otherwise)."""

    def __init__(self, algorithm: str = DIGEST_BLAKE3) -> None:
        if algorithm == DIGEST_BLAKE3:
            self._h: Any = blake3.blake3(max_threads=1)
        elif algorithm == DIGEST_SHA256:
            self._h = hashlib.sha256()
        else:
            raise BtrdeltaError(f"unknown digest algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.size = 0

    def update(self, data: Any) -> None:
        """Add ``data`` (any buffer)."""
        self._h.update(data)
        self.size += memoryview(data).nbytes

    def result(self) -> ContentDigest:
        """The digest of everything added so far."""
        return ContentDigest(self.algorithm, bytes(self._h.digest()), self.size)


def digest_bytes(data: Any, algorithm: str = DIGEST_BLAKE3) -> ContentDigest:
    """The :class:`ContentDigest` of one buffer (an index file, a small payload)."""
    h = Hasher(algorithm)
    h.update(data)
    return h.result()


class HashingReader(io.RawIOBase):
    """A raw binary file that hashes every byte read through it.

    Put a :class:`io.BufferedReader` around it for ``peek`` and small reads; call
    :meth:`drain` to hash the rest of the input before taking :attr:`hasher`'s result.
    """

    def __init__(self, file: BinaryIO, algorithm: str = DIGEST_BLAKE3) -> None:
        super().__init__()
        self.file = file
        self.hasher = Hasher(algorithm)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = int(self.file.readinto(buf) or 0)  # type: ignore[attr-defined]
        if n:
            self.hasher.update(memoryview(buf)[:n])
        return n

    def drain(self, limit: int | None = None) -> int:
        """Read (and hash) the input to its end; returns the bytes read. With ``limit``,
        stops once more than ``limit`` bytes came (the caller treats that as an error)."""
        total = 0
        buf = bytearray(1 << 20)
        while limit is None or total <= limit:
            n = self.readinto(buf)
            if not n:
                break
            total += n
        return total


# -- keys -----------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def _raw_public(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes_raw()


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key ID: lowercase hex SHA-256 of the 32 raw public-key bytes (64 characters)."""
    return hashlib.sha256(_raw_public(key)).hexdigest()


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The one-line text form of a public key: base64 of its 32 raw bytes (44 characters)."""
    return base64.b64encode(_raw_public(key)).decode("ascii")


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data``; never over an existing file or through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise BtrdeltaError("file exists; refusing to overwrite a key", path=path) from None
    except FileNotFoundError:  # (as every output of the package says it)
        raise BtrdeltaError("directory does not exist",
                            path=os.path.dirname(path) or ".") from None
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    _fsync_dir_of(path)


def save_key_pair(key: Ed25519PrivateKey, private_path: str, public_path: str) -> None:
    """Write the private key (PKCS#8 PEM, mode 0600) and its public key (PEM, 0644).

    Neither file may exist (checked for both before either is written); on failure the
    private key written by this call is removed again.
    """
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise BtrdeltaError("file exists; refusing to overwrite a key", path=path)
    from cryptography.hazmat.primitives import serialization

    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(private_path)
        raise


def _read_small(path: str, what: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise StreamFormatError(f"too large for {what}", source=path)
    return data


def _load_private(data: bytes, path: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization

    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key: object = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise BtrdeltaError(
            "encrypted private keys are not supported (decrypt it with `openssl pkey`)",
            path=path,
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if b"-----BEGIN PUBLIC KEY-----" in data or data.startswith(b"ssh-ed25519 "):
            raise StreamFormatError(  # (a user's mix-up: key generate makes both files)
                "a public key, not a private one: give the private key (the .key "
                "file `btrdelta key generate` wrote beside the .pub)", source=path) from None
        raise StreamFormatError("not a PEM or OpenSSH private key", source=path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise StreamFormatError("not an Ed25519 private key", source=path)
    return key


def load_private_key(path: str) -> Ed25519PrivateKey:
    """Load an Ed25519 private key: PKCS#8 PEM (``key generate``, ``openssl genpkey
    -algorithm ed25519``) or OpenSSH (``ssh-keygen -t ed25519``), unencrypted."""
    return _load_private(_read_small(path, "a key file"), path)


#: the DER of an Ed25519 SubjectPublicKeyInfo before its 32 key bytes (RFC 8410 §4)
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


def _spki_ed25519(text: bytes) -> bytes | None:
    """The 32 key bytes of ``text`` (stripped) when it is a PEM ``PUBLIC KEY`` holding an
    Ed25519 SubjectPublicKeyInfo, as :func:`save_key_pair` and ``openssl pkey -pubout``
    write it; else None (cryptography's PEM reader decides)."""
    lines = text.split(b"\n")
    if len(lines) < 3 or lines[0].rstrip(b"\r") != b"-----BEGIN PUBLIC KEY-----" \
            or lines[-1].rstrip(b"\r") != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except binascii.Error:
        return None
    if len(der) != 44 or not der.startswith(_ED25519_SPKI):
        return None
    return der[12:]


def parse_public_key(data: bytes, *, source: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from any form :func:`load_public_key` reads."""
    text = data.strip()
    if text.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in text:
        return _load_private(data, source).public_key()
    # (cryptography's readers of key files import its every algorithm: ~26 M instructions
    # of an `update`'s start: the forms of Ed25519 keys that btrdelta writes are read here)
    spki = _spki_ed25519(text)
    if spki is not None:
        return Ed25519PublicKey.from_public_bytes(spki)
    try:
        if text.startswith((b"-----BEGIN", b"ssh-")):
            from cryptography.hazmat.primitives import serialization

            key: object = (serialization.load_pem_public_key(text)
                           if text.startswith(b"-----BEGIN")
                           else serialization.load_ssh_public_key(text))
        else:
            raw = base64.b64decode(text, validate=True)
            if len(raw) != 32:
                raise ValueError("not 32 bytes")
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise StreamFormatError(
            "not an Ed25519 public key (PEM, OpenSSH or base64 of 32 bytes)", source=source
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise StreamFormatError("not an Ed25519 public key", source=source)
    return key


def load_public_key(path: str) -> Ed25519PublicKey:
    """Load an Ed25519 public key: PEM (SubjectPublicKeyInfo), a one-line OpenSSH key
    (``ssh-ed25519 AAAA…``), the base64 of its 32 raw bytes (:func:`public_key_text`), or
    a private key file (its public half)."""
    return parse_public_key(_read_small(path, "a key file"), source=path)


def _load_pinned(path: str, what: str) -> Ed25519PublicKey:
    """The public key another party is pinned by; a private key file here is a mistake
    to say, not to use (:class:`UsageError`: it names ``what`` to give instead)."""
    data = _read_small(path, "a key file")
    if data.lstrip().startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in data:
        raise UsageError(f"{path} is a private key: give {what}")
    return parse_public_key(data, source=path)


def load_root_key(path: str) -> Ed25519PublicKey:
    """A repository's root public key for a client to pin (:func:`load_public_key`'s
    forms but a private key file: a device holds the public half only, and its private
    key there is a mistake to say, not to use: :class:`UsageError`)."""
    return _load_pinned(path, "the repository's root public key (NAME.pub beside NAME.key; "
                              "a client never needs the private one)")


def load_peer_key(path: str) -> Ed25519PublicKey:
    """A replication peer's public key (``replicate --peer``, ``--allow``): as
    :func:`load_root_key`, a private key file is refused (the other side's secret copied
    here)."""
    stem = os.path.basename(path).removesuffix(".key")
    return _load_pinned(path, f"the other side's public key ({stem}.pub beside it; a "
                              "private key never leaves its machine)")


# -- signatures -----------------------------------------------------------------------


def _check_context(context: str) -> None:
    if not _CONTEXT_RE.fullmatch(context):
        raise BtrdeltaError(f"bad signature context {context!r}")


def signed_message(context: str, content: ContentDigest) -> bytes:
    """The exact bytes an envelope's Ed25519 signature is made over (signature.md §2)."""
    _check_context(context)
    algo = content.algorithm.encode("ascii")
    return b"".join((
        _MAGIC, bytes((SIGNATURE_VERSION, len(context))), context.encode("ascii"),
        bytes((len(algo),)), algo, struct.pack("<Q", content.size),
        bytes((len(content.digest),)), content.digest,
    ))


class Signature(Value):
    """A signature envelope: ``key_id``'s Ed25519 ``signature`` over ``content`` in
    ``context`` (see ``docs/formats/signature.md``)."""

    context: str
    key_id: str
    content: ContentDigest
    signature: bytes
    version: int = SIGNATURE_VERSION

    def message(self) -> bytes:
        """The bytes the signature is over."""
        return signed_message(self.context, self.content)

    def to_json(self) -> dict[str, Any]:
        """The envelope as a JSON object (to embed, e.g. in an index)."""
        return {
            "format": _FORMAT, "version": self.version, "context": self.context,
            "key_id": self.key_id, "algorithm": self.content.algorithm,
            "digest": self.content.digest.hex(), "size": self.content.size,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    def encode(self) -> bytes:
        """The detached signature file: the JSON object on one line, then a newline."""
        return json.dumps(self.to_json(), separators=(", ", ": ")).encode() + b"\n"

    @classmethod
    def from_json(cls, obj: object, *, source: str | None = None) -> Signature:
        """Check and decode an envelope object; :class:`SignatureError` if malformed."""

        def bad(why: str) -> SignatureError:
            return SignatureError(f"malformed signature: {why}", source=source)

        keys = {"format", "version", "context", "key_id", "algorithm", "digest", "size",
                "signature"}
        if not isinstance(obj, dict):
            raise bad("not a JSON object")
        if obj.get("format") != _FORMAT:
            raise bad(f"format is not {_FORMAT!r}")
        if obj.get("version") != SIGNATURE_VERSION:
            raise SignatureError(
                f"signature version {obj.get('version')!r} is not supported (only 1)",
                source=source,
            )
        if set(obj) != keys:
            raise bad(f"fields {sorted(set(obj) ^ keys)} are unexpected or missing")
        context, kid, algo = obj["context"], obj["key_id"], obj["algorithm"]
        digest, size, sig = obj["digest"], obj["size"], obj["signature"]
        if not isinstance(context, str) or not _CONTEXT_RE.fullmatch(context):
            raise bad("bad context")
        if not isinstance(kid, str) or not _KEY_ID_RE.fullmatch(kid):
            raise bad("key_id is not 64 lowercase hex digits")
        if algo not in _DIGEST_SIZES:
            raise bad(f"unknown digest algorithm {algo!r}")
        if not isinstance(digest, str) or not _HEX_RE.fullmatch(digest) \
                or len(digest) != 2 * _DIGEST_SIZES[algo]:
            raise bad(f"digest is not {_DIGEST_SIZES[algo]} bytes of lowercase hex")
        if type(size) is not int or not 0 <= size <= _MAX_SIZE:
            raise bad("size is not an integer in [0, 2^64)")
        try:
            raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
        except binascii.Error:
            raw = b""
        if len(raw) != 64:
            raise bad("signature is not the base64 of 64 bytes")
        return cls(context, kid, ContentDigest(algo, bytes.fromhex(digest), size), raw)

    @classmethod
    def decode(cls, data: bytes, *, source: str | None = None) -> Signature:
        """Decode a detached signature file (one JSON object, UTF-8)."""
        if len(data) > _MAX_FILE:
            raise SignatureError("malformed signature: file too large", source=source)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise SignatureError("malformed signature: not a JSON object",
                                 source=source) from None
        return cls.from_json(obj, source=source)


def sign(key: Ed25519PrivateKey, content: ContentDigest, context: str) -> Signature:
    """Sign ``content`` (a digest and size) for ``context``."""
    if content.algorithm not in _DIGEST_SIZES or \
            len(content.digest) != _DIGEST_SIZES[content.algorithm]:
        raise BtrdeltaError(f"cannot sign a {content.algorithm!r} digest of that length")
    message = signed_message(context, content)
    return Signature(context, key_id(key), content, key.sign(message))


def _keyring(
    keys: Ed25519PublicKey | Iterable[Ed25519PublicKey],
) -> dict[str, Ed25519PublicKey]:
    if isinstance(keys, Ed25519PublicKey):
        keys = [keys]
    return {key_id(k): k for k in keys}


def check_signature(
    sig: Signature,
    keys: Ed25519PublicKey | Iterable[Ed25519PublicKey],
    context: str,
    *,
    source: str | None = None,
) -> str:
    """Check that one of ``keys`` signed ``sig``'s claim for ``context``; returns its key
    ID. The content itself is not looked at (see :func:`verify`): this can run before the
    content is read, so untrusted input is refused before anything is done with it."""
    if sig.context != context:
        raise SignatureError(
            f"signature is for {sig.context!r} content, not {context!r}", source=source
        )
    ring = _keyring(keys)
    key = ring.get(sig.key_id)
    if key is None:
        trusted = ", ".join(k[:16] for k in ring) or "none"
        raise SignatureError(
            f"signed by key {sig.key_id[:16]}, which is not trusted here (trusted: {trusted})",
            source=source,
        )
    try:
        key.verify(sig.signature, sig.message())
    except InvalidSignature:
        raise SignatureError(
            f"Ed25519 signature by key {sig.key_id[:16]} does not verify (tampered signature)",
            source=source,
        ) from None
    return sig.key_id


def verify(
    sig: Signature,
    keys: Ed25519PublicKey | Iterable[Ed25519PublicKey],
    content: ContentDigest,
    context: str,
    *,
    source: str | None = None,
) -> str:
    """Check ``sig`` (:func:`check_signature`) and that it covers ``content``; returns the
    signing key's ID. ``source`` names the content in the error message."""
    kid = check_signature(sig, keys, context, source=source)
    if sig.content.algorithm != content.algorithm:
        raise SignatureError(
            f"signature covers a {sig.content.algorithm} digest, the content has "
            f"{content.algorithm}", source=source,
        )
    if sig.content.size != content.size or sig.content.digest != content.digest:
        raise SignatureError(
            f"content differs from what key {kid[:16]} signed ({content.size} bytes, "
            f"{content.algorithm} {content.digest.hex()[:16]}…; signed: {sig.content.size} "
            f"bytes, {sig.content.digest.hex()[:16]}…): tampered input or wrong signature",
            source=source,
        )
    return kid


def read_signature(path: str) -> Signature:
    """Read a detached signature file; a missing file is a :class:`SignatureError`."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise SignatureError("no signature file (unsigned input?)", source=path) from None
    return Signature.decode(data, source=path)


def _fsync_dir_of(path: str) -> None:
    """``fsync`` the directory of ``path``: its new name survives a power cut (floor 0:
    not ``fs.atomic``'s)."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_signature(sig: Signature, path: str) -> None:
    """Write a detached signature file atomically and durably (a new temporary file,
    ``fsync``, rename, ``fsync`` of the directory); an existing signature at ``path`` is
    replaced."""
    tmp = f"{path}.tmp-{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644)
    try:
        os.write(fd, sig.encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir_of(path)


# -- raw Ed25519 (the chunk archive format signs header || index directly) -------------


def sign_message(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The raw 64-byte Ed25519 signature of ``message`` (RFC 8032)."""
    return key.sign(message)


def verify_message(
    key: Ed25519PublicKey, message: bytes, signature: bytes, *, what: str = "data",
    source: str | None = None,
) -> None:
    """Check a raw Ed25519 signature; :class:`SignatureError` naming ``what`` if not."""
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        raise SignatureError(
            f"Ed25519 signature does not verify (tampered {what} or wrong key "
            f"{key_id(key)[:16]})", source=source,
        ) from None
