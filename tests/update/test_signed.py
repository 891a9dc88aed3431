"""``update.signed``: the pre-commit hook is a second line behind the END gate: with the
gate defeated, a tampered signed stream still never gets its final name."""

from __future__ import annotations

import io
from collections.abc import Generator
from pathlib import Path

import pytest

from btrdelta.errors import SignatureError
from btrdelta.stream.reader import Event
from btrdelta.stream.records import End, Mkfile, Write
from btrdelta.trust import CONTEXT_STREAM, digest_bytes, generate_key, sign
from btrdelta.update import signed
from tests.receive.helpers import stream_bytes, subvol

STREAM = stream_bytes([subvol(b"A"), Mkfile(path=b"f", ino=257),
                       Write(path=b"f", offset=0, data=b"signed data\n"), End()])


def _receive(data: bytes, dest: Path) -> object:
    key = generate_key()
    sig = sign(key, digest_bytes(STREAM), CONTEXT_STREAM)
    return signed.receive_signed(io.BytesIO(data), dest, sig, [key.public_key()],  # type: ignore[arg-type]
                                 source="s.stream", backend="dir")


def test_signed_stream_goes_in(tmp_path: Path) -> None:
    got = _receive(STREAM, tmp_path)
    assert [s.name for s in got] == ["A"]  # type: ignore[attr-defined]
    assert (tmp_path / "A" / "f").read_bytes() == b"signed data\n"


def test_hook_refuses_when_the_gate_lets_end_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_gate(self: signed.SignedEvents) -> Generator[list[Event], None, None]:
        yield from self.inner.batches()  # every batch at once, END before any check
        self._finish()
        self.verified = True

    monkeypatch.setattr(signed.SignedEvents, "batches", no_gate)
    # a stream whose records are sound but whose content is not the signed one
    other = stream_bytes([subvol(b"A"), Mkfile(path=b"f", ino=257),
                          Write(path=b"f", offset=0, data=b"forged data\n"), End()])
    with pytest.raises(SignatureError, match="not committed"):
        _receive(other, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".btrdelta-subvols.json"] == []
