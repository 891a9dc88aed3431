"""Signed send and delta streams: their content digest, and a receive that commits only
after the signature verified.

Owns: what the *content* of a stream payload is, for signing (``docs/formats/
signature.md`` §3): the bytes of the plain btrfs send stream; for a delta stream, the plain
stream it expands to, whose size and BLAKE3-256 digest its ``DEND`` record carries (and
which expansion checks). So one signature, made by ``send --sign``, ``delta make --sign``
or ``btrdelta sign``, verifies the plain stream, its delta and the delta's expansion.

:class:`SignedEvents` gates a receive: the signature file is checked against the trusted
keys before anything is applied; the stream's content digest is computed while it is
applied into the hidden temporary subvolume; the batch holding the final END (which makes
the receiver give the subvolume its final name) is handed over only after the whole input
was read and its digest matched the signed one. A signed input holds one subvolume: a
second one would be committed before the end of the input is known.

Does not own: keys and the envelope (:mod:`btrdelta.trust`), decoding (``stream``,
``delta``), applying (``receive``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import BtrdeltaError, SignatureError, StreamFormatError
from ..stream.reader import Event, StreamHeader, StreamReader
from ..stream.records import End, Snapshot, Subvol
from ..trust import (
    CONTEXT_STREAM,
    DIGEST_BLAKE3,
    ContentDigest,
    Hasher,
    HashingReader,
    PrivateKey,
    PublicKey,
    Signature,
    check_signature,
    load_private_key,
    sign,
    verify,
    write_signature,
)
from .identify import Kind, identify

if TYPE_CHECKING:
    from ..receive import PendingSubvol, ReceivedSubvol
    from ..receive.receiver import BatchedEvents

__all__ = ["PayloadInfo", "SignedEvents", "StreamSigner", "open_signed_events",
           "payload_digest", "receive_signed", "signature_path"]

_STARTS = (Subvol, Snapshot)
_BUFFER = 1 << 20


def signature_path(name: str, given: str | None) -> str:
    """Where the detached signature of input/output ``name`` is: ``given``, or
    ``NAME.sig`` next to a file (standard input/output needs ``given``)."""
    if given:
        return given
    if name in ("-", ""):
        raise BtrdeltaError("the stream is standard input/output: name its signature file "
                            "with --signature FILE")
    return f"{name}.sig"


class PayloadInfo:
    """What :func:`payload_digest` found: the kind, the content digest, and counts."""

    def __init__(self, kind: str, content: ContentDigest, streams: int, commands: int,
                 size: int) -> None:
        self.kind = kind  # "stream" or "delta"
        self.content = content
        self.streams = streams
        self.commands = commands  # of the plain stream (a delta: as its DEND says)
        self.size = size  # bytes of the input itself


def _open(raw: HashingReader, source: str | None) -> tuple[bool, BinaryIO]:
    """Whether ``raw`` holds a delta stream (else a send stream), and a buffered file
    reading it from the start; anything else is refused with one line."""
    what, buf = identify(cast(BinaryIO, io.BufferedReader(raw, _BUFFER)))
    if what.kind is Kind.DELTA_STREAM:
        return True, buf
    if what.kind in (Kind.SEND_STREAM, Kind.UNKNOWN):  # unknown: the parser names the magic
        return False, buf
    raise what.refuse("a btrfs send stream or a delta stream", source=source)


def payload_digest(f: BinaryIO, *, source: str | None = None) -> PayloadInfo:
    """Read a whole send stream or delta stream and return its content digest.

    A send stream is decoded (framing and every CRC32C checked) while its bytes are
    hashed. A delta stream's records are parsed and checked to its ``DEND``, which gives
    the content: the plain stream it expands to (checked when it is expanded or
    received, which needs the old snapshot).
    """
    raw = HashingReader(f)
    is_delta, buf = _open(raw, source)
    if is_delta:
        from ..delta.expand import open_delta
        from ..delta.format import DeltaEnd, StreamStart

        end: DeltaEnd | None = None
        streams = 0
        for item in open_delta(buf, source=source):
            if type(item) is StreamStart:
                streams += 1
            elif type(item) is DeltaEnd:
                end = item
        if end is None:  # pragma: no cover - the parser requires the DEND record
            raise StreamFormatError("delta stream without DEND", source=source)
        return PayloadInfo("delta", _dend_content(end, source), streams, end.count,
                           raw.hasher.size)
    reader = StreamReader(buf, source=source)
    streams = commands = 0
    for batch in reader.batches():
        if type(batch[0]) is StreamHeader:
            streams += 1
        else:
            commands += len(batch)
    raw.drain()
    content = raw.hasher.result()
    return PayloadInfo("stream", content, streams, commands, content.size)


def _dend_content(end: Any, source: str | None) -> ContentDigest:
    from ..delta.format import HashAlgo

    if end.hash_algo != HashAlgo.BLAKE3:
        raise StreamFormatError("DEND uses a digest this build does not check", source=source)
    return ContentDigest(DIGEST_BLAKE3, bytes(end.digest), end.size)


class SignedEvents:
    """The events of a signed input, handed to ``receive`` only as far as is safe.

    Everything but the last batch of events passes through one batch late; the last one
    (with END) is handed over only after the input ended and ``finish`` (the signature
    check over the content digest) passed. A second SUBVOL/SNAPSHOT or anything after
    END is refused before it reaches the receiver.
    """

    def __init__(self, inner: BatchedEvents, finish: Callable[[], None], *,
                 source: str | None) -> None:
        self.inner = inner
        self._finish = finish
        self._source = source
        #: True once the signature verified over the whole input's content
        self.verified = False

    def pre_commit(self, pending: PendingSubvol) -> None:
        """The receiver's pre-commit hook: a complete subvolume gets its final name only
        when the signature verified over the whole input (the gate above holds the END
        back until then; this checks it at the point of commit too)."""
        if not self.verified:
            raise SignatureError(
                f"subvolume {pending.name.decode(errors='replace')!r} is complete but the "
                "signature is not verified yet: not committed", source=self._source,
            )

    def _check(self, batch: list[Event], starts: int, ended: bool) -> tuple[int, bool]:
        if ended:
            raise StreamFormatError("signed input continues after END (a signed input holds "
                                    "exactly one stream)", source=self._source)
        kinds = set(map(type, batch))
        if Subvol in kinds or Snapshot in kinds:
            starts += sum(1 for ev in batch if type(ev) in _STARTS)
            if starts > 1:
                raise BtrdeltaError("a signed input holds one subvolume; this one has more "
                                    "(sign and receive them one by one)", source=self._source)
        if End in kinds:
            if type(batch[-1]) is not End or sum(1 for ev in batch if type(ev) is End) > 1:
                raise StreamFormatError("signed input continues after END (a signed input "
                                        "holds exactly one stream)", source=self._source)
            ended = True
        return starts, ended

    def batches(self) -> Generator[list[Event], None, None]:
        """The events in lists (see the class docstring); call it once."""
        held: list[Event] | None = None
        starts, ended = 0, False
        inner = self.inner.batches()
        with closing(inner):
            for batch in inner:
                if not batch:
                    continue
                starts, ended = self._check(batch, starts, ended)
                if held is not None:
                    yield held
                held = batch
        self._finish()
        self.verified = True
        if held is not None:
            yield held

    def __iter__(self) -> Iterator[Event]:
        for batch in self.batches():
            yield from batch


def open_signed_events(
    f: BinaryIO,
    signature: Signature,
    keys: Iterable[PublicKey],
    dest: Path,
    *,
    backend: str = "auto",
    source: str | None = None,
    signature_source: str | None = None,
    search_root: Path | None = None,
    max_file_size: int | None = None,
) -> SignedEvents:
    """The events of signed input ``f`` (a send stream or a delta stream), gated.

    The signature is checked against ``keys`` first: a malformed or untrusted signature
    is refused before anything is read or applied. A delta stream is expanded against the
    local parent below ``dest`` (or ``search_root``), as
    :func:`~btrdelta.update.receive.receive_any` does.
    """
    keys = list(keys)
    check_signature(signature, keys, CONTEXT_STREAM, source=signature_source)
    raw = HashingReader(f)
    is_delta, buf = _open(raw, source)
    end: list[Any] = []

    def finish() -> None:
        if buf.read(1):  # the readers stop at the end of the input; nothing may follow
            raise StreamFormatError("data after the end of the stream", source=source)
        if is_delta and not end:
            raise StreamFormatError("truncated delta stream (no DEND record)", source=source)
        content = _dend_content(end[0], source) if is_delta else raw.hasher.result()
        verify(signature, keys, content, CONTEXT_STREAM, source=source)

    if not is_delta:
        return SignedEvents(StreamReader(buf, source=source), finish, source=source)
    from ..delta.events import expand_events
    from ..delta.expand import open_delta
    from ..delta.format import DeltaEnd
    from ..receive import uses_btrfs
    from .receive import delta_parent

    def tap(items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            if type(item) is DeltaEnd:
                end.append(DeltaEnd(item.count, item.size, item.hash_algo, bytes(item.digest)))
            yield item

    from ..delta.format import DEFAULT_MAX_FILE_SIZE

    parent = delta_parent(dest, backend, search_root)
    events = expand_events(tap(open_delta(buf, source=source)), parent, source=source,
                           clone_same=uses_btrfs(dest, backend),
                           max_file_size=max_file_size or DEFAULT_MAX_FILE_SIZE)
    return SignedEvents(events, finish, source=source)


def receive_signed(
    f: BinaryIO,
    dest: str | os.PathLike[str],
    signature: Signature,
    keys: Iterable[PublicKey],
    *,
    source: str | None = None,
    signature_source: str | None = None,
    **options: Any,
) -> list[ReceivedSubvol]:
    """Receive signed input ``f`` (send stream or delta stream) below ``dest``.

    Refused (:class:`~btrdelta.errors.SignatureError`, nothing under the subvolume's name)
    unless ``signature`` is by one of ``keys`` and covers the input's content. ``options``
    are those of :func:`btrdelta.receive.receive`.
    """
    from ..receive import receive

    dest = Path(dest)
    events = open_signed_events(f, signature, keys, dest, backend=options.get("backend", "auto"),
                                source=source, signature_source=signature_source,
                                search_root=options.get("search_root"),
                                max_file_size=options.pop("max_file_size", None))
    # a delta stream is expanded in a helper thread while C applies records
    options.setdefault("read_ahead", not isinstance(events.inner, StreamReader))
    given = options.pop("pre_commit", None)

    def pre_commit(pending: PendingSubvol) -> None:
        events.pre_commit(pending)
        if given is not None:
            given(pending)

    return receive(events, dest, pre_commit=pre_commit, **options)


class StreamSigner:
    """Sign a stream being written (``send --sign``) or read (``delta make --sign``).

    Made before the work starts (:meth:`start`), so a bad key or a missing signature path
    for standard output fails at once; :meth:`finish` signs what passed through and writes
    the detached signature.
    """

    def __init__(self, key: PrivateKey, sig_path: str) -> None:
        self.key = key
        self.sig_path = sig_path
        self._raw: HashingReader | None = None
        self.hasher = Hasher()

    @classmethod
    def start(cls, key_path: str | None, sig_path: str | None,
              stream: str | None) -> StreamSigner | None:
        """A signer for ``--sign KEY_PATH`` (``None`` without it); ``stream`` names the
        signed file (its signature defaults to ``STREAM.sig``)."""
        if not key_path:
            return None
        path = signature_path(stream or "-", sig_path)
        return cls(load_private_key(key_path), path)

    def wrap(self, write: Callable[[Any], object]) -> Callable[[Any], object]:
        """``write``, hashing what it writes."""
        update = self.hasher.update

        def hashed(data: Any) -> object:
            update(data)
            return write(data)

        return hashed

    def reader(self, file: BinaryIO) -> BinaryIO:
        """``file`` buffered, hashing what is read from it."""
        self._raw = HashingReader(file)
        self.hasher = self._raw.hasher
        return cast(BinaryIO, io.BufferedReader(self._raw, _BUFFER))

    def finish(self) -> Signature:
        """Sign the content (the rest of a :meth:`reader` input is read first) and write
        the signature file."""
        if self._raw is not None:
            self._raw.drain()
        sig = sign(self.key, self.hasher.result(), CONTEXT_STREAM)
        write_signature(sig, self.sig_path)
        return sig
